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
from pipeline.metrics import topk_correct
from pipeline.model import AlexNet
from pipeline.redaction import scrubbed_output
from pipeline.step import StepPlan, eval_logits, train_step
from pipeline.tracking.run_logger import NullLogger, RunLogger
from pipeline.train import checkpoint, ingest, reports
from pipeline.train.spec import CheckpointMeta, Outcome, Progress, RunSpec

# Ray 2.60 logs every ray.train.report at INFO through a logger named after its own file
# (ray/train/v2/_internal/execution/context.py), not under "ray.train": RunConfig's LoggingConfig
# does not reach it and no public setting does. The epoch line says the same, once.
REPORT_LOGGER = str(Path(ray.train.__file__).parent / "v2" / "_internal" / "execution" / "context.py")


def train_loop_per_worker(spec: RunSpec) -> Outcome:
    scrubbed_output()  # what this worker prints reaches Ray's log files and `ray job logs`
    return WorkerLoop(spec).run()


class WorkerLoop:
    """One Ray Train worker's run: its model, optimizer, batches and progress, and the epoch loop.

    An epoch is `train_epoch` (the steps, mid-epoch checkpoints), `validate`, then `end_epoch`
    (metrics, checkpoint, MLflow, the epoch's line).
    """

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        cfg = self.cfg = spec.config
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.say = print if self.rank == 0 else _silent
        if self.rank == 0:
            checkpoint.staging_root()  # rank 0 writes the checkpoints: a staging folder it cannot trust fails now
        self.logger = _open_logger(spec, self.rank)
        self.model, self.optimizer, progress = _build(spec, self.device, self.logger, self.say)
        self.augment = _augment(spec, self.device, self.rank)
        self.feed = ingest.Feed(cfg.decode_on, cfg.crop, cfg.seed, self.device)
        self.train_shard, self.val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        self.beat = Heartbeat(spec.watchdog, every=min(HEARTBEAT_EVERY_S, cfg.stall_warning / 4))
        self.accumulate, self.global_batch = cfg.accumulation(self.world), cfg.global_batch_at(self.world)
        self.steps_per_epoch = spec.train_images // self.global_batch  # equal splits, full batches
        self.progress = _rescaled(progress, self.global_batch)
        self.preempted = PreemptionNotice(cfg.preemption_check_steps, self.say)
        self.epoch_seconds: list[float] = []
        if cfg.elastic:
            self.say(reports.world_line(cfg, self.world), flush=True)

    def run(self) -> Outcome:
        diverged = None
        try:
            for epoch in range(self.progress.epoch + 1, self.cfg.epochs + 1):
                self.run_epoch(epoch)
        except Diverged as stop:  # every rank at the same point: all return, none waits on the others
            diverged = str(stop)
            self.say(reports.stopping_line(diverged), flush=True)
        self.logger.flush()
        self.logger.close()
        logger, progress = self.logger, self.progress
        return Outcome(
            logger.restarts, logger.pending(), logger.delayed, progress.world_sizes, diverged, progress.history
        )

    def run_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        torch.manual_seed(rank_seed(cfg.seed, self.rank, epoch))  # dropout: other masks on every rank and epoch
        lr = _set_lr(self.optimizer, cfg, epoch, self.progress, self.world)
        warm = _warmup(self.optimizer, cfg.warmup_epochs, lr, epoch, self.steps_per_epoch)
        started = time.perf_counter()
        train = self.train_epoch(epoch, warm)
        val = self.validate()
        self.epoch_seconds.append(time.perf_counter() - started)
        self.end_epoch(epoch, train, val)

    def train_epoch(self, epoch: int, warm=None) -> dict[str, float]:
        """The epoch's steps (or their rest, after a mid-epoch checkpoint), checkpointing every
        --checkpoint-every-steps and when a node announces its preemption; `warm(step)`, during
        warmup, sets each step's lr. A step takes `accumulate` micro-batches on each worker."""
        cfg, model, feed, optimizer, augment = self.cfg, self.model, self.feed, self.optimizer, self.augment
        plan, accumulate = StepPlan(cfg.clip_grad_norm, self.accumulate), self.accumulate
        model.train()
        optimizer.zero_grad(set_to_none=True)  # nothing left over from a step an earlier epoch did not finish
        partial = self.progress.partial_sums if self.rank == 0 else None  # counted once, on rank 0
        sums = EpochSums(self.device, partial)
        step, micro = self.progress.step_in_epoch, 0
        ticker = Ticker(cfg, epoch, step, self.steps_per_epoch, self.global_batch, self.say)
        for batch, waited in _timed(feed.batches(self.train_shard, cfg.batch_size, drop_last=True)):
            if step >= self.steps_per_epoch:  # a resumed epoch ends where an uninterrupted one would
                break
            sums.waited(waited)
            self.beat()
            if warm and micro == 0:
                warm(step)
            images, labels = feed.tensors(batch, epoch)
            loss, logits = train_step(model, optimizer, augment, images, labels, plan, micro, sums.nonfinite)
            sums.add(loss, logits, labels)
            micro = (micro + 1) % accumulate
            if micro:
                continue
            step += 1
            sums.stepped(step)
            ticker(step, sums)
            notice = self.preempted(step)  # every rank asks at the same steps: a barrier
            due = notice or (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)
            if due and step < self.steps_per_epoch:  # at the epoch's end its own checkpoint follows at once
                self.save_mid_epoch(epoch, step, sums)
        totals = sums.reduce(epoch)
        if totals["images"] == 0:
            raise RuntimeError("a training epoch produced no full batch: lower --batch-size or add training images")
        return _train_results(totals, self.world)

    def save_mid_epoch(self, epoch: int, step_in_epoch: int, sums: EpochSums) -> None:
        """A checkpoint inside `epoch`: the epochs before it are done, `step_in_epoch` steps of it."""
        partial = sums.reduce(epoch, keep=True)  # every rank's share of the epoch so far
        check_finite(self.model, epoch, step_in_epoch)
        state = replace(
            self.progress,
            step_in_epoch=step_in_epoch,
            step_batch=self.global_batch,
            global_step=self.progress.global_step + step_in_epoch,
            partial_sums=tuple(partial.values()),
        )
        metrics = {
            "epoch": epoch - 1,
            "step_in_epoch": step_in_epoch,
            checkpoint.SCORE: math.inf,
        }  # kept as latest only
        self.report(metrics, state, None)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss·n, top-1, top-5, n
        for batch in self.feed.batches(self.val_shard, self.cfg.batch_size):
            self.beat()
            images, labels = self.feed.tensors(batch)
            logits = eval_logits(self.model, self.augment, images)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            top1, top5 = topk_correct(logits, labels)
            sums[0] += loss
            sums[1] += top1
            sums[2] += top5
            sums[3] += len(labels)
        loss_sum, top1, top5, n = _all_reduce(sums).tolist()
        return {"images": n, "loss": loss_sum / n, "top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n}

    def end_epoch(self, epoch: int, train: dict[str, float], val: dict[str, float]) -> None:
        """The epoch's metrics checked, checkpointed with them, logged (rank 0) and printed."""
        lr = self.optimizer.param_groups[0]["lr"]  # the epoch's last step's (warmup ramps it within the epoch)
        metrics = {
            **_epoch_metrics(epoch, lr, train, val, self.epoch_seconds[-1]),
            "world_size": self.world,
            "global_batch": self.global_batch,
        }
        check_finite(self.model, epoch, self.steps_per_epoch, metrics)
        self.progress = _after_epoch(self.progress, metrics, self.steps_per_epoch)
        self.report(metrics, self.progress, metrics)
        self.logger.log_epoch(epoch, metrics)
        eta = (self.cfg.epochs - epoch) * sum(self.epoch_seconds) / len(self.epoch_seconds)
        self.say(reports.epoch_line(self.cfg.epochs, metrics, eta), flush=True)

    def report(self, metrics: dict[str, float], progress: Progress, epoch_metrics: dict[str, float] | None) -> None:
        """Report to Ray Train; rank 0 attaches the checkpoint (with the metrics MLflow has not had yet)."""
        if self.rank != 0:
            ray.train.report(metrics)
            return
        spec, unsent = self.spec, self.logger.pending()
        with checkpoint.staging(spec.run_dir.name()) as tmp:
            meta = CheckpointMeta.of(spec, progress, epoch_metrics, unsent)
            checkpoint.save(tmp, _unwrap(self.model), self.optimizer, meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class Ticker:
    """Rank 0's line inside a long epoch, every --progress-interval seconds: the step, images/s, the
    running loss and when the epoch ends. Reading the running loss is its one host sync, once per line."""

    def __init__(self, cfg: TrainConfig, epoch: int, first_step: int, steps: int, global_batch: int, say) -> None:
        self.interval, self.epoch, self.epochs, self.say = cfg.progress_interval, epoch, cfg.epochs, say
        self.first_step, self.steps, self.global_batch = first_step, steps, global_batch
        self.started = self.last = time.perf_counter()

    def __call__(self, step: int, sums: EpochSums) -> None:
        now = time.perf_counter()
        if not self.interval or self.say is _silent or now - self.last < self.interval or step >= self.steps:
            return
        self.last = now
        steps_per_s = (step - self.first_step) / (now - self.started)
        loss_sum, images = sums.values[[0, 2]].tolist()
        left = (self.steps - step) / steps_per_s
        rate, loss = steps_per_s * self.global_batch, loss_sum / max(images, 1)
        self.say(reports.progress_line(self.epoch, self.epochs, step, self.steps, rate, loss, left), flush=True)


class EpochSums:
    """One training epoch's running sums, named, in one float64 tensor on the device: added to at
    every step without a host sync, all-reduced once at a checkpoint or the epoch's end. A mid-epoch
    checkpoint keeps them (in NAMES' order) so that a resumed epoch's metrics count every step once.

    Besides the loss and the hits: seconds waiting for data and in all (this rank's), the micro-batches
    whose loss and the steps whose gradient norm were not finite, and the first such step.
    """

    NAMES = ("loss_sum", "top1", "images", "wait_s", "busy_s", "top5", "nonfinite_losses", "nonfinite_grads")

    def __init__(self, device: torch.device, start: tuple[float, ...] | None = None) -> None:
        self.values = torch.zeros(len(self.NAMES), device=device, dtype=torch.float64)
        if start:
            self.values[: len(start)] += torch.tensor(start, dtype=torch.float64, device=device)
        self.nonfinite = self.values[6:8]  # a view: train_step counts into it on the device
        self.first_bad = torch.full((), math.inf, device=device, dtype=torch.float64)  # the first step not finite
        self.started, self.wait = time.perf_counter(), 0.0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        top1, top5 = topk_correct(logits.detach(), labels)
        self.values[0] += loss.detach() * len(labels)  # device-side sums: no host sync per step
        self.values[1] += top1
        self.values[2] += len(labels)
        self.values[5] += top5

    def stepped(self, step: int) -> None:
        """After an optimizer step: remember it if it was the first whose loss or gradient was not finite."""
        self.first_bad = torch.where((self.nonfinite.sum() > 0) & self.first_bad.isinf(), float(step), self.first_bad)

    def reduce(self, epoch: int, keep: bool = False) -> dict[str, float]:
        """Every rank's sums so far (the times since the last call added first), by name; Diverged if
        a loss or gradient norm was not finite on any rank. `keep`: the epoch goes on (a checkpoint)."""
        self.values[3] += self.wait
        self.values[4] += time.perf_counter() - self.started
        self.started, self.wait = time.perf_counter(), 0.0
        totals = dict(zip(self.NAMES, _all_reduce(self.values.clone() if keep else self.values).tolist(), strict=True))
        check_sums(totals, self.first_bad, epoch)
        return totals


def _train_results(totals: dict[str, float], world: int) -> dict[str, float]:
    n, elapsed = totals["images"], totals["busy_s"]
    return {
        "images": n,
        "loss": totals["loss_sum"] / n,
        "top1_error": 1 - totals["top1"] / n,
        "top5_error": 1 - totals["top5"] / n,
        "images_per_s": n / (elapsed / world),  # global throughput over the mean worker wall time
        "data_wait_fraction": totals["wait_s"] / elapsed,
    }


def _augment(spec: RunSpec, device: torch.device, rank: int) -> DeviceAugment:
    """The paper's PCA lighting and the normalisation, with the dataset's statistics, on the device."""
    cfg, colour = spec.config, spec.colour
    mean, std = spec.normalization
    return DeviceAugment(
        device,
        cfg.lighting_std,
        seed=cfg.seed * 1000 + rank,
        mean=mean,
        std=std,
        eigval=colour.eigenvalues,
        eigvec=colour.eigenvectors,
    )


def _rescaled(progress: Progress, global_batch: int) -> Progress:
    """A mid-epoch checkpoint from another world size whose global batch differed: the same images done."""
    if progress.step_in_epoch and progress.step_batch and progress.step_batch != global_batch:
        return replace(progress, step_in_epoch=progress.step_in_epoch * progress.step_batch // global_batch)
    return progress


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
        say(reports.resumed_line(progress.epoch, progress.step_in_epoch, used.uri, restarts), flush=True)
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
        cfg.schedule,
        cfg.lr_at(world),
        epoch,
        progress.val_errors,
        patience=cfg.plateau_patience,
        max_drops=cfg.lr_drops,
        step_epochs=cfg.step_epochs,
        warmup_epochs=cfg.warmup_epochs,
    )
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
        history=(*progress.history, {k: float(v) for k, v in metrics.items()}),
    )


def _silent(*args, **kwargs) -> None:
    pass


class Diverged(Exception):
    """Training stopped being finite; raised on every rank at the same point (from all-reduced sums,
    or from weights that DDP keeps identical on every rank)."""


def check_sums(totals: dict[str, float], first_bad: torch.Tensor, epoch: int) -> None:
    """Diverged when the all-reduced `totals` count a loss or gradient norm that was not finite; the
    step named is the first on any rank (one more all-reduce, on this path only)."""
    losses, grads = totals["nonfinite_losses"], totals["nonfinite_grads"]
    if not (losses or grads):
        return
    first = _all_reduce(first_bad.clone(), dist.ReduceOp.MIN).item()
    where = f"step {int(first)}" if math.isfinite(first) else "its last step"
    what = f"loss {totals['loss_sum'] / max(totals['images'], 1):.3g}" if losses else "gradient norm not finite"
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
        self.say(reports.preemption_line(info.preempted_node_ids, info.preempted_ranks, info.deadline_ms), flush=True)
        return True


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
