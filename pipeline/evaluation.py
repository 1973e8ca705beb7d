"""Top-1 and top-5 error on the validation shards, with the centre crop and the paper's 10 crops.

    read val shards → decode, test views (CPU tasks) → model actors (each loads the model once)
                    → per image: correct@1 and correct@5 per protocol → summed by Ray Data

The 10-crop protocol (the paper's section 4.1): the four corner crops and the centre crop of the
stored square and their horizontal reflections, softmax averaged over the ten. The centre-crop
row uses the centre view alone, so one pass gives both. The model is a registered version
(``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) or a checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from ray.data import ActorPoolStrategy

from pipeline import checkpoint
from pipeline.data.shards import PreparedDataset, open_dataset
from pipeline.data.stats import PUBLISHED, normalization
from pipeline.data.transforms import eval_batch, ten_crop_batch
from pipeline.errors import InputError
from pipeline.ingest import read_shards
from pipeline.model import ImageClassifier

CENTRE_VIEW = 4  # the centre crop's index among ten_crop's views
VIEW_BATCH = 32  # images per decode task: 10 views of 224 pixels are 1.5 MB per image
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class EvaluationError(InputError):
    """A model or dataset evaluation cannot use; the message says what is wrong."""


@dataclass(frozen=True)
class ModelRef:
    uri: str  # as given: a models:/ URI or a checkpoint directory
    crop: int
    wnids: list[str]
    run_id: str | None  # the MLflow run the model came from
    tracking_uri: str
    normalization: tuple[np.ndarray, np.ndarray] | None = None  # a checkpoint's (mean, std), read by the driver
    names: tuple[str, ...] = ()  # class names, in the model's output order
    version: str | None = None  # the registered version a models:/ URI resolved to
    image_size: int = 0  # the short side images were resized to before cropping (the stored squares' side)


def resolve_model(spec: str, tracking_uri: str) -> ModelRef:
    """Check the model exists and read what evaluation needs of it, before any cluster work."""
    if spec.startswith("models:/"):
        match = MODEL_URI.match(spec)
        if not match:
            raise EvaluationError(f"{spec!r}: write models:/NAME/VERSION or models:/NAME@ALIAS")
        client = MlflowClient(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)  # get_model_info resolves models:/ URIs against it
        try:
            if match["version"]:
                version = client.get_model_version(match["name"], match["version"])
            else:
                version = client.get_model_version_by_alias(match["name"], match["alias"])
            info = mlflow.models.get_model_info(spec)
            with tempfile.TemporaryDirectory() as tmp:
                classes = mlflow.artifacts.download_artifacts(
                    f"runs:/{version.run_id}/classes.json", tracking_uri=tracking_uri, dst_path=tmp
                )
                index = json.loads(Path(classes).read_text())
            params = client.get_run(version.run_id).data.params
        except MlflowException as exc:
            raise EvaluationError(f"cannot load {spec} from {tracking_uri}: {exc.message}") from exc
        crop = int(info.signature.inputs.inputs[0].shape[1])
        wnids, names = [c["wnid"] for c in index], tuple(c.get("name", c["wnid"]) for c in index)
        size = int(params.get("image_size") or _default_size(crop))
        return ModelRef(spec, crop, wnids, version.run_id, tracking_uri, None, names, str(version.version), size)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise EvaluationError(f"model {spec!r} is neither a models:/ URI nor a checkpoint directory")
    meta = checkpoint.read_meta(path)
    colour = meta.get("colour") or dataclasses.asdict(PUBLISHED)
    mean_std = normalization(colour, meta["config"].get("normalize", "mean-std"), meta["config"]["crop"])
    wnids, names = [c["wnid"] for c in meta["classes"]], tuple(c.get("name", c["wnid"]) for c in meta["classes"])
    crop = meta["config"]["crop"]
    size = meta.get("image_size") or _default_size(crop)
    return ModelRef(str(path.resolve()), crop, wnids, meta.get("run_id"), tracking_uri, mean_std, names, None, size)


def _default_size(crop: int) -> int:
    """The paper's ratio (256 for 224) when a model does not say what its images were resized to."""
    return round(crop * 256 / 224)


def load(ref: ModelRef) -> torch.nn.Module:
    """uint8 NHWC crops → logits: the registered program, or a checkpoint wrapped as it would be registered."""
    if ref.uri.startswith("models:/"):
        mlflow.set_tracking_uri(ref.tracking_uri)
        # Into a directory of our own: without dst_path MLflow downloads each load to a fresh
        # temporary directory it never deletes (the model's size in /tmp, per actor, per job).
        with tempfile.TemporaryDirectory() as tmp:
            return mlflow.pytorch.load_model(ref.uri, dst_path=tmp)
    net, _ = checkpoint.load_model(ref.uri)
    mean, std = ref.normalization
    return ImageClassifier(net, mean, std).eval()


