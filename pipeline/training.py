"""The driver of a training job: check inputs, connect Ray, run the TorchTrainer, register the model.

Everything that can be wrong with the inputs (config, data directory, shard columns, crop size)
is checked here, before the cluster does any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.data import DataContext
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import checkpoint, cluster, ingest, tracking
from pipeline.config import ConfigError, TrainConfig
from pipeline.data.sample import SAMPLE_IMAGE_SIZE, make_sample
from pipeline.data.shards import PreparedDataset, open_dataset, read_manifest
from pipeline.data.stats import ColourStats, normalization, read_stats
from pipeline.data.transforms import eval_batch
from pipeline.model import ImageClassifier
from pipeline.prepare import MANIFEST_FORMAT, prepare
from pipeline.registry import Registry
from pipeline.storage import Location, locate
from pipeline.train_loop import train_loop_per_worker

RUN_RECORD = "alexnet_run.json"  # in the run directory: MLflow run id, tracking URI, config (for --resume)


UNSENT_FILE = "unsent_metrics.json"  # in the run directory: metrics the MLflow server never got, sent on --resume


@dataclass
class TrainSummary:
    run_id: str | None  # None with --no-tracking
    run_name: str
    experiment: str
    tracking_uri: str | None  # credentials removed
    model_name: str
    model_version: str | None
    best: dict[str, Any]
    checkpoint: str
    seconds: float
    alias: str | None = None  # champion or challenger
    promotion: str = ""  # why
    delayed_epochs: int = 0  # epochs whose metrics reached MLflow late (the server was unreachable)
    restarts: int | None = None


def sample_shards(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """The bundled sample's shards, generating and preparing them on first use.

    No stats.json: the sample trains with the published ImageNet colour statistics. Its own
    (near-isotropic, eigenvalues ~0.07-0.08 against ImageNet's 0.22/0.019/0.0045) make the PCA
    lighting scramble the colour cue its classes partly rely on.
    """
    root = Path(cfg.sample_dir).expanduser().resolve()
    raw, shard_dir = root / "raw", root / "shards"
    manifest = read_manifest(locate(shard_dir))
    if manifest and manifest.get("status") == "complete":
        return shard_dir
    if not (raw / "LOC_val_solution.csv").is_file():
        log(f"generating the sample dataset in {raw} ...")
        make_sample(raw)
    log(f"preparing shards in {shard_dir} ...")
    # A manifest from an older format cannot be resumed: the sample is cheap to make again.
    stale = manifest is not None and manifest.get("format") != MANIFEST_FORMAT
    summary = prepare(str(raw), str(shard_dir), size=SAMPLE_IMAGE_SIZE, shard_size=256, overwrite=stale, log=log)
    log(f"prepared {summary.images} images in {summary.seconds:.1f}s")
    return shard_dir


def connect_ray(cfg: TrainConfig, log: Callable[[str], None] = print, env: dict[str, str] | None = None) -> None:
    """Join the cluster (RAY_ADDRESS or `ray start`) or start a local Ray sized for this config.

    A local Ray gets enough logical CPUs for the train workers plus `data_cpus` for Ray Data,
    even on a laptop with fewer cores: they time-share the cores instead of deadlocking.
    """

    def local_cpus() -> int:
        check_local_gpus(cfg)
        return max(os.cpu_count() or 1, math.ceil(cfg.workers * cfg.cpus_per_worker) + cfg.data_cpus)

    # A local Ray also gets the custom resources the train workers ask for (e.g. mock_gpu).
    local_resources = {name: amount * cfg.workers for name, amount in cfg.resources_per_worker.items() if name != "CPU"}
    cluster.connect(log, env, local_cpus, local_resources)


def check_local_gpus(cfg: TrainConfig) -> None:
    """A local Ray has only this machine's GPUs: --gpu without enough of them would wait forever."""
    if cfg.gpu and torch.cuda.device_count() < cfg.workers:
        raise ConfigError(
            f"--gpu asks for {cfg.workers} GPU(s) but this machine has {torch.cuda.device_count()}; "
            "drop --gpu, lower --workers, or set RAY_ADDRESS to a cluster with GPU nodes"
        )


def load_data(cfg: TrainConfig) -> PreparedDataset | None:
    """The prepared dataset named by cfg.data, fully checked; None for the sample (built later)."""
    if not cfg.data:
        return None
    return _check_crop(cfg, open_dataset(cfg.data))


def run_name(cfg: TrainConfig) -> str:
    """cfg.name, or a fresh timestamped one; a name whose run directory exists is refused.

    Ray Train resumes a run whose storage_path/name already holds checkpoints, so reusing a name
    would silently continue an old run under a new MLflow run: that is what --resume is for.
    """
    name = cfg.name or f"alexnet-{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    existing = run_dir(cfg.storage_path, name)
    if existing.info().type != pafs.FileType.NotFound:
        raise ConfigError(
            f"run directory {existing.uri} already exists; pass another --name, or --resume {name} to continue it"
        )
    return name


def run_dir(storage_path: str, name: str) -> Location:
    return locate(storage_path).join(name)


def read_run_record(cfg: TrainConfig) -> dict[str, Any]:
    """What --resume needs of a stopped run: its MLflow run, tracking URI and config."""
    record = run_dir(cfg.storage_path, cfg.resume).join(RUN_RECORD)
    if not record.is_file():
        raise ConfigError(
            f"nothing to resume: {record.uri} does not exist; --resume takes the name of a run started "
            f"with --storage-path {cfg.storage_path}"
        )
    return json.loads(record.read_text())


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainSummary:
    started = time.time()
    cwd = os.getcwd()
    record = None
    if cfg.resume:  # the stopped run's own config, data and MLflow run
        record = read_run_record(cfg)
        cfg = TrainConfig.from_dict({**record["config"], "resume": cfg.resume})
        log(f"resuming run {cfg.resume} (MLflow run {record['run_id']}) with its own config")
    data = load_data(cfg)  # fails fast, before Ray starts
    name = cfg.resume or run_name(cfg)
    tracking_uri = None
    if cfg.tracking:  # an unreachable server fails here, before the cluster does anything
        uri_from_env = bool(os.environ.get("MLFLOW_TRACKING_URI"))
        tracking_uri = tracking.resolve_tracking_uri() if uri_from_env or not record else record["tracking_uri"]
        tracking.check_server(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
    connect_ray(cfg, log, tracking.worker_env(tracking_uri) if tracking_uri else None)
    if data is None:
        data = _check_crop(cfg, open_dataset(str(sample_shards(cfg, log))))
    colour = read_stats(data)
    normalization(dataclasses.asdict(colour), cfg.normalize, cfg.crop)  # a missing mean image fails here
    log(f"colour statistics: {colour.source}; normalisation: {cfg.normalize}")
    directory = run_dir(cfg.storage_path, name)
    shown_uri = tracking.redact(tracking_uri) if tracking_uri else None  # what logs and records show
    if record:
        run_id = record["run_id"]
        if run_id:
            tracking.reopen_run(run_id)
            _send_unsent(directory, run_id, log)
    else:
        run_id = tracking.start_run(cfg, data, name, colour) if cfg.tracking else None
        record = {"run_id": run_id, "tracking_uri": shown_uri, "config": cfg.to_dict(), "data": data.uri}
        directory.join(RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if run_id:
        log(f"MLflow run {run_id} ({name}) in experiment {cfg.experiment!r} at {shown_uri}")
    else:
        log(f"run {name}: no MLflow tracking (--no-tracking); checkpoints in {directory.uri}")

    status = "FAILED"
    summary = TrainSummary(run_id, name, cfg.experiment, shown_uri, cfg.model_name, None, {}, "", 0.0)
    try:
        result = _fit(cfg, data, colour, run_id, name, tracking_uri)
        cluster.reenter_working_dir(cwd)
        outcome = result.return_value or {}
        summary.restarts = outcome.get("restarts")
        summary.delayed_epochs = outcome.get("delayed_epochs", 0)
        if outcome.get("unsent_metrics"):
            summary.delayed_epochs += _send_at_end(directory, run_id, outcome["unsent_metrics"], log)
        best_checkpoint = checkpoint.best_checkpoint(directory)
        summary.checkpoint = best_checkpoint.uri
        with checkpoint.local_copy(best_checkpoint) as ckpt_dir:
            best_metrics = checkpoint.read_meta(ckpt_dir)["epoch_metrics"]
            summary.best = {k: best_metrics[k] for k in ("epoch", "val_top1_error", "val_top5_error")}
            if run_id:
                summary.model_version = _register(cfg, data, colour, run_id, ckpt_dir, best_metrics)
        if run_id:
            registry = Registry(tracking_uri)
            decision = registry.decide(cfg.model_name, summary.model_version, cfg.promote)
            registry.promote(cfg.model_name, summary.model_version, decision.alias, decision.reason)
            summary.alias, summary.promotion = decision.alias, decision.reason
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (`ray job stop`), which Ray's handler turns into an exit
        status = "KILLED"
        log(f"\nstopped; continue it with: python jobs/train.py --resume {name} --storage-path {cfg.storage_path}")
        raise
    finally:
        if run_id:
            _finish(run_id, status, log)
    summary.seconds = time.time() - started
    return summary


def _send_at_end(directory: Location, run_id: str, pending: list[dict[str, Any]], log: Callable[[str], None]) -> int:
    """Metrics rank 0 could not send: send them now (MLflow retries for minutes), else keep them for --resume."""
    log(f"sending {len(pending)} metric batches the MLflow server missed ...")
    try:
        return tracking.log_pending(run_id, pending)
    except tracking.TrackingError as exc:
        directory.join(UNSENT_FILE).write_text(json.dumps(pending) + "\n")
        raise tracking.TrackingError(
            f"{exc}. Training finished and its checkpoints are in {directory.uri}; the metrics are kept in "
            f"{UNSENT_FILE} there. When the server is back, `python jobs/train.py --resume {directory.name()}` "
            "sends them and registers the model"
        ) from exc


def _send_unsent(directory: Location, run_id: str, log: Callable[[str], None]) -> None:
    unsent = directory.join(UNSENT_FILE)
    if unsent.is_file():
        sent = tracking.log_pending(run_id, json.loads(unsent.read_text()))
        unsent.fs.delete_file(unsent.path)
        log(f"sent {sent} epoch(s) of metrics kept from the last attempt")


def _finish(run_id: str, status: str, log: Callable[[str], None]) -> None:
    try:
        tracking.finish_run(run_id, status)
    except tracking.UNREACHABLE as exc:  # the run stays RUNNING in the UI; its data is complete
        log(f"could not mark MLflow run {run_id} {status}: {exc}")


def _fit(
    cfg: TrainConfig,
    data: PreparedDataset,
    colour: ColourStats,
    run_id: str | None,
    name: str,
    tracking_uri: str | None,
) -> ray.train.Result:
    # Workers print their epoch lines themselves; Ray Train's print patch would print each twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # One progress bar per dataset rather than one per operator.
    DataContext.get_current().enable_operator_progress_bars = False
    storage = locate(cfg.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "classes": [dataclasses.asdict(c) for c in data.classes],
            "colour": dataclasses.asdict(colour),
            "train_images": data.count("train"),
            "image_size": data.image_size,
            "run_dir": run_dir(cfg.storage_path, name),  # a Location: carries the driver's S3 settings
            "normalization": normalization(dataclasses.asdict(colour), cfg.normalize, cfg.crop),
            "dataset_hash": data.dataset_hash,
            "run_id": run_id,
            "tracking_uri": tracking_uri,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=cfg.resources_per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            # The most recent K; the best is copied to <run>/best-epoch-NNNN/ by rank 0.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # no line per report; epoch lines say it
        ),
        datasets={
            "train": ingest.train_dataset(data.split_dir("train"), cfg.crop, cfg.seed),
            "val": ingest.eval_dataset(data.split_dir("val"), cfg.crop),
        },
        dataset_config=ingest.IngestConfig(cpu_limit=cfg.data_cpu_limit),
    )
    return trainer.fit()


def _register(
    cfg: TrainConfig, data: PreparedDataset, colour: ColourStats, run_id: str, ckpt_dir: str, best: dict[str, Any]
) -> str:
    net, _ = checkpoint.load_model(ckpt_dir)
    mean, std = normalization(dataclasses.asdict(colour), cfg.normalize, cfg.crop)
    model = ImageClassifier(net, mean, std).eval()  # normalises as training did
    return tracking.log_and_register(run_id, model, _input_example(data, cfg.crop), cfg, data, best)


def _input_example(data: PreparedDataset, crop: int) -> np.ndarray:
    """Two real validation crops: what the registered model's signature documents."""
    first = data.root.join(data.manifest["splits"]["val"]["shards"][0]["file"])
    rows = pq.read_table(first.path, filesystem=first.fs, columns=["image", "label"]).slice(0, 2).to_pydict()
    batch = {"image": np.array(rows["image"], dtype=object), "label": np.array(rows["label"])}
    return eval_batch(batch, crop)["image"]


def _check_crop(cfg: TrainConfig, data: PreparedDataset) -> PreparedDataset:
    if cfg.crop > data.image_size:
        raise ConfigError(
            f"crop {cfg.crop} is larger than the {data.image_size}-pixel images in {data.uri}; "
            f"pass --crop {min(data.image_size, 224)} or prepare shards with --size >= {cfg.crop}"
        )
    return data
