"""The function every Ray Train worker runs: AlexNet under DDP, fed by its Ray Data shard.

Per epoch: set the lr from the schedule, train over the worker's split of the training stream
(checkpointing every `checkpoint_every_steps` steps if asked), evaluate on its split of the
validation stream, all-reduce the sums, then report metrics and a checkpoint to Ray Train and
(rank 0 only) to MLflow. Nothing syncs the host with the device inside the step loop. Batches
come through `ingest.Feed`: Ray Data's uint8 crops, or with --decode-on train the stored JPEG
bytes, which the worker decodes, crops and flips on its own device before the step.

The global batch does not depend on how many workers run: an elastic run (--workers MIN:MAX)
with fewer than MAX accumulates gradients over `cfg.accumulation(world)` micro-batches per step
(DDP all-reduces on the last only), so the lr, warmup and schedule stay the configured ones.

Divergence: a loss (or, with clipping, a gradient norm) that is not finite is counted on the device
by every step and read where the loop syncs anyway: at each checkpoint and at the epoch's end, from
the sums every rank all-reduces, and the weights are checked before any checkpoint is written. All
ranks then stop together and return the reason (Ray Train does not retry a run that returned): no
checkpoint ever holds weights that are not finite, and the driver registers nothing.

Restarts: Ray Train hands a restarted worker group (or a `--resume`d job) the latest checkpoint.
Its meta holds the epoch, the step within the epoch, the partial sums of a mid-epoch checkpoint
and the validation history, so the schedule, the epoch's metrics and the MLflow steps continue
where they stopped; epochs already in the MLflow run are never logged twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import schedules
from pipeline.cluster.watchdog import HEARTBEAT_EVERY_S, Heartbeat
from pipeline.config import TrainConfig
from pipeline.data.device import DeviceAugment
from pipeline.metrics import format_duration, topk_correct
from pipeline.model import AlexNet
from pipeline.redaction import scrubbed_output
from pipeline.step import eval_logits, train_step
from pipeline.tracking.run_logger import NullLogger, RunLogger
from pipeline.train import checkpoint, ingest
from pipeline.train.spec import CheckpointMeta, Outcome, Progress, RunSpec

# Ray 2.60 logs every ray.train.report at INFO through a logger named after its own file
# (ray/train/v2/_internal/execution/context.py), not under "ray.train": RunConfig's LoggingConfig
# does not reach it and no public setting does. The epoch line says the same, once.
REPORT_LOGGER = str(Path(ray.train.__file__).parent / "v2" / "_internal" / "execution" / "context.py")


def train_loop_per_worker(spec: RunSpec) -> Outcome:
    scrubbed_output()  # what this worker prints reaches Ray's log files and `ray job logs`
    cfg = spec.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    say = print if rank == 0 else _silent
    logger = _open_logger(spec, rank)
    model, optimizer, progress = _build(spec, device, logger, say)
    mean, std = spec.normalization
    colour = spec.colour
    augment = DeviceAugment(
        device, cfg.lighting_std, seed=cfg.seed * 1000 + rank, mean=mean, std=std,
        eigval=colour.eigenvalues, eigvec=colour.eigenvectors,
    )  # fmt: skip
    feed = ingest.Feed(cfg.decode_on, cfg.crop, cfg.seed, device)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    beat = Heartbeat(spec.watchdog, every=min(HEARTBEAT_EVERY_S, cfg.stall_warning / 4))
    accumulate, global_batch = cfg.accumulation(world), cfg.global_batch_at(world)
    steps_per_epoch = spec.train_images // global_batch  # equal splits, full batches
    if progress.step_in_epoch and progress.step_batch and progress.step_batch != global_batch:
        # A mid-epoch checkpoint from another world size whose global batch differed: the same images done.
        progress = replace(progress, step_in_epoch=progress.step_in_epoch * progress.step_batch // global_batch)
    if cfg.elastic:
        say(f"{world} train worker(s) of {cfg.min_workers}..{cfg.workers}: global batch {global_batch} "
            f"({world} × {cfg.batch_size} × {accumulate} micro-batch(es) per step), lr {cfg.lr_at(world):.3g}",
            flush=True)  # fmt: skip

    def save_mid_epoch(epoch: int, step_in_epoch: int, partial: torch.Tensor, first_bad: torch.Tensor) -> None:
        """A checkpoint inside `epoch`: the epochs before it are done, `step_in_epoch` steps of it."""
        sums = tuple(_all_reduce(partial.clone()).tolist())  # every rank's share of the epoch so far
        check_sums(sums, first_bad, epoch)
        check_finite(model, epoch, step_in_epoch)
        state = replace(progress, step_in_epoch=step_in_epoch, global_step=progress.global_step + step_in_epoch,
                        partial_sums=sums, step_batch=global_batch)  # fmt: skip
        metrics = {
            "epoch": epoch - 1,
            "step_in_epoch": step_in_epoch,
            checkpoint.SCORE: math.inf,
        }  # kept as latest only
        report(spec, rank, model, optimizer, metrics, state, None, logger.pending())

    preempted = PreemptionNotice(cfg.preemption_check_steps, say)
    epoch_seconds: list[float] = []
    diverged = None
    try:
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            torch.manual_seed(rank_seed(cfg.seed, rank, epoch))  # dropout: other masks on every rank and epoch
            lr = _set_lr(optimizer, cfg, epoch, progress, world)
            warm = _warmup(optimizer, cfg.warmup_epochs, lr, epoch, steps_per_epoch)
            started = time.perf_counter()
            partial = progress.partial_sums if rank == 0 else None  # counted once, on rank 0
            train = run_train_epoch(
                model, optimizer, augment, feed, train_shard, cfg, device, epoch, steps_per_epoch,
                progress.step_in_epoch, partial, save_mid_epoch, warm, beat, accumulate, preempted,
            )  # fmt: skip
            val = evaluate(model, augment, feed, val_shard, cfg, device, beat)
            epoch_seconds.append(time.perf_counter() - started)
            lr = optimizer.param_groups[0]["lr"]  # the epoch's last step's (warmup ramps it within the epoch)
            metrics = {**_epoch_metrics(epoch, lr, train, val, epoch_seconds[-1]), "world_size": world,
                       "global_batch": global_batch}  # fmt: skip
            check_finite(model, epoch, steps_per_epoch, metrics)
            progress = _after_epoch(progress, metrics, steps_per_epoch)
            report(spec, rank, model, optimizer, metrics, progress, metrics, logger.pending())
            logger.log_epoch(epoch, metrics)
            eta = (cfg.epochs - epoch) * sum(epoch_seconds) / len(epoch_seconds)
            say(_epoch_line(cfg.epochs, metrics, eta), flush=True)
    except Diverged as stop:  # every rank at the same point: all return, none waits on the others
        diverged = str(stop)
        say(f"stopping: {diverged}", flush=True)
    logger.flush()
    logger.close()
    return Outcome(logger.restarts, logger.pending(), logger.delayed, progress.world_sizes, diverged)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """torch's seed for one rank's epoch: the initial weights come from `seed` alone (the same on
    every rank); what the steps draw (dropout) differs between ranks and epochs, and repeats with
    the seed, after a restart too."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def _open_logger(spec: RunSpec, rank: int) -> RunLogger | NullLogger:
    """Rank 0 logs to the run; every other rank, and every rank with --no-tracking, logs nothing."""
    logging.getLogger(REPORT_LOGGER).setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per attempt
    logger = RunLogger(spec.run_id, spec.tracking_uri) if rank == 0 and spec.run_id else NullLogger()
    logger.start_system_metrics(interval=spec.config.system_metrics_interval)
    return logger


