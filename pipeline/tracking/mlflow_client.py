"""MLflow on the driver: which server, whether it answers, and the job's run from creation to close.

One run per training job: the driver creates it and logs the config as params (``start_run``),
rank 0 logs each epoch into it by id (pipeline.tracking.run_logger), the driver sends what rank 0 could not
(``log_pending``), registers the model (pipeline.train.registration) and closes the run. Every function
takes the tracking URI it uses; none changes MLflow's global one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import ray
import torch
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from pipeline.config import TrainConfig
from pipeline.data.shards import STATS_FILE, PreparedDataset
from pipeline.data.stats import ColourStats
from pipeline.errors import InputError
from pipeline.redaction import credentials_of, redact, scrub
from pipeline.tracking.run_logger import RunLogger, login_refused
from pipeline.tracking.server import healthy

# Where MLflow and S3 are, never who the job is: sent to every worker, on every node, through the
# job's runtime env.
SETTINGS_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_REGION", "AWS_DEFAULT_REGION",
)  # fmt: skip
# Who the job is. Ray keeps a job's runtime env in its job table, readable by whoever holds the
# cluster's token, so these reach the workers only when the user names them (--forward-env). A
# local Ray the job starts inherits them from the job's own process; a cluster's nodes use their
# own (an instance profile or IRSA for S3; ~/.mlflow/credentials or a Kubernetes Secret for MLflow).
CREDENTIALS_ENV = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
)  # fmt: skip


class TrackingError(InputError):
    """The MLflow server cannot be used: the message names it and what to do."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else MLflow's default, with a relative sqlite path made
    absolute (train workers run in other processes and directories) and without credentials.

    A login written into the URI (http://user:password@host) is honoured: it becomes this process's
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which every MLflow client here (and a local
    Ray's workers) log in with, and the URI goes on without it, so nothing prints the password.
    """
    uri = uri or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return _take_login(uri)


LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _take_login(uri: str) -> str:
    """`uri` without its user:password@, which moves into MLflow's login variables (see resolve_tracking_uri)."""
    user, password = credentials_of(uri)
    if user is None and password is None:
        return uri
    shown = redact(uri)
    if password is None:
        raise TrackingError(
            f"the tracking URI {shown} names a user but no password; put the login in MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (or a token in MLFLOW_TRACKING_TOKEN) instead of the URI"
        )
    for name, value in zip(LOGIN_ENV, (user, password), strict=True):
        held = os.environ.get(name)
        if held and held != value:
            raise TrackingError(
                f"the tracking URI {shown} carries a login and {name} says another; keep one: the login in "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, the URI without it"
            )
    os.environ.update(zip(LOGIN_ENV, (user, password), strict=True))
    if credentials_of(os.environ.get("MLFLOW_TRACKING_URI", "")) != (None, None):
        os.environ["MLFLOW_TRACKING_URI"] = redact(os.environ["MLFLOW_TRACKING_URI"])
    return shown


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str) -> None:
    """Fail fast, before any cluster work, when the tracking server does not answer or refuses us."""
    if not is_server(uri):
        return
    shown = redact(uri)
    if not healthy(uri, timeout=5):
        raise TrackingError(
            f"the MLflow tracking server at {shown} does not answer. Start it (`make mlflow`), point "
            "MLFLOW_TRACKING_URI at a running one, or train without tracking with --no-tracking"
        )
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        if login_refused(exc) == 401:  # a server started with --auth
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"refuses user {user!r}" if user else "none was given"
            raise TrackingError(
                f"the MLflow tracking server at {shown} asks for a login and {who}: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user it knows"
            ) from exc
        raise TrackingError(f"the MLflow tracking server at {shown} refused a request: {scrub(exc.message)}") from exc


def worker_env(tracking_uri: str | None, forward: Sequence[str] = ()) -> dict[str, str]:
    """What the job's workers get through its runtime env: the settings (SETTINGS_ENV, the tracking
    URI without a password in it) and the variables named in `forward`, minus those a `ray job
    submit` runtime env already sets (Ray refuses a driver runtime env that repeats a key of the job's)."""
    unset = [name for name in forward if name not in os.environ]
    if unset:
        raise InputError(f"--forward-env names {', '.join(unset)}, which this environment does not set")
    env = {k: os.environ[k] for k in SETTINGS_ENV if os.environ.get(k)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if "MLFLOW_TRACKING_URI" in env and "MLFLOW_TRACKING_URI" not in forward:
        env["MLFLOW_TRACKING_URI"] = redact(env["MLFLOW_TRACKING_URI"])  # http://user:password@… is a credential
    env.update({name: os.environ[name] for name in forward})
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    return {k: v for k, v in env.items() if k not in taken}


def credentials_note(forward: Sequence[str] = ()) -> str | None:
    """What a job that joined a cluster says about the credentials it holds and did not send."""
    held = [name for name in CREDENTIALS_ENV if os.environ.get(name) and name not in forward]
    if not held:
        return None
    return (
        f"credentials not sent to the cluster's workers: {', '.join(held)} (Ray would keep them in its job "
        "table); the workers use their nodes' own (an instance profile or IRSA for S3, ~/.mlflow/credentials "
        f"or a Secret for MLflow), or send these with --forward-env {','.join(held)}"
    )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(cfg: TrainConfig, data: PreparedDataset) -> dict[str, str]:
    return {
        "profile": cfg.profile,
        "dataset_hash": data.dataset_hash,
        "dataset_root": data.uri,
        "num_classes": str(data.num_classes),
        "git_commit": git_commit(),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }


def start_run(tracking_uri: str, cfg: TrainConfig, data: PreparedDataset, run_name: str, colour: ColourStats) -> str:
    """Create the job's run and log its params and the colour statistics it uses; returns the run id."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    tags = {
        "mlflow.runName": run_name,
        "mlflow.note.content": (
            f"AlexNet, profile {cfg.profile}: {cfg.epochs} epochs on {data.uri} ({data.num_classes} classes, "
            f"{data.count('train'):,} training images), global batch {cfg.global_batch}, {cfg.workers_shown}"
        ),
        **provenance(cfg, data),
    }
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    params = {
        **cfg.to_dict(),
        "global_batch": cfg.global_batch,
        "scaled_lr": cfg.scaled_lr,
        "num_classes": data.num_classes,
        "train_images": data.count("train"),
        "val_images": data.count("val"),
        "image_size": data.image_size,
        "colour_stats": colour.source,
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
    client.log_dict(run.info.run_id, dataclasses.asdict(colour), STATS_FILE)
    return run.info.run_id


def log_pending(tracking_uri: str, run_id: str, pending: list[dict[str, Any]]) -> int:
    """Send what rank 0 could not (the server was away), with MLflow's normal retries; returns the epochs sent."""
    logger = RunLogger(run_id, tracking_uri, quick=False)
    logger.queue = [dict(item) for item in pending]
    left = logger.flush()
    if left:
        raise TrackingError(
            f"the MLflow server at {redact(logger.uri)} is still unreachable: {left} metric batches unsent"
        )
    return logger.delayed


def set_run_tag(tracking_uri: str, run_id: str, key: str, value: str) -> None:
    MlflowClient(tracking_uri).set_tag(run_id, key, value)


def log_artifact_bytes(tracking_uri: str, run_id: str, data: bytes, name: str) -> None:
    """`data` as the run's artifact `name` (at the artifact root)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, name).write_bytes(data)
        MlflowClient(tracking_uri).log_artifact(run_id, str(Path(tmp, name)))


def reopen_run(tracking_uri: str, run_id: str, recorded_uri: str | None = None) -> None:
    """Mark a stopped run as running again (--resume): its params and metrics stay as they were.
    A run this server does not have is a TrackingError saying where the record says it is."""
    try:
        MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        elsewhere = (
            f"; its run record names {redact(recorded_uri)}" if recorded_uri and recorded_uri != tracking_uri else ""
        )
        raise TrackingError(
            f"MLflow run {run_id} is not on the server at {redact(tracking_uri)}{elsewhere}: point MLFLOW_TRACKING_URI at "
            "the server the run lives on, or start a new run"
        ) from exc


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close the run as FINISHED, FAILED or KILLED."""
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)
