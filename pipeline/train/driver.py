"""The driver of a training job: check inputs, connect Ray, fit, register the model.

    inputs checked → Ray → the run (pipeline.train.run) → fit (pipeline.train.fit) → best checkpoint
                   → registered and promoted (pipeline.train.registration) → the run closed

Everything that can be wrong with the inputs (config, data directory, shard columns, crop size,
the MLflow server) is checked before the cluster does any work.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.cluster import connection
from pipeline.cluster.resources import GpuCapacity
from pipeline.config import TrainConfig
from pipeline.data.prepare import sample_shards
from pipeline.data.shards import PreparedDataset, open_dataset
from pipeline.data.stats import normalization, read_stats
from pipeline.errors import TrainingDiverged
from pipeline.storage import Location
from pipeline.tracking import mlflow_client
from pipeline.train import checkpoint, preflight, run
from pipeline.train.fit import fit
from pipeline.train.registration import register
from pipeline.train.spec import RunSpec


@dataclass
class TrainSummary:
    run_name: str
    experiment: str
    model_name: str
    run_id: str | None = None  # None with --no-tracking
    tracking_uri: str | None = None  # credentials removed
    model_version: str | None = None
    best: dict[str, Any] = field(default_factory=dict)  # epoch, val_top1_error, val_top5_error
    checkpoint: str = ""  # the best checkpoint's directory
    curves: str = ""  # the training curves' PNG, beside the checkpoints
    seconds: float = 0.0
    alias: str | None = None  # champion or challenger
    promotion: str = ""  # why
    delayed_epochs: int = 0  # epochs whose metrics reached MLflow late (the server was unreachable)
    restarts: int | None = None
    world_sizes: tuple[int, ...] = ()  # train workers per epoch
    global_batches: tuple[int, ...] = ()  # the global batch per epoch


def train(cfg: TrainConfig, log: Callable[[str], None] = print, given: dict[str, Any] | None = None) -> TrainSummary:
    """Train `cfg`; with --resume, the stopped run's own config with what `given` (the command line's
    flags) may change on a resumed run (pipeline.config.CHANGEABLE_ON_RESUME)."""
    started, cwd = time.time(), os.getcwd()
    cfg, record = run.resumed_config(cfg, log, given)  # --resume: the stopped run's own config, data and MLflow run
    data = preflight.load_data(cfg)  # fails fast, before Ray starts
    uri = run.tracking_uri(cfg, record, log)  # an unreachable server fails here, before the cluster does anything
    name = cfg.resume or run.free_name(cfg)  # a taken name fails here too
    forward = connection.env_names(cfg.forward_env)
    joined = connect_ray(cfg, log, mlflow_client.worker_env(uri, forward), mlflow_client.credentials_note(forward))
    cfg = preflight.choose_gpus(cfg, GpuCapacity.read(), data.count("train") if data else 0, log)
    log("config:\n" + cfg.to_json())  # the config that runs
    if joined:
        preflight.check_resources(cfg, log)  # a plan that would wait forever is refused before anything starts
    else:
        preflight.check_local_gpus(cfg)
    if not cfg.resume:
        run.claim(cfg, name)  # the run directory, this job's alone, before anything is written
    try:
        current, spec, data = _begin(cfg, data, name, uri, record, log)
    except BaseException:
        if not cfg.resume:
            run.release(cfg, name)  # nothing of the run was written: the name is free again
        raise
    summary = TrainSummary(name, cfg.experiment, cfg.model_name, current.run_id, current.shown_uri)
    status = "FAILED"
    try:
        outcome, best = fit(spec, data, log)
        connection.reenter_working_dir(cwd)
        summary.restarts = outcome.restarts
        summary.world_sizes = outcome.world_sizes
        summary.global_batches = tuple(cfg.global_batch_at(world) for world in outcome.world_sizes)
        summary.delayed_epochs = outcome.delayed_epochs + current.send_at_end(outcome.unsent_metrics, log)
        drawn = current.curves(list(outcome.history), log)  # before registration: a failed one leaves them
        summary.curves = drawn.uri if drawn else ""
        if outcome.diverged:  # the epochs before it are in the run; nothing is registered
            raise TrainingDiverged(diverged(outcome.diverged, spec, current, best))
        _register_best(spec, data, best, summary)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (`ray job stop`), which Ray's handler turns into an exit
        status = "KILLED"
        log(f"\nstopped; continue it with: python jobs/train.py --resume {name} --storage-path {cfg.storage_path}")
        raise
    finally:
        current.finish(status, log)
    summary.seconds = time.time() - started
    return summary


def _begin(cfg: TrainConfig, data: PreparedDataset | None, name: str, uri: str | None, record, log):
    """The data checked where the workers are (the sample built first if it is the data), the run begun:
    (run, spec, data)."""
    data = data or preflight.check_crop(cfg, open_dataset(str(sample_shards(cfg.sample_dir, log))))
    preflight.check_reachable(cfg, data.uri, ray.nodes(), ray.get_runtime_context().get_node_id())
    spec = _spec(cfg, data, name, uri, log)  # a missing mean image fails here
    current = run.Run.begin(cfg, data, spec.colour, name, uri, record, log)
    return current, dataclasses.replace(spec, run_id=current.run_id), data


def diverged(reason: str, spec: RunSpec, current: run.Run, best: Location | None) -> str:
    """What a run that diverged says: where, the last finite checkpoint, what to change."""
    cfg = spec.config
    kept = checkpoint.complete(spec.run_dir)
    last = f"the last finite checkpoint is {kept[-1].uri}" if kept else "no checkpoint was saved"
    if best is not None:
        last += f" (the best: {best.uri})"
    current.tag("diverged", reason)
    clip = f"a lower --clip-grad-norm than {cfg.clip_grad_norm:g}" if cfg.clip_grad_norm else "--clip-grad-norm 5"
    return (
        f"{reason}; nothing was registered, and {last}. Start a new run with a lower --lr (this one: {cfg.lr:g} for "
        f"batch {cfg.lr_batch}, {cfg.scaled_lr:.3g} at global batch {cfg.global_batch}), {clip}, or a longer "
        f"--warmup-epochs (this one: {cfg.warmup_epochs:g})"
    )


def _spec(cfg: TrainConfig, data: PreparedDataset, name: str, uri: str | None, log) -> RunSpec:
    colour = read_stats(data)
    mean_std = normalization(dataclasses.asdict(colour), cfg.normalize, cfg.crop)
    log(f"colour statistics: {colour.source}; normalisation: {cfg.normalize}")
    return RunSpec(
        config=cfg,
        classes=tuple(data.classes),
        colour=colour,
        normalization=mean_std,
        train_images=data.count("train"),
        image_size=data.image_size,
        dataset_hash=data.dataset_hash,
        run_dir=run.run_dir(cfg.storage_path, name),
        run_id=None,
        tracking_uri=uri,
    )


def _register_best(spec: RunSpec, data: PreparedDataset, best: Location, summary: TrainSummary) -> None:
    """The run's best checkpoint into the summary; registered and promoted when the run is tracked."""
    summary.checkpoint = best.uri
    with checkpoint.local_copy(best) as ckpt_dir:
        metrics = checkpoint.read_meta(ckpt_dir).epoch_metrics
        summary.best = {k: metrics[k] for k in ("epoch", "val_top1_error", "val_top5_error")}
        if spec.run_id:
            registered = register(spec, data, ckpt_dir, metrics)
            summary.model_version, summary.alias, summary.promotion = (
                registered.version,
                registered.alias,
                registered.reason,
            )


def connect_ray(
    cfg: TrainConfig, log: Callable[[str], None] = print, env: dict[str, str] | None = None, note: str | None = None
) -> bool:
    """Join the cluster (RAY_ADDRESS or `ray start`) or start a local Ray sized for this config.

    A local Ray gets enough logical CPUs for the train workers plus `data_cpus` for Ray Data,
    even on a laptop with fewer cores: they time-share the cores instead of deadlocking.
    """

    def local_cpus() -> int:
        preflight.check_local_gpus(cfg)
        return max(os.cpu_count() or 1, math.ceil(cfg.workers * cfg.cpus_per_worker) + cfg.data_cpus)

    # A local Ray also gets the custom resources the train workers ask for (e.g. mock_gpu).
    local_resources = {name: amount * cfg.workers for name, amount in cfg.resources_per_worker.items() if name != "CPU"}
    return connection.connect(log, env, local_cpus, local_resources, note)