def _build(spec: RunSpec, device: torch.device, logger, say) -> tuple[torch.nn.Module, torch.optim.Optimizer, Progress]:
    """The DDP model and its optimizer, from the latest checkpoint when Ray Train hands one over."""
    cfg = spec.config
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = AlexNet.from_config(len(spec.classes), cfg.to_dict())
    progress, optimizer_state = Progress(), None
    restored = ray.train.get_checkpoint()
    if restored:  # the latest; an earlier one if it is damaged
        meta, optimizer_state, used = _restore(spec, restored, model, say)
        progress = meta.progress
        logger.requeue(list(meta.unsent_metrics))  # what the server missed before the checkpoint
        logger.log_epoch(progress.epoch, meta.epoch_metrics)  # if it was lost before MLflow had it
    restarts = logger.count_attempt(step=progress.epoch)
    if restored:
        where = f"epoch {progress.epoch}" + (f" + {progress.step_in_epoch} steps" if progress.step_in_epoch else "")
        known = "unknown while MLflow is unreachable" if restarts is None else restarts
        say(f"resumed from {where} ({used.uri}); restarts so far: {known}", flush=True)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # the uint8 NHWC batches arrive that way
    model = ray.train.torch.prepare_model(model)  # device placement + DDP
    if cfg.compile:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(  # fused: decay, momentum and update in one pass, ~4x faster on CPU
        model.parameters(), lr=cfg.scaled_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True
    )
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    return model, optimizer, progress


