"""A training run's lifecycle on the driver: name, run directory, run record, resume, unsent metrics, close.

    <storage_path>/<name>/alexnet_run.json       its MLflow run, tracking URI (no credentials), config, data
    <storage_path>/<name>/unsent_metrics.json    metrics the MLflow server never got; --resume sends them
    <storage_path>/<name>/.alexnet_claim         (S3) the token of the job that claimed the name

Ray Train keeps its checkpoints in the same directory, so `--resume NAME` finds everything there.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline import config
from pipeline.config import ConfigError, TrainConfig
from pipeline.data.shards import PreparedDataset
from pipeline.data.stats import ColourStats
from pipeline.redaction import redact, scrub
from pipeline.storage import Location, locate
from pipeline.tracking import mlflow_client
from pipeline.tracking.run_logger import UNREACHABLE
from pipeline.train import curves

RUN_RECORD = "alexnet_run.json"
UNSENT_FILE = "unsent_metrics.json"
CLAIM_FILE = ".alexnet_claim"  # on S3: the token of the job that claimed the run's name
CLAIM_SETTLE_S = 1.0  # on S3: between writing the claim and reading it back


def run_dir(storage_path: str, name: str) -> Location:
    return locate(storage_path).join(name)


def resumed_config(
    cfg: TrainConfig, log: Callable[[str], None], given: dict[str, Any] | None = None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """With --resume: the stopped run's own config with what may change on a resumed run applied from
    `given` (the command line's flags), and its record; otherwise `cfg` as it is. Whatever is given,
    the run is where its record was found (--storage-path: it may have moved) and sends what this
    shell's --forward-env names."""
    if not cfg.resume:
        return cfg, None
    record = run_dir(cfg.storage_path, cfg.resume).join(RUN_RECORD)
    if not record.is_file():
        raise ConfigError(
            f"nothing to resume: {record.uri} does not exist; --resume takes the name of a run started "
            f"with --storage-path {cfg.storage_path}"
        )
    values = json.loads(record.read_text())
    here = {"storage_path": locate(cfg.storage_path).uri, "forward_env": cfg.forward_env}
    given = {**(given or {}), **here}
    resumed, changed = config.resumed(values["config"], given, cfg.resume)
    applied = "; ".join(f"--{k.replace('_', '-')} {getattr(resumed, k)!r}" for k in changed) or "nothing changed"
    log(f"resuming run {cfg.resume} (MLflow run {values['run_id']}) with its own config ({applied})")
    return resumed, values


def new_name(cfg: TrainConfig) -> str:
    """cfg.name, or a fresh one: alexnet-<profile>-<timestamp>-<random>, so that two jobs started in
    the same second never share a name (nor, through it, a run directory and its checkpoints)."""
    return cfg.name or f"alexnet-{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def free_name(cfg: TrainConfig) -> str:
    """A new run's name (new_name), refused at once if its run directory exists: checked before any
    cluster work; claim() makes it this job's alone later, before anything is written."""
    name = new_name(cfg)
    if run_dir(cfg.storage_path, name).info().type != pafs.FileType.NotFound:
        raise _taken(cfg, name)
    return name


def claim(cfg: TrainConfig, name: str) -> None:
    """Create the run directory for this job alone; a name another job holds (or claims at the same
    moment) is refused, never shared.

    Ray Train resumes a run whose storage_path/name already holds checkpoints, so a shared name
    would silently continue another run under a new MLflow run: that is what --resume is for.
    Locally the directory is made with mkdir, which only one process can win. On S3 the job writes
    a claim object only if none exists (S3's conditional write, If-None-Match), then reads it back:
    a store without conditional writes is still caught unless two jobs write within the same second.
    """
    directory = run_dir(cfg.storage_path, name)
    if directory.is_local:
        Path(directory.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(directory.path, 0o755)
        except FileExistsError:
            raise _taken(cfg, name) from None
        return
    token = secrets.token_hex(16)
    if not _put_if_absent(directory.join(CLAIM_FILE), token) or directory.listdir()[1:]:
        raise _taken(cfg, name)
    time.sleep(CLAIM_SETTLE_S)
    if directory.join(CLAIM_FILE).read_text() != token:
        raise _taken(cfg, name)


def _taken(cfg: TrainConfig, name: str) -> ConfigError:
    where = run_dir(cfg.storage_path, name).uri
    return ConfigError(f"run directory {where} already exists; pass another --name, or --resume {name} to continue it")


def _put_if_absent(place: Location, text: str) -> bool:
    """Write an S3 object only if there is none (If-None-Match: *); False if one exists."""
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, key = place.path.partition("/")
    try:
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=text.encode(), IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise
    return True


def release(cfg: TrainConfig, name: str) -> None:
    """Give back a claimed name whose run never started: its directory, if it holds nothing but the claim."""
    directory = run_dir(cfg.storage_path, name)
    if directory.is_local:
        try:
            os.rmdir(directory.path)  # only if empty: nothing of a run is ever deleted here
        except OSError:
            pass
        return
    entries = directory.listdir()
    if [e.base_name for e in entries] == [CLAIM_FILE]:
        directory.fs.delete_file(directory.join(CLAIM_FILE).path)
        if not directory.listdir():  # pyarrow leaves a folder marker where the last object was
            directory.fs.delete_dir(directory.path)


def tracking_uri(cfg: TrainConfig, record: dict[str, Any] | None, log: Callable[[str], None]) -> str | None:
    """The MLflow server this run logs to: this environment's (MLFLOW_TRACKING_URI, else MLflow's
    default), checked now: an unreachable server fails before the cluster does anything.

    A resumed run's record names the server it started with, but whoever can write the record (a
    shared bucket) could point it anywhere, and this job's MLflow login would go there: the record
    is only compared with this environment's server, and a difference said.
    """
    if not cfg.tracking:
        return None
    uri = mlflow_client.resolve_tracking_uri()
    recorded = (record or {}).get("tracking_uri")
    if recorded and recorded != uri:
        log(
            f"the run record names MLflow at {redact(recorded)}; this job uses {uri} from this environment "
            "(set MLFLOW_TRACKING_URI to the record's server if that is where the run lives)"
        )
    mlflow_client.check_server(uri)
    return uri


def _absolute(cfg: TrainConfig, data: PreparedDataset) -> dict[str, Any]:
    """The config as the run record keeps it: every path absolute, so --resume works from any directory
    (a job submitted with `ray job submit` runs in a fresh working directory each time)."""
    return {
        **cfg.to_dict(),
        "storage_path": locate(cfg.storage_path).uri,
        "data": data.uri if cfg.data else "",
        "sample_dir": str(Path(cfg.sample_dir).expanduser().resolve()),
    }


@dataclass(frozen=True)
class Run:
    name: str
    directory: Location
    run_id: str | None  # None with --no-tracking
    tracking_uri: str | None

    @property
    def shown_uri(self) -> str | None:
        """The tracking URI without credentials: what logs, records and summaries show."""
        return mlflow_client.redact(self.tracking_uri) if self.tracking_uri else None

    @classmethod
    def begin(
        cls,
        cfg: TrainConfig,
        data: PreparedDataset,
        colour: ColourStats,
        name: str,
        uri: str | None,
        record: dict[str, Any] | None,
        log: Callable[[str], None],
    ) -> Run:
        """A new run (an MLflow run and a run record), or the resumed one reopened with its unsent metrics sent."""
        directory = run_dir(cfg.storage_path, name)
        if record:
            run = cls(name, directory, record["run_id"], uri)
            if run.run_id:
                mlflow_client.reopen_run(uri, run.run_id, record.get("tracking_uri"))
                run._send_unsent(log)
        else:
            run = cls(name, directory, mlflow_client.start_run(uri, cfg, data, name, colour) if uri else None, uri)
            record = {
                "run_id": run.run_id,
                "tracking_uri": run.shown_uri,
                "config": _absolute(cfg, data),
                "data": data.uri,
            }
            directory.join(RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if run.run_id:
            log(f"MLflow run {run.run_id} ({name}) in experiment {cfg.experiment!r} at {run.shown_uri}")
        else:
            log(f"run {name}: no MLflow tracking (--no-tracking); checkpoints in {directory.uri}")
        return run

    def send_at_end(self, pending: list[dict[str, Any]], log: Callable[[str], None]) -> int:
        """Metrics rank 0 could not send: send them now (MLflow retries for minutes), else keep them for --resume.

        Returns the epochs that reached MLflow late."""
        if not pending:
            return 0
        log(f"sending {len(pending)} metric batches the MLflow server missed ...")
        try:
            return mlflow_client.log_pending(self.tracking_uri, self.run_id, pending)
        except mlflow_client.TrackingError as exc:
            self.directory.join(UNSENT_FILE).write_text(json.dumps(pending) + "\n")
            raise mlflow_client.TrackingError(
                f"{exc}. Training finished and its checkpoints are in {self.directory.uri}; the metrics are kept "
                f"in {UNSENT_FILE} there. When the server is back, `python jobs/train.py --resume {self.name}` "
                "sends them and registers the model"
            ) from exc

    def curves(self, history: list[dict[str, float]], log: Callable[[str], None]) -> Location | None:
        """The training curves beside the checkpoints, and in the MLflow run (an unreachable server
        loses only its copy)."""
        where = curves.write(self.directory, history, title=f"run {self.name}")
        if where and self.run_id:
            try:
                mlflow_client.log_artifact_bytes(self.tracking_uri, self.run_id, where.read_bytes(), curves.CURVES_FILE)
            except UNREACHABLE as exc:
                log(f"could not log the training curves to MLflow run {self.run_id}: {scrub(str(exc))}")
        return where

    def tag(self, key: str, value: str) -> None:
        """A tag on the MLflow run (nothing without tracking); an unreachable server loses it, nothing else."""
        if self.run_id:
            try:
                mlflow_client.set_run_tag(self.tracking_uri, self.run_id, key, value)
            except UNREACHABLE:
                pass

    def finish(self, status: str, log: Callable[[str], None]) -> None:
        """Close the MLflow run as FINISHED, FAILED or KILLED."""
        if not self.run_id:
            return
        try:
            mlflow_client.finish_run(self.tracking_uri, self.run_id, status)
        except UNREACHABLE as exc:  # the run stays RUNNING in the UI; its data is complete
            log(f"could not mark MLflow run {self.run_id} {status}: {scrub(str(exc))}")

    def _send_unsent(self, log: Callable[[str], None]) -> None:
        unsent = self.directory.join(UNSENT_FILE)
        if unsent.is_file():
            sent = mlflow_client.log_pending(self.tracking_uri, self.run_id, json.loads(unsent.read_text()))
            unsent.fs.delete_file(unsent.path)
            log(f"sent {sent} epoch(s) of metrics kept from the last attempt")
