"""Top-1 and top-5 error on the validation shards, with the centre crop and the paper's 10 crops.

    read val shards → decode, test views (CPU tasks) → model actors (each loads the model once)
                    → per image: correct@1 and correct@5 per protocol → summed by Ray Data

The 10-crop protocol (the paper's section 4.1): the four corner crops and the centre crop of the
stored square and their horizontal reflections, softmax averaged over the ten. The centre-crop
row uses the centre view alone, so one pass gives both. The model is a ``serving.ModelRef``: a
registered version or a checkpoint directory, resolved once by the caller.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from ray.data import ActorPoolStrategy

from pipeline.data.shards import PreparedDataset, open_dataset, read_shards
from pipeline.data.transforms import eval_batch, ten_crop_batch
from pipeline.errors import InputError
from pipeline.scoring.loading import ModelRef, Predictor, ship

CENTRE_VIEW = 4  # the centre crop's index among ten_crop's views
VIEW_BATCH = 32  # images per decode task: 10 views of 224 pixels are 1.5 MB per image


class EvaluationError(InputError):
    """A model or dataset evaluation cannot use; the message says what is wrong."""


def hits(probs: torch.Tensor, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: correct at top-1 and top-5, with the centre view alone and (ten views) softmax averaged."""
    labels = torch.from_numpy(np.array(batch["label"], dtype=np.int64)).to(probs.device)  # a copy: writable
    views = probs.shape[1]
    protocols = {"centre": probs[:, CENTRE_VIEW if views == 10 else 0]}
    if views == 10:
        protocols["ten_crop"] = probs.mean(dim=1)
    out = {}
    finite = torch.isfinite(probs).flatten(1).all(dim=1)  # NaN logits still rank classes: never a hit
    for name, p in protocols.items():
        top5 = p.topk(min(5, p.shape[1]), dim=1).indices
        out[f"{name}_top1"] = ((top5[:, 0] == labels) & finite).long().cpu().numpy()
        out[f"{name}_top5"] = ((top5 == labels[:, None]).any(dim=1) & finite).long().cpu().numpy()
    out["nonfinite"] = (~finite).long().cpu().numpy()
    return out


def check(ref: ModelRef, dataset: PreparedDataset) -> None:
    """EvaluationError unless the model predicts the dataset's classes, in its order, and fits its images."""
    if ref.wnids != [c.wnid for c in dataset.classes]:
        raise EvaluationError(
            f"{ref.uri} predicts {len(ref.wnids)} classes that are not {dataset.uri}'s {dataset.num_classes} "
            "(class indices differ); evaluate on the dataset it was trained on"
        )
    if ref.crop > dataset.image_size:
        raise EvaluationError(f"{ref.uri} takes {ref.crop}-pixel crops; {dataset.uri} stores {dataset.image_size}")


def evaluate(
    ref: ModelRef,
    data: str | PreparedDataset,
    ten_crop: bool = False,
    batch_size: int = 64,
    replicas: int = 1,
    gpus_per_replica: float = 0,
) -> dict[str, dict[str, Any]]:
    """{"centre": {...}, "ten_crop": {...}}: images, top1_error, top5_error per protocol."""
    dataset = data if isinstance(data, PreparedDataset) else open_dataset(data)
    check(ref, dataset)
    views = ten_crop_batch if ten_crop else _centre_view_batch
    scored = (
        read_shards(dataset.split_dir("val"))
        .map_batches(views, fn_kwargs={"crop": ref.crop}, batch_size=VIEW_BATCH, batch_format="numpy")
        .map_batches(
            Predictor,
            fn_constructor_kwargs={"ref": ship(ref), "keep": hits},
            compute=ActorPoolStrategy(min_size=1, max_size=replicas),
            batch_size=batch_size,
            num_gpus=gpus_per_replica,
            batch_format="numpy",
        )
    )
    protocols = ["centre", "ten_crop"] if ten_crop else ["centre"]
    columns = [f"{p}_top{k}" for p in protocols for k in (1, 5)] + ["nonfinite"]
    sums = scored.sum(columns)
    n = dataset.count("val")
    return {
        p: {
            "images": n,
            "top1_error": 1 - sums[f"sum({p}_top1)"] / n,
            "top5_error": 1 - sums[f"sum({p}_top5)"] / n,
            "nonfinite": int(sums["sum(nonfinite)"]),  # images whose probabilities were not finite: counted wrong
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
            json.dumps(
                {
                    "model": ref.uri,
                    "model_version": ref.version,
                    "dataset_hash": dataset.dataset_hash,
                    "results": results,
                },
                indent=1,
            )
        )
        client.log_artifacts(ref.run_id, tmp, "evaluation")


def _centre_view_batch(batch: dict[str, np.ndarray], crop: int) -> dict[str, np.ndarray]:
    out = eval_batch(batch, crop)
    return {"image": out["image"][:, None], "label": out["label"]}
