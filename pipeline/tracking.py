"""MLflow: one run per training job, created by the driver, written to by rank 0, closed by the driver.

The driver creates the run and logs the config as params; rank 0 logs each epoch's metrics into
that run by id (``RunLogger``; other ranks get ``NullLogger``, so the loop has no rank branches);
at the end the driver logs the best checkpoint's model and registers it.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.config import TrainConfig
from pipeline.data.shards import CLASSES_FILE, STATS_FILE, PreparedDataset
from pipeline.data.stats import ColourStats

MODEL_ARTIFACT = "model"


def resolve_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow's default, with a relative sqlite path made absolute.

    Train workers run in other processes (and directories), so they must get an absolute URI.
    """
    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


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
    tags = {"mlflow.runName": run_name, **provenance(cfg, data)}
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
    restarts: the epochs the run already has are read from MLflow before logging.
    """

    EPOCH_KEY = "val_top1_error"  # present in every logged epoch

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)
        self.logged = {m.step for m in self.client.get_metric_history(run_id, self.EPOCH_KEY)}

    def log_epoch(self, epoch: int, metrics: dict[str, float] | None) -> None:
        if not metrics or epoch < 1 or epoch in self.logged:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged.add(epoch)

    def count_attempt(self, step: int) -> int:
        """Record that the training function started again; returns the restarts so far."""
        run = self.client.get_run(self.run_id)
        attempts = int(run.data.tags.get("attempts", "0")) + 1
        restarts = attempts - 1
        self.client.log_batch(
            self.run_id,
            metrics=[Metric("restarts", restarts, int(time.time() * 1000), step)],
            tags=[RunTag("attempts", str(attempts)), RunTag("restarts", str(restarts))],
        )
        return restarts


class NullLogger:
    """RunLogger's methods, doing nothing: what ranks other than 0 get."""

    def log_epoch(self, epoch: int, metrics: dict[str, float] | None) -> None:
        pass

    def count_attempt(self, step: int) -> int:
        return 0


def signature(crop: int, num_classes: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, crop, crop, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


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
    as dynamic); the class index and preprocessing travel with it as extra files.
    Returns the registered version.
    """
    crop = input_example.shape[1]
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
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model.eval(),
                name=MODEL_ARTIFACT,
                serialization_format="pt2",
                signature=signature(crop, data.num_classes),
                input_example=input_example,
                extra_files=[str(classes), str(preprocessing)],
                registered_model_name=cfg.model_name,
                await_registration_for=60,
            )
            mlflow.log_artifact(str(classes))
            mlflow.log_text(cfg.to_json(), "config.json")
            mlflow.set_tags({"best_epoch": best["epoch"], "registered_version": info.registered_model_version})
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key in ("val_top1_error", "val_top5_error"):
        client.set_model_version_tag(cfg.model_name, version, key, f"{best[key]:.4f}")
    client.set_model_version_tag(cfg.model_name, version, "dataset_hash", data.dataset_hash)
    return version


def reopen_run(run_id: str) -> None:
    """Mark a stopped run as running again (--resume): its params and metrics stay as they were."""
    MlflowClient().update_run(run_id, status="RUNNING")


def finish_run(run_id: str, status: str) -> None:
    """Close the run as FINISHED, FAILED or KILLED."""
    MlflowClient().set_terminated(run_id, status=status)
