"""What train workers and model actors compute on their device; importable without Ray or MLflow.

    train_step   one micro-batch of an SGD step: uint8 NHWC crops → float, colour augmentation and
                 normalisation on the device → forward (bf16 autocast on CUDA) → backward; on the
                 step's last micro-batch, DDP's all-reduce, optional clipping and the update
    predict      a model actor's scoring: uint8 test views (n, views, crop, crop, 3) → softmax
                 probabilities (n, views, classes)

`benchmarks/gpu_check.py` measures and checks both on a bare GPU machine (a PyTorch image without
Ray or MLflow), as it does the device code in pipeline.data.device: none of them may import either.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StepPlan:
    """How every step of a run is taken."""

    clip_grad_norm: float = 0.0  # clip the global gradient norm to this; 0: off
    accumulate: int = 1  # micro-batches per optimizer step (an elastic run on fewer workers than its most)
    bf16: bool | None = None  # bf16 autocast; None: on CUDA only


def train_step(
    model,
    optimizer,
    augment,
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: StepPlan = StepPlan(),
    micro: int = 0,
    nonfinite: torch.Tensor | None = None,
):
    """Micro-batch `micro` of an SGD step of `plan.accumulate` on a uint8 NHWC batch: to the
    device, augment and normalise there, forward (bf16 autocast on CUDA unless `plan.bf16` says
    otherwise), backward (its share of the step's gradient); on the last micro-batch DDP
    all-reduces, then optional clipping and the update. Returns (loss, logits) of this micro-batch.

    `nonfinite`, when given, is a device tensor of two counters this step adds to: a loss that is
    not finite, and (with clipping, whose norm comes free) a gradient norm that is not finite.
    They stay on the device: the caller reads them where it syncs anyway, never per step."""
    device, accumulate, clip_grad_norm = labels.device, plan.accumulate, plan.clip_grad_norm
    images = augment(images.to(device, non_blocking=True), train=True)
    last = micro == accumulate - 1
    in_step = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
    with in_step:  # DDP skips its all-reduce until the step's last micro-batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16(plan.bf16, device)):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        (loss / accumulate if accumulate > 1 else loss).backward()
    if nonfinite is not None:
        nonfinite[0] += ~torch.isfinite(loss.detach())
    if not last:
        return loss, logits
    if clip_grad_norm:  # DDP has averaged the gradients: every rank clips alike
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if nonfinite is not None:
            nonfinite[1] += ~torch.isfinite(norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, logits


def eval_logits(model, augment, images: torch.Tensor, bf16: bool | None = None) -> torch.Tensor:
    """Validation's forward pass on a uint8 NHWC batch already on the device (no colour augmentation)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=_bf16(bf16, images.device)):
        return model(augment(images, train=False))


@torch.no_grad()
def predict(model, views: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 test views (n, views, crop, crop, 3) → softmax probabilities (n, views, classes), in float32.

    `model` takes uint8 NHWC crops (the registered ImageClassifier, or its torch.export program).
    """
    if isinstance(views, np.ndarray):
        views = torch.from_numpy(views if views.flags.writeable else views.copy())  # object-store arrays are read-only
    views = views.to(device, non_blocking=True)
    n, v = views.shape[:2]
    logits = model(views.reshape(n * v, *views.shape[2:]))
    return torch.softmax(logits.float(), dim=1).reshape(n, v, -1)


def _bf16(asked: bool | None, device: torch.device) -> bool:
    return device.type == "cuda" if asked is None else asked
