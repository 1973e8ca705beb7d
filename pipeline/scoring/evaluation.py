"""Top-1 and top-5 error on the validation shards, with the centre crop and the paper's 10 crops.

    read val shards → decode, test views (CPU tasks) → model actors (each loads the model once)
                    → per image: its label, top-1 answer, correct@1 and correct@5 per protocol
                    → counted on the driver: errors overall and per class, the confusion matrix

The 10-crop protocol (the paper's section 4.1): the four corner crops and the centre crop of the
stored square and their horizontal reflections, softmax averaged over the ten. The centre-crop
row uses the centre view alone, so one pass gives both. The model is a ``loading.ModelRef``: a
registered version or a checkpoint directory, resolved once by the caller.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.data import ActorPoolStrategy

from pipeline.data.imagenet import ClassInfo
from pipeline.data.shards import PreparedDataset, open_dataset, read_shards
from pipeline.data.transforms import eval_batch, ten_crop_batch
from pipeline.errors import InputError
from pipeline.scoring.pool import ONE_ACTOR, Pool
from pipeline.scoring.predictor import ModelRef, Predictor, ship
from pipeline.storage import Location

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
    out = {"label": labels.cpu().numpy()}
    finite = torch.isfinite(probs).flatten(1).all(dim=1)  # NaN logits still rank classes: never a hit
    for name, p in protocols.items():
        top5 = p.topk(min(5, p.shape[1]), dim=1).indices
        out[f"{name}_top1"] = ((top5[:, 0] == labels) & finite).long().cpu().numpy()
        out[f"{name}_top5"] = ((top5 == labels[:, None]).any(dim=1) & finite).long().cpu().numpy()
        out[f"{name}_pred"] = torch.where(finite, top5[:, 0], -1).cpu().numpy()  # -1: not finite, no class
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


@dataclass
class Evaluation:
    """A model on a dataset's validation split: per protocol (centre, ten_crop) the errors over all
    images, per class, and where its top-1 answers went."""

    protocols: dict[str, dict[str, Any]]  # protocol → images, top1_error, top5_error, nonfinite
    classes: list[ClassInfo]
    per_class: dict[str, np.ndarray]  # protocol → (classes, 3): images, top-1 hits, top-5 hits
    confusion: dict[str, np.ndarray]  # protocol → (classes, classes): true class (row) → top-1 answer (column)

    @property
    def main(self) -> str:
        """The protocol the per-class views show: the paper's 10 crops where they were run."""
        return "ten_crop" if "ten_crop" in self.protocols else "centre"

    def class_errors(self) -> list[dict[str, Any]]:
        """One row per class: wnid, name, images, and top-1 / top-5 error per protocol."""
        rows = []
        for c in self.classes:
            row: dict[str, Any] = {"wnid": c.wnid, "name": c.name, "images": int(self.per_class["centre"][c.index, 0])}
            for p, counts in self.per_class.items():
                images, top1, top5 = counts[c.index]
                row[f"{p}_top1_error"] = 1 - top1 / images if images else None
                row[f"{p}_top5_error"] = 1 - top5 / images if images else None
            rows.append(row)
        return rows

    def worst(self, n: int = 5) -> list[dict[str, Any]]:
        """The `n` classes with the highest top-1 error under the main protocol."""
        key = f"{self.main}_top1_error"
        return sorted((r for r in self.class_errors() if r[key] is not None), key=lambda r: -r[key])[:n]


