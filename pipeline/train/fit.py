"""Fitting: the TorchTrainer that runs pipeline.train.worker on every worker, fed by pipeline.train.ingest.

    RunSpec ──► TorchTrainer(train_loop_per_worker, scaling, run config, datasets)
            ──► rank 0's Outcome, and the best checkpoint Ray Train kept

Ray Train restarts a worker group that lost a worker up to `--max-failures` times (3 by default);
past that, the run stops with TrainingFailed: what failed, the last checkpoint, how to resume.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Callable
from functools import partial

import ray.exceptions
from ray.data import DataContext
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    WorkerGroupError,
)
from ray.train.torch import TorchTrainer

from pipeline.cluster.resources import Plan
from pipeline.cluster.watchdog import Watchdog
from pipeline.data.shards import PreparedDataset
from pipeline.errors import TrainingFailed
from pipeline.storage import Location, locate
from pipeline.train import ingest
from pipeline.train.checkpoint import SCORE, complete
from pipeline.train.spec import Outcome, RunSpec
from pipeline.train.worker import train_loop_per_worker


def fit(spec: RunSpec, data: PreparedDataset, log: Callable[[str], None] = print) -> tuple[Outcome, Location | None]:
    """Train to the end (Ray Train restarts lost workers from the latest checkpoint): rank 0's outcome
    and the best checkpoint (None when a run that diverged saved none). A watchdog says what the run
    waits for when no batch arrives."""
    cfg = spec.config
    with Watchdog(cfg.stall_warning, Plan.of(cfg), log) as watchdog:
        return _fit(dataclasses.replace(spec, watchdog=watchdog), data)


def _fit(spec: RunSpec, data: PreparedDataset) -> tuple[Outcome, Location | None]:
    cfg = spec.config
    # Workers print their epoch lines themselves; Ray Train's print patch would print each twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # One progress bar per dataset rather than one per operator.
    DataContext.get_current().enable_operator_progress_bars = False
    DataContext.get_current().enable_progress_bars = cfg.progress_interval > 0
    storage = locate(cfg.storage_path)
    trainer = TorchTrainer(
        partial(train_loop_per_worker, spec),
        scaling_config=ScalingConfig(
            num_workers=cfg.worker_count,
            use_gpu=cfg.gpu,
            resources_per_worker=cfg.resources_per_worker,
            elastic_resize_monitor_interval_s=cfg.resize_interval,
        ),
        run_config=RunConfig(
            name=spec.run_dir.name(),
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            # The K best by validation error, and always the latest (what a restart resumes from):
            # a checkpoint is the best the moment Ray Train registers it, with no copy to lose.
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="min"
            ),
            # A node's preemption (a drain, a spot reclaim) is not a failure: unlimited, apart from --max-failures.
            failure_config=FailureConfig(max_failures=cfg.max_failures, max_preemption_failures=-1),
            logging_config=LoggingConfig(log_level="WARNING"),  # no line per report; epoch lines say it
        ),
        datasets={
            "train": ingest.train_dataset(data.split_dir("train"), cfg.crop, cfg.seed, cfg.decode_on),
            "val": ingest.eval_dataset(data.split_dir("val"), cfg.crop, cfg.decode_on),
        },
        dataset_config=ingest.IngestConfig(cpu_limit=cfg.data_cpu_limit),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise TrainingFailed(explain_failure(exc, spec.run_dir, cfg.storage_path, cfg.max_failures)) from exc
    best = result.get_best_checkpoint(SCORE, "min")
    where = spec.run_dir.join(posixpath.basename(best.path.rstrip("/"))) if best else None
    return result.return_value, where


def explain_failure(exc: Exception, run_dir: Location, storage_path: str, max_failures: int) -> str:
    """What failed (per rank), the last checkpoint and the exact command that continues the run."""
    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        causes = [f"rank {rank}: {_describe(error)}" for rank, error in sorted(exc.worker_failures.items())]
    else:
        causes = [_describe(getattr(exc, "controller_failure", exc))]
    restarts = "no restarts allowed (--max-failures 0)" if max_failures == 0 else f"after {max_failures} restart(s)"
    kept = complete(run_dir)
    last = f"the last complete checkpoint is {kept[-1].uri}" if kept else "no checkpoint was saved"
    return (
        f"training stopped {restarts}: " + "; ".join(causes) + f". {last}; continue with: "
        f"python jobs/train.py --resume {run_dir.name()} --storage-path {storage_path}"
    )


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
    if isinstance(error, ray.exceptions.OutOfMemoryError):
        return f"{first} (out of memory: lower --batch-size or give each worker more memory)"
    if isinstance(error, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
        return f"{first} (the worker process or its node died: killed, preempted or out of memory)"
    return first
