"""What the driver hands the train workers, and what every checkpoint says about itself.

RunSpec         driver → every train worker (frozen): the config, the dataset's classes and
                colour statistics, the normalisation, where the run lives, its MLflow run
Progress        where training stands: epochs done, steps into the next, validation history
CheckpointMeta  a checkpoint's meta.json: the model's description (from the RunSpec), the
                Progress, the epoch's metrics, and the metrics MLflow has not had yet
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import TrainConfig
from pipeline.data.imagenet import ClassInfo
from pipeline.data.stats import PUBLISHED, ColourStats
from pipeline.storage import Location


@dataclass(frozen=True)
class RunSpec:
    config: TrainConfig
    classes: tuple[ClassInfo, ...]
    colour: ColourStats  # the dataset's stats.json, or the published ImageNet values
    normalization: tuple[np.ndarray, np.ndarray]  # (mean, std): per channel, or the mean image (read by the driver)
    train_images: int
    image_size: int  # the stored squares' side: what inference resizes to
    dataset_hash: str
    run_dir: Location  # carries the driver's S3 settings to the workers
    run_id: str | None  # None with --no-tracking
    tracking_uri: str | None
    watchdog: Any = None  # the driver's pipeline.cluster.watchdog.LastBatch actor: told when batches arrive


@dataclass(frozen=True)
class Progress:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # steps of the next epoch done (a mid-epoch checkpoint), else 0
    global_step: int = 0
    val_errors: tuple[float, ...] = ()  # val top-1 error per finished epoch: the lr schedule's input
    best: dict[str, float] | None = None  # epoch, val_top1_error, val_top5_error of the best epoch so far
    partial_sums: tuple[float, ...] | None = None  # a mid-epoch checkpoint's sums over every rank so far
    step_batch: int = 0  # the global batch of those step_in_epoch steps (the world size may change after)
    world_sizes: tuple[int, ...] = ()  # train workers per finished epoch (the last they had, if it changed)
    history: tuple[dict[str, float], ...] = ()  # each finished epoch's metrics: the training curves

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Progress:
        partial = values["partial_sums"]
        return cls(
            epoch=values["epoch"],
            step_in_epoch=values["step_in_epoch"],
            global_step=values["global_step"],
            val_errors=tuple(values["val_errors"]),
            best=values["best"],
            partial_sums=tuple(partial) if partial is not None else None,
            step_batch=values["step_batch"],
            world_sizes=tuple(values["world_sizes"]),
            history=tuple(values["history"]),
        )


@dataclass(frozen=True)
class CheckpointMeta:
    config: TrainConfig
    classes: tuple[ClassInfo, ...]
    progress: Progress = field(default_factory=Progress)
    colour: ColourStats = PUBLISHED
    run_id: str | None = None
    dataset_hash: str = ""
    image_size: int = 0  # the stored squares' side: what inference resizes to
    epoch_metrics: dict[str, float] | None = None  # the epoch this checkpoint ends; None mid-epoch
    unsent_metrics: tuple[dict[str, Any], ...] = ()  # what the MLflow server missed before the checkpoint

    @classmethod
    def of(cls, spec: RunSpec, progress: Progress, epoch_metrics=None, unsent_metrics=()) -> CheckpointMeta:
        return cls(
            spec.config, spec.classes, progress, spec.colour, spec.run_id, spec.dataset_hash, spec.image_size,
            epoch_metrics, tuple(unsent_metrics),
        )  # fmt: skip

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    def to_json(self) -> str:
        values = {
            "progress": self.progress.to_dict(),
            "epoch_metrics": self.epoch_metrics,
            "config": self.config.to_dict(),
            "classes": [dataclasses.asdict(c) for c in self.classes],
            "colour": dataclasses.asdict(self.colour),
            "run_id": self.run_id,
            "dataset_hash": self.dataset_hash,
            "image_size": self.image_size,
            "unsent_metrics": list(self.unsent_metrics),
        }
        return json.dumps(values, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        values = json.loads(text)
        return cls(
            config=TrainConfig.from_dict(values["config"]),
            classes=tuple(ClassInfo(**c) for c in values["classes"]),
            progress=Progress.from_dict(values["progress"]),
            colour=ColourStats(**values["colour"]),
            run_id=values["run_id"],
            dataset_hash=values["dataset_hash"],
            image_size=values["image_size"],
            epoch_metrics=values["epoch_metrics"],
            unsent_metrics=tuple(values["unsent_metrics"]),
        )


@dataclass(frozen=True)
class Outcome:
    """What the train workers hand back to the driver (rank 0's view); the best checkpoint is Ray Train's."""

    restarts: int | None  # None: not known (no tracking, or MLflow unreachable)
    unsent_metrics: list[dict[str, Any]]  # the server was away at the end: the driver sends these
    delayed_epochs: int  # epochs whose metrics reached MLflow late
    world_sizes: tuple[int, ...] = ()  # train workers per epoch
    diverged: str | None = None  # why training stopped being finite (every rank stopped there); None: it did not
    history: tuple[dict[str, float], ...] = ()  # each finished epoch's metrics, restarts included