def _restore(spec: RunSpec, restored, model: AlexNet, say):
    """(meta, optimizer state, checkpoint used) of the checkpoint every rank resumes from: rank 0
    picks it (the latest, or the newest earlier one that reads if it is damaged) and the others
    load that one, so no rank resumes at another step than the rest (their collectives would not pair)."""
    cfg, classes = spec.config, len(spec.classes)
    latest = spec.run_dir.join(Path(restored.path.rstrip("/")).name)
    rank = ray.train.get_context().get_world_rank()
    chosen = [None]
    if rank == 0:
        meta, optimizer_state, used = checkpoint.restore_latest(latest, spec.run_dir, model, cfg, classes, say)
        chosen = [used.name()]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    if rank == 0:
        return meta, optimizer_state, used
    used = spec.run_dir.join(chosen[0])
    with checkpoint.local_copy(used) as directory:
        meta = checkpoint.restore(directory, model, cfg, classes)
        optimizer_state = checkpoint.load_state(directory, checkpoint.OPTIMIZER_FILE)
    return meta, optimizer_state, used


def _set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int, progress: Progress, world: int) -> float:
    lr = schedules.learning_rate(
        cfg.schedule, cfg.lr_at(world), epoch, progress.val_errors, patience=cfg.plateau_patience,
        max_drops=cfg.lr_drops, step_epochs=cfg.step_epochs, warmup_epochs=cfg.warmup_epochs,
    )  # fmt: skip
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _warmup(optimizer, warmup_epochs: float, lr: float, epoch: int, steps_per_epoch: int):
    """During warmup, what sets each step's lr (given the step in the epoch); None after it."""
    first = (epoch - 1) * steps_per_epoch
    if schedules.warmup_factor(first, steps_per_epoch, warmup_epochs) == 1.0:
        return None

    def set_step_lr(step_in_epoch: int) -> None:
        factor = schedules.warmup_factor(first + step_in_epoch, steps_per_epoch, warmup_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor

    return set_step_lr


def _epoch_metrics(epoch: int, lr: float, train: dict[str, float], val: dict[str, float], seconds: float):
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": train["loss"],
        "train_top1_error": train["top1_error"],
        "train_top5_error": train["top5_error"],
        "val_loss": val["loss"],
        "val_top1_error": val["top1_error"],
        "val_top5_error": val["top5_error"],
        "train_images": train["images"],  # every rank's, the steps before a restart included
        "val_images": val["images"],
        "images_per_s": train["images_per_s"],
        "data_wait_fraction": train["data_wait_fraction"],
        "epoch_seconds": seconds,
    }


def _after_epoch(progress: Progress, metrics: dict[str, float], steps_per_epoch: int) -> Progress:
    best = progress.best
    if best is None or metrics["val_top1_error"] < best["val_top1_error"]:
        best = {k: metrics[k] for k in ("epoch", "val_top1_error", "val_top5_error")}
    return Progress(
        epoch=metrics["epoch"],
        global_step=progress.global_step + steps_per_epoch,
        val_errors=(*progress.val_errors, metrics["val_top1_error"]),
        best=best,
        world_sizes=(*progress.world_sizes, int(metrics["world_size"])),
    )


