"""Shared fixtures: one real local Ray cluster, one real MLflow server, one tiny prepared dataset and
one pair of trained, registered runs per session.

Tiers: tests marked `slow` need a trained AlexNet, or a Ray cluster or MLflow server of their own;
`make test-fast` (`pytest -m "not slow"`) runs the rest. Tests whose subject is the plumbing around the model
(checkpoints, S3, MLflow, registration, restarts, outages, promotion, inference, the cluster)
train AlexNet with fc6/fc7 FC_WIDTH wide: the same layers, 12 MB instead of 244 MB per model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tracking.server import free_port  # the one free-port helper of the tests

# Set before any Ray starts, so that every Ray process of the session (and of the clusters tests
# start) has them: workers print their epoch lines themselves; Ray Train's controller polls its
# workers every 0.5 s instead of 2 s (runs end and checkpoints register sooner); no preemption
# watcher actor per run (nothing preempts a test machine; one process fewer to start per run).
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
ROOT = Path(__file__).resolve().parents[1]
REGISTERED_MODEL = "alexnet-test"  # what `trained` registers
SECRET = "hunter2-do-not-log"  # the MLflow password every job of the session logs in with
# The session's server asks every request to log in (`jobs/mlflow_server.py --auth`): every client
# of the session (the jobs, Ray's workers, the registry CLI) logs in as its admin, as a team's would.
os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "alice", SECRET
FC_WIDTH = 64  # fc6/fc7 width of the light AlexNet that plumbing tests train
# The S3 server (moto, `s3_server`) and its credentials, set before any Ray starts: every Ray process
# finds them in its own environment, as a cluster's nodes find theirs, and no job sends them.
S3_KEY_ID, S3_SECRET = "AKIATESTSESSION", "s3-secret-do-not-send"


S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    "AWS_ACCESS_KEY_ID": S3_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    "AWS_REGION": "us-east-1",
}
os.environ.update(S3_ENV)


def light(**overrides):
    """The sample profile with a light AlexNet (fc6/fc7 FC_WIDTH wide)."""
    from pipeline import config

    return config.resolve("sample", fc_width=FC_WIDTH, **overrides)


def run_job(script: str, *args, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` from the repository, as a user types it; the test checks the exit code."""
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def load_job(script: str):
    """A job script as a module, to call its `main(argv)` in this process, on the session's Ray: the
    same parsing, library calls and output as `python SCRIPT`, without a new interpreter and Ray job."""
    spec = importlib.util.spec_from_file_location(f"job_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_job(script: str, *args) -> subprocess.CompletedProcess:
    """`main(ARGS)` of a job in this process, its exit code and output as run_job gives them.

    For tests about what a job does; run_job where the test is about the process itself (its
    start-up, what it leaves alone before Ray starts, a signal).
    """
    argv = [str(a) for a in args]
    out, err = _Captured(), _Captured()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = load_job(script).main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


class _Captured(io.StringIO):
    """A job's stdout or stderr in call_job: text kept in memory, as a terminal's or a pipe's would be."""

    def reconfigure(self, **kwargs) -> None:  # jobs ask for line buffering; memory has no buffer to set
        pass


def job_env(ray=None, tracking_uri: str | None = None) -> dict[str, str]:
    """This environment for a job (or a Ray of a test's own): on the session's Ray (or none: RAY_ADDRESS
    and any job's RAY_JOB_* settings removed) and MLflow server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_JOB"))}
    if ray is not None:
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def assert_registered(client, name: str, run_id: str) -> None:
    """The run's model is registered and placed by the rule: @champion if it beats chance, else @challenger
    (a plumbing run's few steps seldom teach AlexNet anything)."""
    aliases = {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    version = client.get_model_version(name, aliases.get("champion") or aliases["challenger"])
    assert version.run_id == run_id, (aliases, version.run_id, run_id)
    chance = 1 - 1 / int(version.tags["num_classes"])
    assert ("champion" in aliases) == (float(version.tags["val_top1_error"]) < chance - 1e-9), (aliases, version.tags)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.data import DataContext

    # Generous logical CPUs on a 2-core machine: train workers and Ray Data time-share the cores.
    # The dashboard (127.0.0.1, a free port) serves the state API that Ray Train's cleaner polls.
    ray.init(num_cpus=6, dashboard_host="127.0.0.1", dashboard_port=free_port())
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server --auth` on 127.0.0.1 (free port): sqlite store, proxied artifacts and users
    in a temp dir; its admin is the session's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    from pipeline.tracking.server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), auth=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """4 classes × (24 train + 6 val) procedurally generated JPEGs in the ILSVRC-2012 layout."""
    from pipeline.data.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("raw"), num_classes=4, train_per_class=24, val_per_class=6, seed=3)


@pytest.fixture(scope="session")
def tiny_shards(ray_cluster, tiny_raw, tmp_path_factory):
    """tiny_raw prepared at 72 pixels, 32 images a shard; no stats.json (the published statistics apply)."""
    from pipeline.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("shards")
    prepare(tiny_raw, out, PrepareOptions(size=72, shard_size=32))
    return out


@pytest.fixture(scope="session")
def measured_shards(ray_cluster, tiny_shards, tmp_path_factory):
    """tiny_shards with their own stats.json: training must use it instead of the published values."""
    from pipeline.data.stats import compute_stats

    root = shutil.copytree(tiny_shards, tmp_path_factory.mktemp("measured") / "shards")
    compute_stats(str(root))
    return root


@dataclasses.dataclass
class Trained:
    first: object  # TrainSummary: 2 DDP workers, 2 epochs (the first a warmup)
    second: object  # TrainSummary: 1 worker, 1 epoch, another seed and lr, same dataset
    cfg: object  # the first run's TrainConfig
    second_cfg: object  # the second run's
    tracking_uri: str
    lines: list[str]  # both drivers' log lines


@pytest.fixture(scope="session")
def trained(ray_cluster, measured_shards, mlflow_server, tmp_path_factory):
    """Two light runs on measured_shards, tracked and registered into REGISTERED_MODEL on the session's server.

    Everything that needs "a trained model" (checkpoints, the registry, evaluation, inference) uses
    these: AlexNet is trained twice per session, not once per test file.
    """
    import mlflow

    from pipeline.tracking.registry import Registry
    from pipeline.train import driver

    tmp = tmp_path_factory.mktemp("trained")
    mlflow.set_tracking_uri(mlflow_server.url)
    lines: list[str] = []
    base = dict(
        data=str(measured_shards), batch_size=8, storage_path=str(tmp / "runs"), experiment="alexnet-test",
        model_name=REGISTERED_MODEL, system_metrics_interval=1.0,
    )  # fmt: skip
    cfg = light(**base, name="first", epochs=2, workers=2, cpus_per_worker=1.0, warmup_epochs=1.0)
    first = driver.train(cfg, log=lines.append)
    second_cfg = light(**base, name="second", epochs=1, seed=1, lr=0.003)
    second = driver.train(second_cfg, log=lines.append)
    # Plumbing runs learn nothing in a dozen steps (top-1 error at chance, 0.75 on 4 classes), so registration
    # leaves them @challenger; v1 is made champion by hand, knowingly (--force), as the tests need one.
    if first.alias != "champion":
        Registry(mlflow_server.url).promote(REGISTERED_MODEL, first.model_version, force=True)
    yield Trained(first, second, cfg, second_cfg, mlflow_server.url, lines)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, reached the way users reach theirs.

    It listens where S3_ENV's AWS_ENDPOINT_URL says (a free port taken when the session began), and
    yields a pyarrow S3FileSystem on it; stopped by its own handle at the end.
    """
    import logging
    from urllib.parse import urlsplit

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=urlsplit(S3_ENV["AWS_ENDPOINT_URL"]).port, verbose=False)
    server.start()
    try:
        yield pafs.S3FileSystem(endpoint_override=S3_ENV["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    finally:
        server.stop()
