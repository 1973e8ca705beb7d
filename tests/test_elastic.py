"""Elastic training (`--workers MIN:MAX`) on real Ray clusters: it starts with the workers it can
place, and the global batch, the lr and the schedule stay the configured ones at every world size.

The accumulation arithmetic and the accumulated step are unit-tested in test_config.py and
test_training.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import FC_WIDTH, free_port, job_env, run_job
from mlflow import MlflowClient


class RayHead:
    """A one-node Ray cluster without an autoscaler: `ray start --head --block` in a session of its
    own, with its own temp dir (never the machine's "current" cluster) and ports, stopped through
    its process group."""

    def __init__(self, cpus: int, resources: dict[str, float]) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rel", dir="/tmp"))  # short: Ray's socket paths
        self.address = f"127.0.0.1:{free_port()}"
        self.cpus, self.resources = cpus, resources
        self.process: subprocess.Popen | None = None

    def start(self) -> RayHead:
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", str(self.cpus),
            "--resources", json.dumps(self.resources), "--port", self.address.rsplit(":", 1)[1],
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(self.temp_dir),
        ]  # fmt: skip
        env = job_env()
        log = (self.temp_dir / "head.log").open("wb")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _answers(self.address):
            assert self.process.poll() is None, (self.temp_dir / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start within 60 s"
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _answers(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def two_gpu_node():
    """A node with room for two of four train workers (mock GPUs), and CPUs for Ray Data beside them."""
    head = RayHead(cpus=4, resources={"mock_gpu": 2}).start()
    yield head
    head.stop()


@pytest.mark.slow
def test_an_elastic_run_starts_with_the_workers_it_can_place_and_keeps_the_configured_global_batch(
    two_gpu_node, tiny_shards, mlflow_server, tmp_path
):
    # 96 training images, batch 8 per worker, at most 4 workers: a global batch of 32, 3 steps per epoch.
    env = {**job_env(None, mlflow_server.url), "RAY_ADDRESS": two_gpu_node.address}
    proc = run_job(
        "jobs/train.py", "--fc-width", FC_WIDTH, "--data", tiny_shards, "--epochs", 1, "--batch-size", 8,
        "--workers", "1:4", "--worker-resources", "mock_gpu=1", "--cpus-per-worker", 1,
        "--storage-path", tmp_path / "runs", "--name", "elastic", "--experiment", "elastic", "--model-name", "elastic",
        env=env,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "2 train worker(s) of 1..4: global batch 32 (2 × 8 × 2 micro-batch(es) per step), lr 0.0025" in out
    assert "train workers     2 (epoch 1); global batch 32 throughout" in out

    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("elastic").experiment_id])
    assert (run.data.params["workers"], run.data.params["min_workers"], run.data.params["global_batch"]) == (
        "4",
        "1",
        "32",
    )
    for key, value in (("world_size", 2), ("global_batch", 32)):
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == [(1, value)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1_error")] == [1]
    assert client.get_model_version("elastic", "1").run_id == run.info.run_id