def _epoch_line(epochs: int, m: dict[str, float], eta: float) -> str:
    return (
        f"epoch {m['epoch']:>3}/{epochs}  lr {m['lr']:.2g}  train loss {m['train_loss']:.3f}  "
        f"top-1 err {m['train_top1_error']:.3f}  |  val loss {m['val_loss']:.3f}  top-1 err {m['val_top1_error']:.3f}"
        f"  top-5 err {m['val_top5_error']:.3f}  |  {m['images_per_s']:,.0f} img/s  "
        f"data wait {m['data_wait_fraction']:.0%}  |  {format_duration(m['epoch_seconds'])}/epoch  "
        f"ETA {format_duration(eta)}"
    )


def _silent(*args, **kwargs) -> None:
    pass


def run_train_epoch(
    model,
    optimizer,
    augment,
    feed,
    shard,
    cfg: TrainConfig,
    device,
    epoch,
    steps_per_epoch,
    resume_at,
    partial,
    save,
    warm=None,
    beat=None,
    accumulate=1,
    preempted=None,
) -> dict[str, float]:
    """One epoch (or its rest, from step `resume_at`), checkpointing every cfg.checkpoint_every_steps
    and when `preempted(step)` says a node announced its preemption; `warm(step)`, when given, sets
    each step's lr (warmup); `beat()` is told of every batch. A step takes `accumulate` batches
    (micro-batches) on each worker."""
    model.train()
    optimizer.zero_grad(set_to_none=True)  # nothing left over from a step an earlier epoch did not finish
    sums = torch.zeros(len(SUMS), device=device, dtype=torch.float64)  # named by SUMS
    if partial:
        sums[: len(partial)] += torch.tensor(partial, dtype=torch.float64, device=device)
    nonfinite = sums[NONFINITE]  # a view: train_step counts into it on the device
    first_bad = torch.full((), math.inf, device=device, dtype=torch.float64)  # the first step that was not finite
    started, wait = time.perf_counter(), 0.0
    step, micro = resume_at, 0
    for batch, waited in _timed(feed.batches(shard, cfg.batch_size, drop_last=True)):
        if step >= steps_per_epoch:  # a resumed epoch ends where an uninterrupted one would
            break
        wait += waited
        if beat:
            beat()
        if warm and micro == 0:
            warm(step)
        images, labels = feed.tensors(batch, epoch)
        loss, logits = train_step(
            model, optimizer, augment, images, labels, cfg.clip_grad_norm, micro=micro, accumulate=accumulate,
            nonfinite=nonfinite,
        )  # fmt: skip
        top1, top5 = topk_correct(logits.detach(), labels)
        sums[0] += loss.detach() * len(labels)  # device-side sums: no host sync per step
        sums[1] += top1
        sums[2] += len(labels)
        sums[5] += top5
        micro = (micro + 1) % accumulate
        if micro:
            continue
        step += 1
        first_bad = torch.where((nonfinite.sum() > 0) & first_bad.isinf(), float(step), first_bad)  # no sync
        notice = preempted(step) if preempted else False  # every rank asks at the same steps: a barrier
        due = notice or (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)
        if due and step < steps_per_epoch:  # at the epoch's end its own checkpoint follows at once
            sums[3] += wait
            sums[4] += time.perf_counter() - started
            save(epoch, step, sums, first_bad)
            started, wait = time.perf_counter(), 0.0
    sums[3] += wait
    sums[4] += time.perf_counter() - started
    totals = _all_reduce(sums).tolist()
    check_sums(totals, first_bad, epoch)
    loss_sum, correct, n, wait_total, elapsed_total, correct5 = totals[:6]
    if n == 0:
        raise RuntimeError("a training epoch produced no full batch: lower --batch-size or add training images")
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {
        "images": n,
        "loss": loss_sum / n,
        "top1_error": 1 - correct / n,
        "top5_error": 1 - correct5 / n,
        "images_per_s": n / (elapsed_total / world),  # global throughput over the mean worker wall time
        "data_wait_fraction": wait_total / elapsed_total,
    }


