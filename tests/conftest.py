"""Shared fixtures: one real local Ray cluster, one real MLflow server and one tiny prepared dataset per session."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
REGISTERED_MODEL = "alexnet-registry"  # what two_runs registers
SECRET = "hunter2-do-not-log"  # an MLflow password in the first run's environment


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.data import DataContext

    # Generous logical CPUs on a 2-core machine: train workers and Ray Data time-share the cores.
    # The dashboard (127.0.0.1, a free port) serves the state API that Ray Train's cleaner polls.
    ray.init(num_cpus=6, dashboard_host="127.0.0.1", dashboard_port=_free_port())
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (free port): sqlite store and proxied artifacts in a temp dir."""
    from pipeline.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """4 classes × (24 train + 6 val) procedurally generated JPEGs in the ILSVRC-2012 layout."""
    from pipeline.data.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("raw"), num_classes=4, train_per_class=24, val_per_class=6, seed=3)


@pytest.fixture(scope="session")
def tiny_shards(ray_cluster, tiny_raw, tmp_path_factory):
    from pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare(tiny_raw, out, size=72, shard_size=32)
    return out


@pytest.fixture(scope="session")
def two_runs(ray_cluster, tiny_shards, mlflow_server, tmp_path_factory):
    """Two one-epoch runs registered on the session's server into REGISTERED_MODEL, on the same dataset.

    The first runs with MLflow credentials in its environment (they must not show anywhere).
    Yields (first summary, second summary, tracking URI, the driver's log lines).
    """
    import mlflow

    from pipeline import config, training

    tmp = tmp_path_factory.mktemp("registry")
    mlflow.set_tracking_uri(mlflow_server.url)
    lines: list[str] = []
    base = dict(
        data=str(tiny_shards), epochs=1, batch_size=8, storage_path=str(tmp / "runs"), experiment="registry",
        model_name=REGISTERED_MODEL, system_metrics_interval=1.0,
    )  # fmt: skip
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME")}
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SECRET})
    try:
        first = training.train(config.resolve("sample", **base, name="first"), log=lines.append)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    second = training.train(config.resolve("sample", **base, name="second", seed=1, lr=0.003), log=lines.append)
    yield first, second, mlflow_server.url, lines
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, reached the way users reach theirs.

    Sets the AWS variables for the session (endpoint, dummy credentials, region) and yields a
    pyarrow S3FileSystem on it; stopped by its own handle at the end.
    """
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
