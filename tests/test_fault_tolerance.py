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
from conftest import light
from mlflow import MlflowClient

from pipeline import checkpoint, config, training
from pipeline.model import AlexNet

EPOCH_METRICS = ["train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "lr", "images_per_s"]


def _latest_registered(run_dir: Path) -> dict:
    """The metrics of the checkpoint Ray Train would restore now (its checkpoint manager's snapshot).

    A checkpoint's files are on disk a little before Ray Train registers it as the latest: a
    restart in between resumes from the one before.
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return {}  # not written yet, or being written
    return (snapshot.get("latest_checkpoint_result") or {}).get("metrics", {})


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


@pytest.mark.slow
def test_a_killed_worker_resumes_mid_epoch_in_the_same_mlflow_run(ray_cluster, tiny_shards, tmp_path, tracking):
    # 96 images, 2 workers × batch 4: 12 steps per epoch, a checkpoint after steps 3, 6 and 9. A worker
    # is killed once the checkpoint after step 3 is registered: 9 steps of the epoch are left.
    cfg = light(
        data=str(tiny_shards),
        epochs=1,
        batch_size=4,
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

    def mid_epoch() -> bool:  # mid-epoch reports carry the epochs done and the steps into the next
        metrics = _latest_registered(run_dir)
        return metrics.get("epoch") == 0 and metrics.get("step_in_epoch", 0) >= 3

    _wait_for(lambda: mid_epoch() or not job.is_alive(), "a registered checkpoint in the middle of the epoch")
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
    _assert_each_epoch_once(client, outcome["summary"].run_id, 1)
    restarts = client.get_metric_history(outcome["summary"].run_id, "restarts")
    assert sorted((m.step, m.value) for m in restarts) == [(0, 0), (0, 1)]  # restarted inside epoch 1
    # The epoch's metrics merge the steps before the kill (the checkpoint's partial sums) with those
    # after it, each counted once: every training image of the epoch, no more, no fewer.
    images = client.get_metric_history(outcome["summary"].run_id, "train_images")
    assert [(m.step, m.value) for m in images] == [(1, 96)]
    assert [m.value for m in client.get_metric_history(outcome["summary"].run_id, "val_images")] == [24]


def test_resume_without_a_stopped_run_says_so(tmp_path):
    with pytest.raises(config.ConfigError, match="nothing to resume"):
        training.train(config.resolve("sample", resume="nope", storage_path=str(tmp_path)))


def test_a_checkpoint_for_another_model_fails_saying_what_differs(tmp_path):
    cfg = light()  # a light checkpoint: this test is about what restore compares, not about the size
    meta = {"classes": [{"index": i} for i in range(4)], "config": cfg.to_dict()}
    net = AlexNet(4, fc_width=cfg.fc_width)
    checkpoint.save(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), meta)
    assert checkpoint.restore(tmp_path, AlexNet(4, fc_width=cfg.fc_width), cfg, 4)["classes"] == meta["classes"]
    with pytest.raises(checkpoint.CheckpointError, match="4 classes in the checkpoint, 10 here"):
        checkpoint.restore(tmp_path, AlexNet(10, fc_width=cfg.fc_width), cfg, 10)
    with pytest.raises(checkpoint.CheckpointError, match="lrn=False in the checkpoint, lrn=True here"):
        checkpoint.restore(tmp_path, AlexNet(4, lrn=True, fc_width=cfg.fc_width), light(lrn=True), 4)
    with pytest.raises(checkpoint.CheckpointError, match="fc_width=64 in the checkpoint, fc_width=4096 here"):
        checkpoint.restore(tmp_path, AlexNet(4), config.resolve("sample"), 4)
    state = AlexNet(4, fc_width=cfg.fc_width).state_dict()
    state["features.0.weight"] = torch.zeros(32, 3, 11, 11)
    torch.save(state, tmp_path / checkpoint.MODEL_FILE)
    with pytest.raises(checkpoint.CheckpointError, match=r"features.0.weight: \(32, 3, 11, 11\) vs \(64, 3, 11, 11\)"):
        checkpoint.restore(tmp_path, AlexNet(4, fc_width=cfg.fc_width), cfg, 4)