class Predictor:
    """A model actor: loads the model once, scores batches of test views."""

    def __init__(self, ref: ModelRef) -> None:
        self.model = load(ref)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            self.model = self.model.to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        views = torch.from_numpy(_writable(batch["image"])).to(self.device)  # (n, V, crop, crop, 3) uint8
        n, v = views.shape[:2]
        probs = torch.softmax(self.model(views.reshape(n * v, *views.shape[2:])).float(), dim=1).reshape(n, v, -1)
        labels = torch.from_numpy(_writable(batch["label"])).to(self.device)
        out = {}
        centre = CENTRE_VIEW if v == 10 else 0
        for name, p in (("centre", probs[:, centre]), ("ten_crop", probs.mean(dim=1))):
            if name == "ten_crop" and v != 10:
                continue
            top5 = p.topk(min(5, p.shape[1]), dim=1).indices
            out[f"{name}_top1"] = (top5[:, 0] == labels).long().cpu().numpy()
            out[f"{name}_top5"] = (top5 == labels[:, None]).any(dim=1).long().cpu().numpy()
        return out


def evaluate(
    model: str,
    data: str | PreparedDataset,
    ten_crop: bool = False,
    tracking_uri: str | None = None,
    batch_size: int = 64,
    replicas: int = 1,
    gpus_per_replica: float = 0,
) -> dict[str, dict[str, Any]]:
    """{"centre": {...}, "ten_crop": {...}}: images, top1_error, top5_error per protocol."""
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    ref = resolve_model(model, tracking_uri)
    dataset = data if isinstance(data, PreparedDataset) else open_dataset(data)
    if ref.wnids != [c.wnid for c in dataset.classes]:
        raise EvaluationError(
            f"{model} predicts {len(ref.wnids)} classes that are not {dataset.uri}'s {dataset.num_classes} "
            "(class indices differ); evaluate on the dataset it was trained on"
        )
    if ref.crop > dataset.image_size:
        raise EvaluationError(f"{model} takes {ref.crop}-pixel crops; {dataset.uri} stores {dataset.image_size}")
    views = ten_crop_batch if ten_crop else _centre_view_batch
    scored = (
        read_shards(dataset.split_dir("val"))
        .map_batches(views, fn_kwargs={"crop": ref.crop}, batch_size=VIEW_BATCH, batch_format="numpy")
        .map_batches(
            Predictor,
            fn_constructor_kwargs={"ref": ref},
            compute=ActorPoolStrategy(min_size=1, max_size=replicas),
            batch_size=batch_size,
            num_gpus=gpus_per_replica,
            batch_format="numpy",
        )
    )
    protocols = ["centre", "ten_crop"] if ten_crop else ["centre"]
    columns = [f"{p}_top{k}" for p in protocols for k in (1, 5)]
    sums = scored.sum(columns)
    n = dataset.count("val")
    return {
        p: {
            "images": n,
            "top1_error": 1 - sums[f"sum({p}_top1)"] / n,
            "top5_error": 1 - sums[f"sum({p}_top5)"] / n,
        }
        for p in protocols
    }


PROTOCOL_NAMES = {"centre": "centre crop", "ten_crop": "10 crops"}


def table(model: str, results: dict[str, dict[str, Any]]) -> str:
    """The paper's table: model | top-1 error | top-5 error, one row per protocol."""
    rows = [
        f"| {model}, {PROTOCOL_NAMES[p]} | {r['top1_error']:.3f} | {r['top5_error']:.3f} |" for p, r in results.items()
    ]
    return "\n".join(["| model | top-1 error | top-5 error |", "| --- | --- | --- |", *rows])


def log_to_run(ref: ModelRef, dataset: PreparedDataset, results: dict[str, dict[str, Any]]) -> None:
    """Metrics eval_<protocol>_top1_error/_top5_error and the table, in the model's MLflow run."""
    client = MlflowClient(ref.tracking_uri)
    metrics = {f"eval_{p}_{k}": r[k] for p, r in results.items() for k in ("top1_error", "top5_error")}
    for key, value in metrics.items():
        client.log_metric(ref.run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "evaluation.md").write_text(
            table(ref.uri, results) + f"\n\ndataset {dataset.uri} ({dataset.dataset_hash})\n"
        )
        Path(tmp, "evaluation.json").write_text(
            json.dumps({"model": ref.uri, "dataset_hash": dataset.dataset_hash, "results": results}, indent=1)
        )
        client.log_artifacts(ref.run_id, tmp, "evaluation")


def _writable(array: np.ndarray) -> np.ndarray:
    """Arrays from the object store are read-only views; torch wants memory it may write."""
    return array if array.flags.writeable else array.copy()


def _centre_view_batch(batch: dict[str, np.ndarray], crop: int) -> dict[str, np.ndarray]:
    out = eval_batch(batch, crop)
    return {"image": out["image"][:, None], "label": out["label"]}
