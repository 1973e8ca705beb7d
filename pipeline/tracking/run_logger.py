"""MLflow from inside a train worker: rank 0 logs each epoch into the driver's run, by id.

Other ranks, and every rank with --no-tracking, get ``NullLogger``, so the training loop has no
rank branches. The driver's side (creating, resuming and closing the run, registration) is
pipeline.tracking.mlflow_client and pipeline.train.registration.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from pipeline.redaction import redact

ATTEMPT_IDS_KEPT = 500  # the newest attempts' ids in the run's attempt_ids tag (MLflow keeps 8,000 characters)
# Network errors while the server is away: MLflow wraps most in MlflowException (ConnectionError is an OSError).
UNREACHABLE = (MlflowException, OSError)


def login_refused(exc: BaseException) -> int | None:
    """401 or 403 when MLflow's client failed because the server refused the login; else None."""
    text = str(getattr(exc, "message", exc))
    return next((code for code in (401, 403) if f"error code {code}" in text), None)


def _why_unsent(uri: str, exc: BaseException) -> str:
    """What this worker says when it cannot log: the server is away, or refuses this node's login."""
    code = login_refused(exc)
    if code:
        return (
            f"MLflow at {redact(uri)} refuses this node's login (HTTP {code}): a cluster's workers log in with "
            "their node's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials); set "
            "them there, or start the job with --forward-env MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD. "
            "Training goes on, metrics are kept and the driver sends them at the end"
        )
    return (
        f"MLflow at {redact(uri)} is unreachable ({type(exc).__name__}); training goes on, "
        "metrics are kept and sent when it is back"
    )


class RunLogger:
    """Logs into an existing run by id, from whichever process holds it (rank 0).

    Each epoch's metrics are logged once, with step = epoch, however often the worker group
    restarts: the epochs the run already has are read from MLflow before logging. While the server
    is unreachable nothing blocks training: what could not be sent is kept, in order, and sent
    at the next epoch that reaches the server, or handed to the driver at the end (`pending()`).
    """

    EPOCH_KEY = "val_top1_error"  # present in every logged epoch

    def __init__(self, run_id: str, tracking_uri: str, say: Callable[[str], None] = print, quick: bool = True) -> None:
        if quick:  # in a train worker: one try per call, no back-off, so an outage costs seconds, not minutes
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id, self.uri, self.say = run_id, tracking_uri, say
        self.client = MlflowClient(tracking_uri)
        self.logged: set[int] | None = None  # epochs the run has; read on first contact
        self.queue: list[dict[str, Any]] = []  # not yet sent, oldest first
        self.delayed = 0  # epochs sent after a failed flush
        self.restarts: int | None = None
        self.unreachable_since: float | None = None
        self.monitor = None
        self.monitor_interval: float | None = None  # set by start_system_metrics

    def log_epoch(self, epoch: int, metrics: dict[str, float] | None) -> None:
        if metrics and epoch >= 1:
            self.queue.append({"kind": "epoch", "step": epoch, "metrics": metrics, "late": False})
            self.flush()

    def count_attempt(self, step: int) -> int | None:
        """Record that the training function started (again); returns the restarts so far, if known yet."""
        # The id makes counting idempotent: an unsent attempt travels in checkpoints and in
        # unsent_metrics.json, and may reach the server more than once.
        self.queue.append({"kind": "attempt", "step": step, "late": False, "id": uuid.uuid4().hex[:12]})
        self.flush()
        return self.restarts

    def flush(self) -> int:
        """Send what is queued, in order; returns how many items are still waiting."""
        try:
            if self.logged is None:
                self.logged = {m.step for m in self.client.get_metric_history(self.run_id, self.EPOCH_KEY)}
            while self.queue:
                item = self.queue[0]
                sent = self._send(item)
                self.queue.pop(0)
                if sent and item["kind"] == "epoch" and item.get("late"):
                    self.delayed += 1
        except UNREACHABLE as exc:
            for item in self.queue:  # whatever is still queued missed this flush: it will arrive late
                item["late"] = True
            if self.unreachable_since is None:
                self.unreachable_since = time.time()
                self.say(_why_unsent(self.uri, exc))
            return len(self.queue)
        if self.unreachable_since is not None:
            self.say(f"MLflow is back after {time.time() - self.unreachable_since:.0f}s; delayed metrics sent")
            self.unreachable_since = None
            self._restart_monitor()
        return 0

    def pending(self) -> list[dict[str, Any]]:
        return list(self.queue)

    def requeue(self, items: list[dict[str, Any]]) -> None:
        """Queue what an earlier attempt could not send (from a checkpoint), before anything new."""
        self.queue[:0] = [dict(item) for item in items]

    def _send(self, item: dict[str, Any]) -> bool:
        """Log one queued item; False if the run already had it (sent before a restart or a resume)."""
        if item["kind"] == "attempt":
            tags = self.client.get_run(self.run_id).data.tags
            counted = tags.get("attempt_ids", "").split()
            if item.get("id") in counted:  # queued again from a checkpoint or unsent_metrics.json
                self.restarts = int(tags["attempts"]) - 1
                return False
            attempts = int(tags.get("attempts", "0")) + 1
            self.restarts = attempts - 1
            counted = [*counted, item.get("id", "")][-ATTEMPT_IDS_KEPT:]
            self.client.log_batch(
                self.run_id,
                metrics=[Metric("restarts", self.restarts, int(time.time() * 1000), item["step"])],
                tags=[
                    RunTag("attempts", str(attempts)),
                    RunTag("restarts", str(self.restarts)),
                    RunTag("attempt_ids", " ".join(counted)),
                ],
            )
            return True
        epoch = item["step"]
        if epoch in self.logged:
            return False
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in item["metrics"].items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged.add(epoch)
        return True

    # ---- system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) -------------------
    def start_system_metrics(self, interval: float = 10.0) -> None:
        self.monitor_interval = interval
        self._restart_monitor()

    def _restart_monitor(self) -> None:
        """(Re)start MLflow's monitor thread: it ends by itself when a request to the server fails."""
        if self.monitor_interval is None:
            return
        thread = self.monitor._process if self.monitor is not None else None
        if thread is not None and thread.is_alive():
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=self.monitor_interval, resume_logging=True, tracking_uri=self.uri
        )
        self.monitor.start()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


class NullLogger:
    """RunLogger's methods, doing nothing: what ranks other than 0 get, and every rank with --no-tracking."""

    delayed = 0
    restarts = None

    def log_epoch(self, epoch: int, metrics: dict[str, float] | None) -> None:
        pass

    def count_attempt(self, step: int) -> int | None:
        return None

    def flush(self) -> int:
        return 0

    def pending(self) -> list[dict[str, Any]]:
        return []

    def requeue(self, items: list[dict[str, Any]]) -> None:
        pass

    def start_system_metrics(self, interval: float = 10.0) -> None:
        pass

    def close(self) -> None:
        pass
