"""The driver's last step: log the best checkpoint's model to the run, register it, promote it.

best checkpoint → ImageClassifier (normalises as training did) → torch.export program (pt2)
                → MLflow run artifact + registered version (description, provenance tags)
                → @champion or @challenger (pipeline.tracking.registry decides)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.config import TrainConfig
from pipeline.data.shards import CLASSES_FILE, MANIFEST_FILE, PreparedDataset, inside
from pipeline.data.transforms import eval_batch
from pipeline.errors import TrainingDiverged
from pipeline.model import ImageClassifier
from pipeline.tracking.mlflow_client import provenance
from pipeline.tracking.registry import Registry
from pipeline.train import checkpoint
from pipeline.train.spec import RunSpec

MODEL_ARTIFACT = "model"


@dataclass(frozen=True)
class Registered:
    version: str
    alias: str  # champion or challenger
    reason: str  # why


def register(spec: RunSpec, data: PreparedDataset, ckpt_dir: str | Path, best: dict[str, Any]) -> Registered:
    """Register the checkpoint in `ckpt_dir` (the run's best) and give it @champion or @challenger.

    A checkpoint whose metrics or weights are not finite is refused (TrainingDiverged): a model
    with NaN weights still ranks classes (top-k of NaN logits returns indices), so its error
    rates look plausible while every probability it gives is NaN.
    """
    cfg = spec.config
    net, _ = checkpoint.load_model(ckpt_dir)
    check_finite(ckpt_dir, net, best)
    model = ImageClassifier(net, *spec.normalization).eval()  # normalises as training did
    version = log_and_register(spec.tracking_uri, spec.run_id, model, input_example(data, cfg.crop), cfg, data, best)
    decision = Registry(spec.tracking_uri).settle(cfg.model_name, version, cfg.promote)
    return Registered(version, decision.alias, decision.reason)


def check_finite(ckpt_dir: str | Path, net: torch.nn.Module, metrics: dict[str, Any]) -> None:
    """TrainingDiverged when a metric or a weight of the checkpoint is not finite."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    tensors = [name for name, t in net.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if tensors:
        bad.append(f"weights {', '.join(tensors[:3])}" + (" ..." if len(tensors) > 3 else ""))
    if bad:
        what = ", ".join(bad)
        raise TrainingDiverged(
            f"checkpoint {ckpt_dir} is not finite ({what}): it is not registered. Train again with a lower --lr, "
            "--clip-grad-norm or a longer --warmup-epochs"
        )


def input_example(data: PreparedDataset, crop: int) -> np.ndarray:
    """Two real validation crops: what the registered model's signature documents."""
    first = inside(data.root, data.manifest["splits"]["val"]["shards"][0]["file"], MANIFEST_FILE, under="val")
    rows = pq.read_table(first.path, filesystem=first.fs, columns=["image", "label"]).slice(0, 2).to_pydict()
    batch = {"image": np.array(rows["image"], dtype=object), "label": np.array(rows["label"])}
    return eval_batch(batch, crop)["image"]


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

Load: this project's pipeline.scoring.loading (resolve, then load) checks the version's files (data/model.pt2
alone, no code) and loads the checked bytes with torch.export.load. mlflow.pytorch.load_model imports
modules a version's files name: use it only for versions you trust. The @champion alias is the
version in production; @challenger is the latest that did not beat it on the same dataset."""


def log_and_register(
    tracking_uri: str,
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
    class index and the config (the driver logs the training curves); the version gets a description and tags that
    say how it was made. Returns the registered version.
    """
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    crop = input_example.shape[1]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log_model re-reads the model
    with tempfile.TemporaryDirectory() as tmp:
        classes, preprocessing = _model_files(Path(tmp), data, crop)
        with _tracking_at(tracking_uri):
            info = mlflow.pytorch.log_model(
                model.eval(),
                run_id=run_id,
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
        version = str(info.registered_model_version)
        client.log_artifact(run_id, str(classes))
        client.log_text(run_id, cfg.to_json(), "config.json")
        client.set_tag(run_id, "best_epoch", best["epoch"])
        client.set_tag(run_id, "registered_version", version)
    _describe_version(client, version, cfg, data, best, run_id)
    return version


def _model_files(directory: Path, data: PreparedDataset, crop: int) -> tuple[Path, Path]:
    """classes.json and preprocessing.json: what travels with the registered program."""
    classes = directory / CLASSES_FILE
    classes.write_bytes(data.root.join(CLASSES_FILE).read_bytes())
    preprocessing = directory / "preprocessing.json"
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
    return classes, preprocessing


def _describe_version(
    client: MlflowClient, version: str, cfg: TrainConfig, data: PreparedDataset, best: dict[str, Any], run_id: str
) -> None:
    """The registered model's description, and the version's: how it was made, in words and in tags."""
    client.update_registered_model(cfg.model_name, MODEL_DESCRIPTION.format(name=cfg.model_name))
    client.update_model_version(
        cfg.model_name,
        version,
        f"val top-1 error {best['val_top1_error']:.4f}, top-5 error {best['val_top5_error']:.4f} (centre crop, "
        f"best epoch {best['epoch']} of {cfg.epochs}); dataset {data.uri} ({data.num_classes} classes, "
        f"{data.count('train'):,} train / {data.count('val'):,} val images, manifest {data.dataset_hash[:12]}); "
        f"profile {cfg.profile}, global batch {cfg.global_batch}, {cfg.workers_shown}",
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


@contextmanager
def _tracking_at(uri: str) -> Iterator[None]:
    """MLflow's tracking URI (and with it the registry's) set to `uri` for the duration, then as it was.

    mlflow.pytorch.log_model (MLflow 3.17) logs, creates the logged model and registers the version
    through MLflow's global tracking URI only; it has no argument for it. This is the one place the
    project touches that global state.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
