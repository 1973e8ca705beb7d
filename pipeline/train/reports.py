"""The lines rank 0 prints for the user, and keeping them whole in the driver's log.

Ray forwards every worker's output to the driver and folds lines that differ only in their numbers
and come from different processes within 5 s into one "[repeated Nx across cluster]" line. A run
that restarts prints its next epochs from new worker processes, so after a restart short epochs
would vanish from the log: the train job exempts these lines (`keep_whole`) before Ray is imported.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import TrainConfig

ALLOW_ENV = "RAY_DEDUP_LOGS_ALLOW_REGEX"  # read once, when Ray is imported
REPORT_LINES = (
    r"^(epoch +\d+/\d+  lr |\d+ train worker\(s\) of \d+\.\.\d+: |stopping: training diverged |resumed from "
    r"|node .+ announced its preemption \(ranks |  epoch +\d+/\d+  step )"
)


def keep_whole(environ: MutableMapping[str, str] = os.environ) -> None:
    """Exempt the report lines from Ray's folding of repeated lines, beside any pattern already set.
    Effective only before `ray` is first imported in this process."""
    theirs = environ.get(ALLOW_ENV)
    if theirs and REPORT_LINES in theirs:
        return
    environ[ALLOW_ENV] = f"(?:{theirs})|{REPORT_LINES}" if theirs else REPORT_LINES


def epoch_line(epochs: int, m: Mapping[str, float], eta: float) -> str:
    from pipeline.metrics import format_duration  # with torch: the job imports this module before it

    return (
        f"epoch {m['epoch']:>3}/{epochs}  lr {m['lr']:.2g}  train loss {m['train_loss']:.3f}  "
        f"top-1 err {m['train_top1_error']:.3f}  |  val loss {m['val_loss']:.3f}  top-1 err {m['val_top1_error']:.3f}"
        f"  top-5 err {m['val_top5_error']:.3f}  |  {m['images_per_s']:,.0f} img/s  "
        f"data wait {m['data_wait_fraction']:.0%}  |  {format_duration(m['epoch_seconds'])}/epoch  "
        f"ETA {format_duration(eta)}"
    )


def progress_line(epoch: int, epochs: int, step: int, steps: int, images_per_s: float, loss: float, left: float) -> str:
    """Inside a long epoch: where it is, how fast, the running loss, when the epoch ends (`left` seconds)."""
    from pipeline.metrics import format_duration

    return (
        f"  epoch {epoch:>3}/{epochs}  step {step:,}/{steps:,}  {images_per_s:,.0f} img/s  "
        f"running loss {loss:.3f}  epoch ends in {format_duration(left)}"
    )


def world_line(cfg: TrainConfig, world: int) -> str:
    """An elastic run's workers, said each time it (re)starts."""
    return (
        f"{world} train worker(s) of {cfg.min_workers}..{cfg.workers}: global batch {cfg.global_batch_at(world)} "
        f"({world} × {cfg.batch_size} × {cfg.accumulation(world)} micro-batch(es) per step), "
        f"lr {cfg.lr_at(world):.3g}"
    )


def resumed_line(epoch: int, step_in_epoch: int, uri: str, restarts: int | None) -> str:
    where = f"epoch {epoch}" + (f" + {step_in_epoch} steps" if step_in_epoch else "")
    known = "unknown while MLflow is unreachable" if restarts is None else restarts
    return f"resumed from {where} ({uri}); restarts so far: {known}"


def preemption_line(nodes: Iterable[str], ranks: Iterable[int], deadline_ms: int | None) -> str:
    left = f"{deadline_ms / 1000 - time.time():.0f} s left" if deadline_ms else "no deadline given"
    return f"node {', '.join(nodes)} announced its preemption (ranks {list(ranks)}, {left}): checkpoint now"


def stopping_line(diverged: str) -> str:
    return f"stopping: {diverged}"
