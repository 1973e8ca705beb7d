"""Learning-rate schedules: pure functions of the epoch and the validation history.

    plateau   the paper: lr ÷10 whenever the validation top-1 error has not reached a new best
              for `patience` epochs, at most `max_drops` times (three in the paper)
    step      torchvision's reference recipe: lr ÷10 every `step_epochs` epochs
    constant  the base lr throughout

With warmup (Goyal et al.; torchvision's `--lr-warmup-epochs`), the lr rises linearly per step
from WARMUP_START of the epoch's lr to all of it over the first `warmup_epochs` epochs; the
schedule counts epochs from the end of warmup (the plateau's patience ignores warmup epochs).

The validation history travels in every checkpoint, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math

SCHEDULES = ("plateau", "step", "constant")
FACTOR = 0.1  # every drop divides the lr by 10
WARMUP_START = 0.01  # the first warmup step's share of the lr (torchvision's default)


def plateau_drops(val_errors: list[float], patience: int, max_drops: int) -> int:
    """How many times the lr has been divided after these epochs' validation errors."""
    drops, best, stale = 0, float("inf"), 0
    for error in val_errors:
        if error < best:
            best, stale = error, 0
            continue
        stale += 1
        if stale >= patience and drops < max_drops:
            drops, stale = drops + 1, 0  # the new lr gets `patience` epochs of its own
    return drops


def step_drops(epoch: int, step_epochs: int) -> int:
    """Drops before 1-based `epoch`: none in epochs 1..step, one in step+1..2·step, ..."""
    return (epoch - 1) // step_epochs


def learning_rate(
    schedule: str,
    base_lr: float,
    epoch: int,
    val_errors: list[float],
    patience: int = 5,
    max_drops: int = 3,
    step_epochs: int = 30,
    warmup_epochs: float = 0.0,
) -> float:
    """The lr of 1-based `epoch` once warmup is over, given the validation errors of the epochs before it.

    Epochs are counted from the end of warmup: the first epoch that starts after it is the
    schedule's epoch 1, and validation errors of warmup epochs do not count for the plateau.
    """
    skipped = math.ceil(warmup_epochs)
    epoch = max(1, epoch - skipped)
    if schedule == "plateau":
        drops = plateau_drops(val_errors[skipped : skipped + epoch - 1], patience, max_drops)
    elif schedule == "step":
        drops = step_drops(epoch, step_epochs)
    elif schedule == "constant":
        drops = 0
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    return base_lr * FACTOR**drops


def warmup_factor(step: int, steps_per_epoch: int, warmup_epochs: float, start: float = WARMUP_START) -> float:
    """The share of the lr at 0-based global `step`: `start` at step 0, rising linearly to 1 at the
    end of warmup (`warmup_epochs` × `steps_per_epoch` steps), 1 from then on."""
    total = warmup_epochs * steps_per_epoch
    if total <= 0 or step >= total:
        return 1.0
    return start + (1.0 - start) * step / total
