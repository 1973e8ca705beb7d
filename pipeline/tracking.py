"""MLflow: one run per training job, created by the driver, written to by rank 0, closed by the driver.

The driver creates the run and logs the config as params; rank 0 logs each epoch's metrics into
that run by id (``RunLogger``; other ranks get ``NullLogger``, so the loop has no rank branches);
at the end the driver logs the best checkpoint's model and registers it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.config import TrainConfig
from pipeline.data.shards import CLASSES_FILE, STATS_FILE, PreparedDataset
from pipeline.data.stats import ColourStats
from pipeline.errors import InputError
from pipeline.mlflow_server import healthy

MODEL_ARTIFACT = "model"
CURVES_FILE = "training_curves.png"
# What reaches the train workers through the runtime env (they may run on other nodes): where
# MLflow is, how to authenticate to it, and how to reach S3. Values never go into params or tags.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
)  # fmt: skip
ATTEMPT_IDS_KEPT = 500  # the newest attempts' ids in the run's attempt_ids tag (MLflow keeps 8,000 characters)
# Network errors while the server is away: MLflow wraps most in MlflowException (ConnectionError is an OSError).
UNREACHABLE = (MlflowException, OSError)


class TrackingError(InputError):
    """The MLflow server cannot be used: the message names it and what to do."""


def resolve_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow's default, with a relative sqlite path made absolute.

    Train workers run in other processes (and directories), so they must get an absolute URI.
    """
    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def redact(uri: str) -> str:
    """The URI without user:password@ (what logs, run records and summaries show)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password and not parts.username:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str) -> None:
    """Fail fast, before any cluster work, when the tracking server does not answer or refuses us."""
    if not is_server(uri):
        return
    shown = redact(uri)
    if not healthy(uri, timeout=5):
        raise TrackingError(
            f"the MLflow tracking server at {shown} does not answer. Start it (`make mlflow`), point "
            "MLFLOW_TRACKING_URI at a running one, or train without tracking with --no-tracking"
        )
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        raise TrackingError(f"the MLflow tracking server at {shown} refused a request: {exc.message}") from exc


def worker_env(tracking_uri: str) -> dict[str, str]:
    """Variables the train workers need, minus those a `ray job submit` runtime env already sets.

    (Ray refuses a driver runtime env that repeats a key of the job's.)
    """
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    return {k: v for k, v in env.items() if k not in taken}


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(cfg: TrainConfig, data: PreparedDataset) -> dict[str, str]:
    return {
        "profile": cfg.profile,
        "dataset_hash": data.dataset_hash,
        "dataset_root": data.uri,
        "num_classes": str(data.num_classes),
        "git_commit": git_commit(),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }


def start_run(cfg: TrainConfig, data: PreparedDataset, run_name: str, colour: ColourStats) -> str:
    """Create the job's run and log its params and the colour statistics it uses; returns the run id."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    tags = {
        "mlflow.runName": run_name,
        "mlflow.note.content": (
            f"AlexNet, profile {cfg.profile}: {cfg.epochs} epochs on {data.uri} ({data.num_classes} classes, "
            f"{data.count('train'):,} training images), global batch {cfg.global_batch}, {cfg.workers} worker(s)"
        ),
        **provenance(cfg, data),
    }
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    params = {
        **cfg.to_dict(),
        "global_batch": cfg.global_batch,
        "scaled_lr": cfg.scaled_lr,
        "num_classes": data.num_classes,
        "train_images": data.count("train"),
        "val_images": data.count("val"),
        "image_size": data.image_size,
        "colour_stats": colour.source,
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
    client.log_dict(run.info.run_id, dataclasses.asdict(colour), STATS_FILE)
    return run.info.run_id


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
                self.say(
                    f"MLflow at {redact(self.uri)} is unreachable ({type(exc).__name__}); training goes on, "
                    "metrics are kept and sent when it is back"
                )
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


def signature(crop: int, num_classes: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, crop, crop, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


MODEL_DESCRIPTION = """AlexNet (Krizhevsky, Sutskever & Hinton, 2012), single-column layout, trained with Ray Train.

Input: uint8 RGB crops, NHWC, shape (N, crop, crop, 3), pixels 0..255: the centre crop of an image
resized so its short side is the dataset's image size (see preprocessing.json in the model's files).
Normalisation happens inside the model. Output: float32 logits (N, classes) in the order of
classes.json; apply softmax for probabilities. Any batch size.

Load: mlflow.pytorch.load_model("models:/{name}@champion"). The @champion alias is the version in
production; @challenger is the latest that did not beat it on the same dataset."""


def log_and_register(
    run_id: str,
    model: torch.nn.Module,
    input_example: np.ndarray,
    cfg: TrainConfig,
    data: PreparedDataset,
    best: dict[str, Any],
) -> str:
    """Log `model` (an ImageClassifier) to the run as a torch.export program and register it.

    pt2 needs no project code to load and runs any batch size (the batch dimension is exported
    as dynamic); the class index and preprocessing travel with it as extra files. The run gets the
    training curves, the class index and the config; the version gets a description and tags that
    say how it was made. Returns the registered version.
    """
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    crop = input_example.shape[1]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log_model re-reads the model
    with tempfile.TemporaryDirectory() as tmp:
        classes = Path(tmp, CLASSES_FILE)
        classes.write_bytes(data.root.join(CLASSES_FILE).read_bytes())
        preprocessing = Path(tmp, "preprocessing.json")
        preprocessing.write_text(
            json.dumps(
                {
                    "input": "uint8 RGB images, NHWC, pixels 0..255",
                    "resize_short_side": data.image_size,
                    "center_crop": crop,
                    "output": "logits over classes.json's indices (apply softmax for probabilities)",
                },
                indent=1,
            )
        )
        curves = Path(tmp, CURVES_FILE)
        plot_training_curves(client, run_id, curves, title=f"{cfg.model_name}: run {run_id[:8]}")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model.eval(),
                name=MODEL_ARTIFACT,
                serialization_format="pt2",
                signature=signature(crop, data.num_classes),
                input_example=input_example,
                extra_files=[str(classes), str(preprocessing)],
                # Stated, not inferred: inference loads the 228 MB program again in a subprocess
                # to see what it imports (~10 s per registration); a pt2 program needs torch alone.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
                registered_model_name=cfg.model_name,
                await_registration_for=60,
            )
            mlflow.log_artifact(str(classes))
            mlflow.log_artifact(str(curves))
            mlflow.log_text(cfg.to_json(), "config.json")
            mlflow.set_tags({"best_epoch": best["epoch"], "registered_version": info.registered_model_version})
    version = str(info.registered_model_version)
    client.update_registered_model(cfg.model_name, MODEL_DESCRIPTION.format(name=cfg.model_name))
    client.update_model_version(
        cfg.model_name,
        version,
        f"val top-1 error {best['val_top1_error']:.4f}, top-5 error {best['val_top5_error']:.4f} (centre crop, "
        f"best epoch {best['epoch']} of {cfg.epochs}); dataset {data.uri} ({data.num_classes} classes, "
        f"{data.count('train'):,} train / {data.count('val'):,} val images, manifest {data.dataset_hash[:12]}); "
        f"profile {cfg.profile}, global batch {cfg.global_batch}, {cfg.workers} worker(s)",
    )
    tags = {
        **provenance(cfg, data),
        "run_id": run_id,
        "epochs": str(cfg.epochs),
        "best_epoch": str(best["epoch"]),
        "val_top1_error": f"{best['val_top1_error']:.4f}",
        "val_top5_error": f"{best['val_top5_error']:.4f}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    return version


def plot_training_curves(client: MlflowClient, run_id: str, path: Path, title: str) -> None:
    """Loss and top-1/top-5 error per epoch, train and val, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def series(key: str) -> tuple[list[int], list[float]]:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        return [p[0] for p in points], [p[1] for p in points]

    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
        loss_ax.plot(*series(f"{split}_loss"), color=colour, marker=".", label=split)
        err_ax.plot(*series(f"{split}_top1_error"), color=colour, marker=".", label=f"{split} top-1")
        err_ax.plot(*series(f"{split}_top5_error"), color=colour, marker=".", linestyle="--", label=f"{split} top-5")
    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    err_ax.set(title="error", xlabel="epoch", ylabel="error rate", ylim=(0, 1))
    for ax in (loss_ax, err_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_pending(run_id: str, pending: list[dict[str, Any]]) -> int:
    """Send what rank 0 could not (the server was away), with MLflow's normal retries; returns the epochs sent."""
    logger = RunLogger(run_id, mlflow.get_tracking_uri(), quick=False)
    logger.queue = [dict(item) for item in pending]
    left = logger.flush()
    if left:
        raise TrackingError(
            f"the MLflow server at {redact(logger.uri)} is still unreachable: {left} metric batches unsent"
        )
    return logger.delayed


def reopen_run(run_id: str) -> None:
    """Mark a stopped run as running again (--resume): its params and metrics stay as they were."""
    MlflowClient().update_run(run_id, status="RUNNING")


def finish_run(run_id: str, status: str) -> None:
    """Close the run as FINISHED, FAILED or KILLED."""
    MlflowClient().set_terminated(run_id, status=status)
