"""Classification metrics, accumulated on device without a host sync per step."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of rows whose label is among the k highest logits, for each k (k capped at classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, : min(k, logits.shape[1])].any(dim=1).sum() for k in ks]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def per_epoch(values: tuple[int, ...]) -> str:
    """A value per epoch, run-length: (2, 2, 1, 2, 2) → "2 (epochs 1-2), 1 (epoch 3), 2 (epochs 4-5)"."""
    runs: list[tuple[int, int, int]] = []  # (value, first epoch, last epoch)
    for epoch, value in enumerate(values, 1):
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1], epoch)
        else:
            runs.append((value, epoch, epoch))
    return ", ".join(f"{v} (epoch {a})" if a == b else f"{v} (epochs {a}-{b})" for v, a, b in runs)
