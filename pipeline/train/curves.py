"""(driver) The training curves of a run: loss and top-1/top-5 error per epoch, train and val, as a
PNG written beside the run's checkpoints (local or S3) whatever the tracking setting, and logged to
the MLflow run when there is one. Drawn from the per-epoch metrics the checkpoints carry, so a run
that restarted, diverged or failed to register has them too."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from pipeline.storage import Location

CURVES_FILE = "training_curves.png"


def png(history: Sequence[dict[str, Any]], title: str) -> bytes:
    """The curves of `history` (one dict of metrics per epoch, with "epoch") as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [int(m["epoch"]) for m in history]
    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
        loss_ax.plot(epochs, [m[f"{split}_loss"] for m in history], color=colour, marker=".", label=split)
        for k, style in ((1, "-"), (5, "--")):
            errors = [m[f"{split}_top{k}_error"] for m in history]
            err_ax.plot(epochs, errors, color=colour, marker=".", linestyle=style, label=f"{split} top-{k}")
    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    err_ax.set(title="error", xlabel="epoch", ylabel="error rate", ylim=(0, 1))
    for ax in (loss_ax, err_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def write(run_dir: Location, history: Sequence[dict[str, Any]], title: str) -> Location | None:
    """`run_dir`/training_curves.png from `history`; None when no epoch finished."""
    if not history:
        return None
    target = run_dir.join(CURVES_FILE)
    target.write_bytes(png(history, title))
    return target
