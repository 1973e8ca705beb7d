"""A watchdog for runs that wait: when no training batch has arrived for a while, say why.

    train workers ── Heartbeat() per batch (at most every few seconds) ──► LastBatch actor
    driver thread ── every few seconds: how long since the last batch? ──► past --stall-warning:
                     what waits for resources, what is reserved, what to change (pipeline.cluster.resources),
                     again every --stall-warning seconds until batches flow

On an autoscaling cluster a run may rightly wait for nodes; on any cluster a plan can wait
forever for resources that never free up. Either way the job says so instead of sitting silent.
The watchdog only reports: training goes on (or waits) as it would without it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import ray
import ray.exceptions

from pipeline.cluster.resources import ClusterState, Plan, describe_stall

HEARTBEAT_EVERY_S = 5.0  # a train worker tells the watchdog about its batches at most this often


@ray.remote(num_cpus=0, max_restarts=-1)  # no CPU: it must run on a cluster whose CPUs are all taken
class LastBatch:
    def __init__(self) -> None:
        self.last: float | None = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def quiet_for(self) -> float | None:
        """Seconds since the last batch; None before the first."""
        return None if self.last is None else time.monotonic() - self.last


class Heartbeat:
    """A train worker's side: call it on every batch; it reaches the watchdog every few seconds."""

    def __init__(self, actor, every: float = HEARTBEAT_EVERY_S) -> None:
        self.actor, self.every, self.sent = actor, every, -float("inf")

    def __call__(self) -> None:
        now = time.monotonic()
        if self.actor is None or now - self.sent < self.every:
            return
        self.sent = now
        try:
            self.actor.beat.remote()
        except ray.exceptions.RayError:  # the watchdog only reports: a lost watchdog never stops training
            pass


class Watchdog:
    """The driver's side, around trainer.fit(): `with Watchdog(...) as actor:` hands the workers `actor`."""

    def __init__(self, stall_s: float, plan: Plan, log: Callable[[str], None] = print) -> None:
        self.stall_s, self.plan, self.log = stall_s, plan, log
        self.actor = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.stall_s <= 0:
            return None
        self.actor = LastBatch.remote()
        self._thread = threading.Thread(target=self._watch, name="alexnet-watchdog", daemon=True)
        self._thread.start()
        return self.actor

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.actor is not None:
            ray.kill(self.actor)

    def _watch(self) -> None:
        started = time.monotonic()
        warned: float | None = None  # when the last report was printed, while the stall lasts
        poll = max(1.0, min(10.0, self.stall_s / 4))
        while not self._stop.wait(poll):
            try:
                since_batch = ray.get(self.actor.quiet_for.remote(), timeout=30)
            except ray.exceptions.RayError:  # a busy or restarting actor (GetTimeoutError): ask again
                continue
            quiet = time.monotonic() - started if since_batch is None else since_batch
            now = time.monotonic()
            if quiet < self.stall_s:
                if warned is not None:
                    self.log("watchdog: training batches are arriving again")
                    warned = None
            elif warned is None or now - warned >= self.stall_s:
                warned = now
                try:
                    self.log(describe_stall(quiet, since_batch is not None, self.plan, ClusterState.read()))
                except Exception as exc:  # noqa: BLE001 -- whatever Ray's GCS calls raise, the stall is still reported
                    self.log(f"watchdog: no training batch for {quiet:.0f}s (the cluster's state: {exc})")