def evaluate(
    ref: ModelRef,
    data: str | PreparedDataset,
    ten_crop: bool = False,
    batch_size: int = 64,
    pool: Pool = ONE_ACTOR,
) -> Evaluation:
    """Every validation image scored once; the counts gathered on the driver (a few integers per image)."""
    dataset = data if isinstance(data, PreparedDataset) else open_dataset(data)
    check(ref, dataset)
    views = ten_crop_batch if ten_crop else _centre_view_batch
    scored = (
        read_shards(dataset.split_dir("val"))
        .map_batches(views, fn_kwargs={"crop": ref.crop}, batch_size=VIEW_BATCH, batch_format="numpy")
        .map_batches(
            Predictor,
            fn_constructor_kwargs={"ref": ship(ref), "keep": hits},
            compute=ActorPoolStrategy(min_size=pool.smallest, max_size=pool.largest),
            batch_size=batch_size,
            num_gpus=pool.gpus,
            batch_format="numpy",
        )
    )
    protocols = ["centre", "ten_crop"] if ten_crop else ["centre"]
    classes = len(dataset.classes)
    per_class = {p: np.zeros((classes, 3), dtype=np.int64) for p in protocols}
    confusion = {p: np.zeros((classes, classes), dtype=np.int64) for p in protocols}
    nonfinite = 0
    for batch in scored.iter_batches(batch_size=4096, batch_format="numpy"):
        labels = batch["label"].astype(np.int64)
        nonfinite += int(batch["nonfinite"].sum())
        for p in protocols:
            np.add.at(per_class[p], (labels, 0), 1)
            np.add.at(per_class[p], (labels, 1), batch[f"{p}_top1"])
            np.add.at(per_class[p], (labels, 2), batch[f"{p}_top5"])
            answered = batch[f"{p}_pred"] >= 0
            np.add.at(confusion[p], (labels[answered], batch[f"{p}_pred"][answered].astype(np.int64)), 1)
    n = int(per_class["centre"][:, 0].sum())
    if n != dataset.count("val"):
        raise EvaluationError(f"scored {n} of the {dataset.count('val')} validation images of {dataset.uri}")
    totals = {
        p: {
            "images": n,
            "top1_error": 1 - per_class[p][:, 1].sum() / n,
            "top5_error": 1 - per_class[p][:, 2].sum() / n,
            "nonfinite": nonfinite,  # images whose probabilities were not finite: counted wrong
        }
        for p in protocols
    }
    return Evaluation(totals, list(dataset.classes), per_class, confusion)


PROTOCOL_NAMES = {"centre": "centre crop", "ten_crop": "10 crops"}


def table(model: str, results: dict[str, dict[str, Any]]) -> str:
    """The paper's table: model | top-1 error | top-5 error, one row per protocol."""
    rows = [
        f"| {model}, {PROTOCOL_NAMES[p]} | {r['top1_error']:.3f} | {r['top5_error']:.3f} |" for p, r in results.items()
    ]
    return "\n".join(["| model | top-1 error | top-5 error |", "| --- | --- | --- |", *rows])


LABELLED_CLASSES = 40  # a confusion picture names its classes up to this many


def files(ref: ModelRef, dataset: PreparedDataset, result: Evaluation) -> dict[str, bytes]:
    """What an evaluation leaves: the table, the numbers, the per-class errors and the confusion picture."""
    record = {"model": ref.uri, "model_version": ref.version, "dataset": dataset.uri}
    record.update(dataset_hash=dataset.dataset_hash, results=result.protocols)
    per_class = io.StringIO()
    rows = result.class_errors()
    writer = csv.DictWriter(per_class, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return {
        "evaluation.md": (
            table(ref.uri, result.protocols) + f"\n\ndataset {dataset.uri} ({dataset.dataset_hash})\n"
        ).encode(),
        "evaluation.json": (json.dumps(record, indent=1) + "\n").encode(),
        "per_class.csv": per_class.getvalue().encode(),
        "confusion.png": confusion_png(result, f"{ref.uri}, {PROTOCOL_NAMES[result.main]}"),
    }


def confusion_png(result: Evaluation, title: str) -> bytes:
    """The main protocol's confusion matrix, each true class's row as shares of its images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = result.confusion[result.main].astype(np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + len(result.classes) * 0.35, 16)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="share of the true class's images")
    if len(result.classes) <= LABELLED_CLASSES:
        names = [c.name.split(",")[0] for c in result.classes]
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="top-1 answer", ylabel="true class", title=title)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def write(output: Location, written: dict[str, bytes]) -> None:
    """The evaluation's files into `output` (a folder or s3:// prefix), each whole."""
    output.fs.create_dir(output.path, recursive=True)
    for name, data in written.items():
        output.join(name).write_bytes(data)


def log_to_run(ref: ModelRef, result: Evaluation, written: dict[str, bytes]) -> None:
    """Metrics eval_<protocol>_top1_error/_top5_error and the files under evaluation/, in the model's MLflow run."""
    from mlflow import MlflowClient  # here: the model actors import this module, and need no MLflow

    client = MlflowClient(ref.tracking_uri)
    for p, r in result.protocols.items():
        for k in ("top1_error", "top5_error"):
            client.log_metric(ref.run_id, f"eval_{p}_{k}", r[k])
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in written.items():
            Path(tmp, name).write_bytes(data)
        client.log_artifacts(ref.run_id, tmp, "evaluation")


def _centre_view_batch(batch: dict[str, np.ndarray], crop: int) -> dict[str, np.ndarray]:
    out = eval_batch(batch, crop)
    return {"image": out["image"][:, None], "label": out["label"]}
