"""MLflow outages during training: a real `mlflow server` stopped and restarted under a running job.

Metrics are never lost: while the server is away rank 0 keeps them and sends them when it is back;
if it is still away at the end, the driver keeps them in unsent_metrics.json and `--resume` sends
them and registers the model. The jobs run in this process (a thread), on the session's Ray.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import light
from mlflow import MlflowClient

from pipeline import config, tracking, training
from pipeline.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow
KEYS = ("train_loss", "train_top1_error", "train_top5_error", "val_top1_error", "val_top5_error", "train_images")


@pytest.fixture
def server(tmp_path):
    """A server of the test's own, which the test stops and starts again on the same port and store."""
    holder = {"server": MlflowServer(tmp_path / "server").start()}
    previous = mlflow.get_tracking_uri()
    yield holder
    holder["server"].stop()
    mlflow.set_tracking_uri(previous)  # train() points MLflow at the job's server


class Job(threading.Thread):
    """training.train(cfg) in a thread: what `python jobs/train.py` runs, on the session's Ray."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg, self.lines, self.summary, self.error = cfg, [], None, None
        self.start()

    def run(self) -> None:
        try:
            self.summary = training.train(self.cfg, log=self.lines.append)
        except BaseException as exc:  # noqa: BLE001 (re-raised by result())
            self.error = exc

    def result(self, timeout: float = 400):
        self.join(timeout)
        assert not self.is_alive(), "the job did not finish"
        if self.error is not None:
            raise self.error
        return self.summary


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _run_of(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return runs[0].info.run_id if runs else None


def _epoch_logged(client: MlflowClient, experiment: str, epoch: int):
    run_id = _run_of(client, experiment)
    if run_id and epoch in {m.step for m in client.get_metric_history(run_id, "val_top1_error")}:
        return run_id
    return None


def _checkpointed_epoch(run_dir: Path) -> int:
    epochs = []
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        try:
            epochs.append(json.loads(meta.read_text())["epoch"])
        except (OSError, ValueError):
            continue  # being written
    return max(epochs, default=0)


def _assert_each_epoch_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in KEYS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key


def _cfg(tiny_shards, tmp_path, name: str, epochs: int, batch_size: int = 8):
    return light(
        data=str(tiny_shards), epochs=epochs, batch_size=batch_size, storage_path=str(tmp_path / "runs"), name=name,
        experiment=name, model_name=f"alexnet-{name}",
    )  # fmt: skip


def test_a_server_outage_mid_run_loses_no_metrics(ray_cluster, tiny_shards, tmp_path, server):
    mlflow.set_tracking_uri(server["server"].url)
    job = Job(_cfg(tiny_shards, tmp_path, "outage", epochs=3, batch_size=4))  # 24 steps: epoch 2 takes a while
    client = MlflowClient(server["server"].url)
    run_id = _wait_for(lambda: _epoch_logged(client, "outage", 1), 240, "epoch 1 in MLflow")
    server["server"].stop()  # the server goes away after epoch 1 ...
    _wait_for(lambda: _checkpointed_epoch(tmp_path / "runs" / "outage") >= 2 or not job.is_alive(), 240, "epoch 2")
    server["server"] = MlflowServer(tmp_path / "server", port=server["server"].port).start()  # ... and comes back
    summary = job.result()
    assert summary.delayed_epochs >= 1  # `jobs/train.py` prints "N epoch(s) of metrics were sent late; none lost"
    _assert_each_epoch_once(client, run_id, 3)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_model_version_by_alias("alexnet-outage", "champion").run_id == run_id


def test_metrics_the_server_never_got_are_sent_by_resume_which_then_registers_the_model(
    ray_cluster, tiny_shards, tmp_path, server, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the driver gives up on a dead server in seconds
    mlflow.set_tracking_uri(server["server"].url)
    job = Job(_cfg(tiny_shards, tmp_path, "late", epochs=1))
    client = MlflowClient(server["server"].url)
    run_id = _wait_for(lambda: _run_of(client, "late"), 240, "the job's MLflow run")
    server["server"].stop()  # gone before epoch 1's metrics, and still gone when training ends
    with pytest.raises(tracking.TrackingError) as failed:
        job.result()
    assert training.UNSENT_FILE in str(failed.value) and "--resume late" in str(failed.value)
    assert "registers the model" in str(failed.value)
    run_dir = tmp_path / "runs" / "late"
    kept = json.loads((run_dir / training.UNSENT_FILE).read_text())
    assert [item["step"] for item in kept if item["kind"] == "epoch"] == [1]

    server["server"] = MlflowServer(tmp_path / "server", port=server["server"].port).start()
    lines: list[str] = []
    summary = training.train(config.resolve(resume="late", storage_path=str(tmp_path / "runs")), log=lines.append)
    assert "sent 1 epoch(s) of metrics kept from the last attempt" in lines
    assert not (run_dir / training.UNSENT_FILE).exists()
    _assert_each_epoch_once(client, run_id, 1)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "1"  # the resume, counted once
    assert summary.model_version == "1" and summary.restarts == 1
    assert client.get_model_version_by_alias("alexnet-late", "champion").run_id == run_id
