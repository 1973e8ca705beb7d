"""Training that survives a killed worker, in one MLflow run, on a real local Ray; checkpoints that do not fit.

A job stopped with `ray job stop` and continued with --resume: tests/test_cluster.py.
"""

import json
import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow import MlflowClient

from pipeline import checkpoint, config, training
from pipeline.model import AlexNet

ROOT = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ["train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "lr", "images_per_s"]


def _progress(run_dir: Path) -> list[dict]:
    """Progress of every complete checkpoint in the run directory."""
    found = []
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        try:
            found.append(json.loads(meta.read_text())["progress"])
        except (OSError, ValueError):
            continue  # being written
    return found


def _wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _assert_each_epoch_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key


@pytest.fixture
def tracking(mlflow_server):
    uri = mlflow_server.url
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_a_killed_worker_resumes_mid_epoch_in_the_same_mlflow_run(ray_cluster, tiny_shards, tmp_path, tracking):
    # 96 images, 2 workers × batch 8: 6 steps per epoch, a checkpoint after step 3 of each.
    cfg = config.resolve(
        "sample",
        data=str(tiny_shards),
        epochs=2,
        batch_size=8,
        workers=2,
        cpus_per_worker=1.0,
        checkpoint_every_steps=3,
        max_failures=2,
        storage_path=str(tmp_path / "runs"),
        name="killed",
        experiment="fault-tolerance",
        model_name="fault-tolerance",
    )
    outcome = {}

    def run():
        try:
            outcome["summary"] = training.train(cfg, log=lambda message: None)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test thread)
            outcome["error"] = exc

    job = threading.Thread(target=run)
    job.start()
    run_dir = tmp_path / "runs" / "killed"
    _wait_for(
        lambda: any(p["epoch"] == 1 and p["step_in_epoch"] == 3 for p in _progress(run_dir)) or not job.is_alive(),
        "a checkpoint in the middle of epoch 2",
    )
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers and job.is_alive(), "the job ended before a worker could be killed"
    workers[0].send_signal(signal.SIGKILL)
    job.join(timeout=600)
    if "error" in outcome:
        raise outcome["error"]

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("fault-tolerance")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [outcome["summary"].run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["restarts"] == "1"
    _assert_each_epoch_once(client, outcome["summary"].run_id, 2)
    restarts = client.get_metric_history(outcome["summary"].run_id, "restarts")
    assert sorted((m.step, m.value) for m in restarts) == [(0, 0), (1, 1)]  # restarted after epoch 1


def test_resume_without_a_stopped_run_says_so(tmp_path):
    with pytest.raises(config.ConfigError, match="nothing to resume"):
        training.train(config.resolve("sample", resume="nope", storage_path=str(tmp_path)))


def test_a_checkpoint_for_another_model_fails_saying_what_differs(tmp_path):
    meta = {"classes": [{"index": i} for i in range(4)], "config": config.resolve("sample").to_dict()}
    checkpoint.save(tmp_path, AlexNet(4), torch.optim.SGD(AlexNet(4).parameters(), lr=0.1), meta)
    cfg = config.resolve("sample")
    assert checkpoint.restore(tmp_path, AlexNet(4), cfg, 4)["classes"] == meta["classes"]
    with pytest.raises(checkpoint.CheckpointError, match="4 classes in the checkpoint, 10 here"):
        checkpoint.restore(tmp_path, AlexNet(10), cfg, 10)
    with pytest.raises(checkpoint.CheckpointError, match="lrn=False in the checkpoint, lrn=True here"):
        checkpoint.restore(tmp_path, AlexNet(4, lrn=True), config.resolve("sample", lrn=True), 4)
    state = AlexNet(4).state_dict()
    state["features.0.weight"] = torch.zeros(32, 3, 11, 11)
    torch.save(state, tmp_path / checkpoint.MODEL_FILE)
    with pytest.raises(checkpoint.CheckpointError, match=r"features.0.weight: \(32, 3, 11, 11\) vs \(64, 3, 11, 11\)"):
        checkpoint.restore(tmp_path, AlexNet(4), cfg, 4)