# The epoch's device-side sums (all-reduced at the epoch's end and at mid-epoch checkpoints; a
# mid-epoch checkpoint keeps them in this order): loss·n, top-1 correct, n, seconds waiting for
# data, seconds in all, top-5 correct, and the micro-batches whose loss and the steps whose
# gradient norm were not finite.
SUMS = ("loss_sum", "top1", "images", "wait_s", "busy_s", "top5", "nonfinite_losses", "nonfinite_grads")
NONFINITE = slice(6, 8)


class Diverged(Exception):
    """Training stopped being finite; raised on every rank at the same point (from all-reduced sums,
    or from weights that DDP keeps identical on every rank)."""


def check_sums(sums, first_bad: torch.Tensor, epoch: int) -> None:
    """Diverged when the all-reduced `sums` count a loss or gradient norm that was not finite; the
    step named is the first on any rank (one more all-reduce, on this path only)."""
    losses, grads = sums[NONFINITE]
    if not (losses or grads):
        return
    first = _all_reduce(first_bad.clone(), dist.ReduceOp.MIN).item()
    where = f"step {int(first)}" if math.isfinite(first) else "its last step"
    what = f"loss {sums[0] / max(sums[2], 1):.3g}" if losses else "gradient norm not finite"
    raise Diverged(f"training diverged at epoch {epoch}, {where} ({what})")


def check_finite(model, epoch: int, step: int, metrics: dict[str, float] | None = None) -> None:
    """Diverged when a weight (or one of the epoch's metrics) is not finite: nothing of it is saved."""
    bad = [k for k, v in (metrics or {}).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise Diverged(f"training diverged at epoch {epoch}, step {step} ({', '.join(bad)} not finite)")
    finite = torch.stack([torch.isfinite(p).all() for p in _unwrap(model).parameters()]).all()
    if not finite.item():
        raise Diverged(f"training diverged at epoch {epoch}, step {step} (weights not finite)")


class PreemptionNotice:
    """Every `every` steps, asks Ray Train whether a node of this run announced its preemption (a
    spot reclaim, a drain); True once per announcement, so that the caller checkpoints at once.

    Every rank must call it at the same steps: Ray Train agrees on the answer across ranks. When
    the node goes, Ray Train restarts from that checkpoint without counting it in --max-failures.
    """

    def __init__(self, every: int, say) -> None:
        self.every, self.say = every, say
        self.seen: set[tuple[str, ...]] = set()

    def __call__(self, step: int) -> bool:
        if not self.every or step % self.every:
            return False
        info = ray.train.get_preemption_info()
        if info is None or tuple(info.preempted_node_ids) in self.seen:
            return False
        self.seen.add(tuple(info.preempted_node_ids))
        left = f"{info.deadline_ms / 1000 - time.time():.0f} s left" if info.deadline_ms else "no deadline given"
        nodes = ", ".join(info.preempted_node_ids)
        self.say(f"node {nodes} announced its preemption (ranks {info.preempted_ranks}, {left}): checkpoint now",
                 flush=True)  # fmt: skip
        return True


@torch.no_grad()
def evaluate(model, augment, feed, shard, cfg: TrainConfig, device, beat=None) -> dict[str, float]:
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss·n, top-1, top-5, n
    for batch in feed.batches(shard, cfg.batch_size):
        if beat:
            beat()
        images, labels = feed.tensors(batch)
        logits = eval_logits(model, augment, images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels)
        sums[0] += loss
        sums[1] += top1
        sums[2] += top5
        sums[3] += len(labels)
    loss_sum, top1, top5, n = _all_reduce(sums).tolist()
    return {"images": n, "loss": loss_sum / n, "top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n}


def report(spec: RunSpec, rank: int, model, optimizer, metrics, progress: Progress, epoch_metrics, unsent) -> None:
    """Report to Ray Train; rank 0 attaches the checkpoint (with the metrics MLflow has not had yet)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with checkpoint.staging(spec.run_dir.name()) as tmp:
        checkpoint.save(tmp, _unwrap(model), optimizer, CheckpointMeta.of(spec, progress, epoch_metrics, unsent))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _timed(iterable) -> Iterator[tuple[Any, float]]:
    """Yields (item, seconds spent waiting for it): the data-wait half of the step time."""
    iterator = iter(iterable)
    while True:
        started = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - started


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return model.module if hasattr(model, "module") else model
