"""Joining a Ray cluster, or starting a local one, the same way for every job."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import ray

from pipeline.errors import InputError

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ANSWER_TIMEOUT_S = 5.0  # a cluster's GCS that does not accept a connection in this long is taken as gone


class ClusterUnreachable(InputError):
    """The Ray cluster a job would join does not answer; the message names it, where it came from, the fix."""


def connect(
    log: Callable[[str], None] = print,
    env: dict[str, str] | None = None,
    local_cpus: Callable[[], int] | None = None,
    local_resources: dict[str, float] | None = None,
    joined_note: str | None = None,
) -> bool:
    """Join the cluster in RAY_ADDRESS or one started with `ray start`; else start a local one.

    `env` reaches every worker, on every node, through the job's runtime env, which Ray keeps in
    its job table: settings, not secrets (a local Ray inherits this process's environment anyway).
    `local_cpus` sizes a local Ray (and may refuse to start one); Ray's default is this machine's
    cores. A local Ray also gets `local_resources` (custom resources such as a mock GPU).
    `joined_note` is said when it joins a cluster (what its workers do not get from here). Returns
    False when it started a local Ray, True when it joined a cluster or Ray was up.
    """
    if ray.is_initialized():
        return True
    runtime_env = {"env_vars": env} if env else None
    joined = False
    if os.environ.get("RAY_ADDRESS") != "local":  # RAY_ADDRESS=local: a local Ray, whatever is recorded
        check_answers()  # a dead cluster is named in seconds; ray.init would retry it for many minutes
        try:
            ray.init(address="auto", runtime_env=runtime_env)
            joined = True
            log(f"connected to the Ray cluster at {ray.get_runtime_context().gcs_address}")
            if joined_note:
                log(joined_note)
        except ConnectionError:
            if os.environ.get("RAY_ADDRESS"):
                raise
    if not joined:
        ray.init(
            address="local",
            num_cpus=local_cpus() if local_cpus else None,
            resources=local_resources or None,
            runtime_env=runtime_env,
        )
        log(f"started a local Ray with {ray.cluster_resources().get('CPU', 0):.0f} logical CPUs")
    stop_on_sigterm()
    return joined


def env_names(text: str, flag: str = "--forward-env") -> tuple[str, ...]:
    """`NAME,NAME,...` → the names; anything that is not an environment variable's name is refused."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if not ENV_NAME.fullmatch(name):
            raise InputError(
                f"{flag} {text!r}: {name!r} is not the name of an environment variable; "
                "write NAME,NAME (e.g. MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD)"
            )
    return names


def check_answers(timeout: float = ANSWER_TIMEOUT_S) -> None:
    """The cluster ray.init(address="auto") would join (RAY_ADDRESS, else the one `ray start` recorded
    on this machine) accepts a connection, or ClusterUnreachable says which, from where, and the fix.

    A `ray start` killed without `ray stop` leaves its address in <ray temp dir>/ray_current_cluster;
    every later job on the machine would wait on it for many minutes, deaf to SIGTERM.
    """
    address, source = os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"
    if not address or address == "auto":
        from ray._common.utils import get_ray_address_file

        record = Path(get_ray_address_file(None))
        try:
            address, source = record.read_text().strip(), str(record)
        except OSError:
            return  # nothing recorded: ray.init looks for a running cluster, else a local one starts
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        return  # not host:port; ray.init says what is wrong with it
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if source == "RAY_ADDRESS":
            fix = "start that cluster, set RAY_ADDRESS to one that runs, or RAY_ADDRESS=local for a local Ray"
        else:
            fix = (
                f"its `ray start` is gone without `ray stop`. Remove the stale record (rm {source}), or set "
                "RAY_ADDRESS=local to start a local Ray for this job, or RAY_ADDRESS=HOST:PORT for another cluster"
            )
        raise ClusterUnreachable(
            f"the Ray cluster at {address} (from {source}) does not answer within {timeout:g}s ({why}): {fix}"
        ) from None


def stop_on_sigterm() -> None:
    """Make SIGTERM (`ray job stop`, Kubernetes, a scheduler) stop the job as Ctrl-C does.

    ray.init() installs a SIGTERM handler that exits at once: a training run's controller then
    dies without withdrawing its request for nodes, and the autoscaler keeps its GPU nodes for
    minutes. Instead the SIGINT handler in place runs first (Ray Train's aborts the run
    gracefully), then KeyboardInterrupt unwinds the job: the MLflow run is marked KILLED and the
    job says how to --resume it.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame) -> None:
        on_interrupt = signal.getsignal(signal.SIGINT)
        if callable(on_interrupt) and on_interrupt is not signal.default_int_handler:
            on_interrupt(signal.SIGINT, frame)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)


def reenter_working_dir(path: str) -> None:
    """Carry on in `path` when the directory this process runs in was replaced under it.

    On cluster/local.yaml's fake multi-node cluster all "nodes" share one session directory, and
    each unpacks the job's working dir again into the same path, deleting the directory the
    driver runs in (MLflow's model logging then fails in os.getcwd()). Real nodes have their own disks.
    """
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(path)
