"""Training that survives failures, in one MLflow run, on a real local Ray and a real `mlflow server`.

A train worker killed with SIGKILL mid-epoch and the MLflow server stopped and started again under
the same running job: no step counted twice or lost, no metric lost. A server still away at the
end: the metrics are kept in unsent_metrics.json and `--resume` sends them and registers the
model. The jobs run in this process (a thread), on the session's Ray. Checkpoints that do not fit
the model are refused. A job stopped with `ray job stop` and continued with --resume:
tests/test_cluster.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from conftest import assert_registered, light
from mlflow import MlflowClient

from pipeline import config
from pipeline.data.imagenet import ClassInfo
from pipeline.model import AlexNet
from pipeline.tracking import mlflow_client
from pipeline.train import checkpoint, driver, run
from pipeline.train.run import RUN_RECORD, UNSENT_FILE
from pipeline.train.spec import CheckpointMeta

KEYS = ("train_loss", "train_top1_error", "train_top5_error", "val_top1_error", "val_top5_error", "lr", "images_per_s")


@pytest.fixture
def outage(mlflow_server):
    """The session's server, running at the start of the test; `stop()` and `start()` it at will
    (the same port and store: what a client sees of a server restarted or briefly unreachable)."""
    if mlflow_server.process is None:  # a failed test left it stopped
        mlflow_server.start()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)  # the job's server: train() reads it from MLflow
    yield mlflow_server
    if mlflow_server.process is None:
        mlflow_server.start()
    mlflow.set_tracking_uri(previous)


class Job(threading.Thread):
    """driver.train(cfg) in a thread: what `python jobs/train.py` runs, on the session's Ray."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg, self.lines, self.summary, self.error = cfg, [], None, None
        self.start()

    def run(self) -> None:
        try:
            self.summary = driver.train(self.cfg, log=self.lines.append)
        except BaseException as exc:  # noqa: BLE001 (re-raised by result())
            self.error = exc

    def result(self, timeout: float = 400):
        self.join(timeout)
        assert not self.is_alive(), "the job did not finish"
        if self.error is not None:
            raise self.error
        return self.summary


def _wait_for(predicate, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


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


def _checkpointed_epoch(run_dir: Path) -> int:
    epochs = []
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        try:
            epochs.append(json.loads(meta.read_text())["progress"]["epoch"])
        except (OSError, ValueError):
            continue  # being written
    return max(epochs, default=0)


def _run_id(run_dir: Path) -> str:
    """The MLflow run of a job, from the run record its driver writes once the run is created."""
    return json.loads((run_dir / RUN_RECORD).read_text())["run_id"]


def _train_worker_pids() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def _assert_each_epoch_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in KEYS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key


@pytest.mark.slow
def test_a_killed_worker_and_a_server_outage_lose_no_step_and_no_metric(ray_cluster, tiny_shards, tmp_path, outage):
    # 96 images, 2 workers × batch 2: 24 steps per epoch, a checkpoint after steps 6, 12 and 18.
    cfg = light(
        data=str(tiny_shards), epochs=2, batch_size=2, workers=2, cpus_per_worker=1.0, checkpoint_every_steps=6,
        storage_path=str(tmp_path / "runs"), name="chaos", experiment="chaos", model_name="chaos",
    )  # fmt: skip
    job = Job(cfg)
    run_dir = tmp_path / "runs" / "chaos"
    client = MlflowClient(outage.url)

    # 1. A train worker is killed once a checkpoint in the middle of epoch 1 is registered.
    def mid_epoch() -> bool:  # mid-epoch reports carry the epochs done and the steps into the next
        metrics = _latest_registered(run_dir)
        return metrics.get("epoch") == 0 and metrics.get("step_in_epoch", 0) >= 6

    _wait_for(lambda: mid_epoch() or not job.is_alive(), "a registered checkpoint in the middle of epoch 1")
    workers = _train_worker_pids()
    assert workers and job.is_alive(), "the job ended before a worker could be killed"
    workers[0].send_signal(signal.SIGKILL)
    run_id = _run_id(run_dir)

    # 2. Once the restarted workers have counted themselves, the server goes away: the restart
    # resumed at step 6 or 12, so the end of epoch 1 (and its metrics) falls into the outage ...
    def restarted() -> bool:
        return any(m.value == 1 for m in client.get_metric_history(run_id, "restarts"))

    _wait_for(lambda: restarted() or not job.is_alive(), "the restarted worker group")
    assert job.is_alive(), "the job ended before the outage"
    outage.stop()
    _wait_for(lambda: _checkpointed_epoch(run_dir) >= 1 or not job.is_alive(), "the end of epoch 1")
    outage.start()  # ... and is back for epoch 2
    summary = job.result()

    assert summary.delayed_epochs >= 1  # `jobs/train.py` prints "N epoch(s) of metrics were sent late; none lost"
    runs = client.search_runs([client.get_experiment_by_name("chaos").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] == [summary.run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["restarts"] == "1"
    _assert_each_epoch_once(client, run_id, 2)
    restarts = client.get_metric_history(run_id, "restarts")
    assert sorted((m.step, m.value) for m in restarts) == [(0, 0), (0, 1)]  # restarted inside epoch 1
    # Epoch 1's metrics merge the steps before the kill (the checkpoint's partial sums) with those
    # after it, each counted once: every training image of the epoch, no more, no fewer.
    images = client.get_metric_history(run_id, "train_images")
    assert sorted((m.step, m.value) for m in images) == [(1, 96), (2, 96)]
    assert [m.value for m in client.get_metric_history(run_id, "val_images")] == [24, 24]
    assert_registered(client, "chaos", run_id)
    # The kill fell between reports: the best checkpoint is one Ray Train registered, whole, with
    # the best epoch's error (no copy that a lost worker could have left half made).
    best = checkpoint.read_meta(summary.checkpoint)
    errors = {m.step: m.value for m in client.get_metric_history(run_id, "val_top1_error")}
    assert best.epoch == summary.best["epoch"] and best.epoch_metrics["val_top1_error"] == min(errors.values())
    assert (Path(summary.checkpoint) / checkpoint.MODEL_FILE).is_file()


@pytest.mark.slow
def test_metrics_the_server_never_got_are_sent_by_resume_which_then_registers_the_model(
    ray_cluster, tiny_shards, tmp_path, outage, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the driver gives up on a dead server in seconds
    cfg = light(
        data=str(tiny_shards), epochs=1, batch_size=8, storage_path=str(tmp_path / "runs"), name="late",
        experiment="late", model_name="alexnet-late",
    )  # fmt: skip
    job = Job(cfg)
    client = MlflowClient(outage.url)
    run_dir = tmp_path / "runs" / "late"
    # The run record is written once the driver has created the MLflow run and logged its params.
    _wait_for(lambda: (run_dir / RUN_RECORD).is_file() or not job.is_alive(), "the job's run record")
    run_id = _run_id(run_dir)
    outage.stop()  # gone before epoch 1's metrics, and still gone when training ends
    with pytest.raises(mlflow_client.TrackingError) as failed:
        job.result()
    assert UNSENT_FILE in str(failed.value) and "--resume late" in str(failed.value)
    assert "registers the model" in str(failed.value)
    kept = json.loads((run_dir / UNSENT_FILE).read_text())
    assert [item["step"] for item in kept if item["kind"] == "epoch"] == [1]

    outage.start()
    lines: list[str] = []
    summary = driver.train(config.resolve(resume="late", storage_path=str(tmp_path / "runs")), log=lines.append)
    assert "sent 1 epoch(s) of metrics kept from the last attempt" in lines
    assert not (run_dir / UNSENT_FILE).exists()
    _assert_each_epoch_once(client, run_id, 1)
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED" and found.data.tags["restarts"] == "1"  # the resume, counted once
    assert summary.model_version == "1" and summary.restarts == 1
    assert_registered(client, "alexnet-late", run_id)


def test_resume_without_a_stopped_run_says_so(tmp_path):
    with pytest.raises(config.ConfigError, match="nothing to resume"):
        driver.train(config.resolve("sample", resume="nope", storage_path=str(tmp_path)))


def test_a_checkpoint_for_another_model_fails_saying_what_differs(tmp_path):
    cfg = light()  # a light checkpoint: this test is about what restore compares, not about the size
    meta = CheckpointMeta(cfg, tuple(ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(4)))
    net = AlexNet(4, fc_width=cfg.fc_width)
    checkpoint.save(tmp_path, net, torch.optim.SGD(net.parameters(), lr=0.1), meta)
    assert checkpoint.restore(tmp_path, AlexNet(4, fc_width=cfg.fc_width), cfg, 4) == meta
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


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path):
    from pipeline.storage import locate
    from pipeline.train.spec import Progress

    cfg = light()
    classes = tuple(ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(4))
    run_dir = tmp_path / "runs" / "r"
    names = [f"checkpoint_2026-12-01_0{h}-00-00.000000" for h in (1, 2, 3)]
    for epoch, name in enumerate(names, 1):
        (run_dir / name).mkdir(parents=True)
        net = AlexNet(4, fc_width=cfg.fc_width)
        checkpoint.save(run_dir / name, net, torch.optim.SGD(net.parameters(), lr=0.1),
                        CheckpointMeta(cfg, classes, Progress(epoch=epoch)))  # fmt: skip
    said: list[str] = []

    def restore(latest: str):
        model = AlexNet(4, fc_width=cfg.fc_width)
        place = locate(run_dir).join(latest)
        return checkpoint.restore_latest(place, locate(run_dir), model, cfg, 4, lambda m, **_: said.append(m))

    meta, _, used = restore(names[2])
    assert meta.epoch == 3 and used.name() == names[2] and not said
    with open(run_dir / names[2] / checkpoint.MODEL_FILE, "r+b") as f:  # truncated on its way to storage
        f.truncate(1000)
    meta, _, used = restore(names[2])
    assert meta.epoch == 2 and used.name() == names[1]
    assert (
        said[-1].startswith(f"checkpoint {run_dir / names[2]} (")
        and f"resuming from the previous one, {run_dir / names[1]}" in said[-1]
    )
    (run_dir / names[1] / checkpoint.OPTIMIZER_FILE).unlink()  # a partial one: not even a candidate
    (run_dir / names[0] / checkpoint.META_FILE).write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match=f"no checkpoint of {run_dir} can be read: "):
        restore(names[2])
    # A checkpoint for another model is not skipped over: an earlier one would not fit either.
    with pytest.raises(checkpoint.CheckpointMismatch, match="does not fit this model"):
        checkpoint.restore_latest(
            locate(run_dir).join(names[2]), locate(run_dir), AlexNet(10, fc_width=64), cfg, 10, print
        )


def test_a_run_that_stops_on_a_failure_says_what_failed_where_its_checkpoint_is_and_how_to_resume(tmp_path):
    from ray.exceptions import OutOfMemoryError
    from ray.train import ControllerError, WorkerGroupError

    from pipeline.storage import locate
    from pipeline.train.fit import explain_failure

    run_dir = tmp_path / "runs" / "big"
    for name in ("checkpoint_2026-11-30_10-00-00.000001", "checkpoint_2026-11-30_11-00-00.000002", "unsent"):
        (run_dir / name).mkdir(parents=True)
        for file in (checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.META_FILE):
            (run_dir / name / file).write_bytes(b"x")
    partial = run_dir / "checkpoint_2026-11-30_12-00-00.000003"  # killed while it was written: not named
    partial.mkdir()
    (partial / checkpoint.MODEL_FILE).write_bytes(b"x")
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own, not a checkpoint
    failures = {
        1: OutOfMemoryError("Task was killed due to the node running low on memory.\nsecond line"),
        0: ValueError(),
    }
    message = explain_failure(WorkerGroupError("...", failures), locate(run_dir), str(tmp_path / "runs"), 3)
    assert message.startswith("training stopped after 3 restart(s): rank 0: ValueError; rank 1: OutOfMemoryError:")
    assert "out of memory: lower --batch-size" in message and "second line" not in message
    assert f"the last complete checkpoint is {run_dir}/checkpoint_2026-11-30_11-00-00.000002;" in message
    assert message.endswith(f"continue with: python jobs/train.py --resume big --storage-path {tmp_path / 'runs'}")
    empty = explain_failure(ControllerError(RuntimeError("lost")), locate(tmp_path), "runs", 0)
    assert "no restarts allowed (--max-failures 0): RuntimeError: lost. no checkpoint was saved" in empty


def test_the_defaults_restart_a_lost_worker_group_three_times():
    assert config.resolve("sample").max_failures == config.resolve("imagenet").max_failures == 3


def test_resume_reads_the_run_where_storage_path_says_and_keeps_it_there(tmp_path):
    first = light(name="moved", storage_path=str(tmp_path / "old"), data=str(tmp_path / "shards"))
    moved = tmp_path / "new" / "moved"
    moved.mkdir(parents=True)
    record = {"run_id": None, "tracking_uri": None, "config": first.to_dict(), "data": str(tmp_path / "shards")}
    (moved / RUN_RECORD).write_text(json.dumps(record))
    cfg, found = run.resumed_config(config.resolve("sample", resume="moved", storage_path=str(tmp_path / "new")), print)
    assert found == record and cfg.storage_path == str(tmp_path / "new") and cfg.resume == "moved"
    assert dataclasses.replace(cfg, storage_path=first.storage_path, resume="") == first  # otherwise its own config


def test_checkpoint_staging_is_private_per_process_and_clears_only_its_runs_dead_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = tmp_path / f"alexnet-checkpoints-{os.getuid()}"
    base = mine / "run"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = int(gone.stdout)  # a process of this user that has exited
    leftovers = {
        "dead": base / f"{dead}-abc_1",  # a killed worker's: removed
        "alive": base / f"{os.getppid()}-abc_2",  # a running process's: kept
        "other": base / "notes",  # not a staging folder: kept
        "other run": mine / "run-2" / f"{dead}-abc_3",  # another run's: kept
    }
    mine.mkdir(mode=0o700)
    for path in leftovers.values():
        path.mkdir(parents=True)
    with checkpoint.staging("run") as first, checkpoint.staging("run") as second:
        assert first != second and first.parent == second.parent == base
        assert first.name.startswith(f"{os.getpid()}-") and oct(first.stat().st_mode & 0o777) == "0o700"
        (first / "model.pt").write_bytes(b"x")
    assert not first.exists() and not second.exists()
    assert not leftovers["dead"].exists()
    assert all(leftovers[k].is_dir() for k in ("alive", "other", "other run"))


def test_checkpoint_staging_refuses_a_folder_others_could_have_made_or_can_write(tmp_path, monkeypatch):
    """In a shared /tmp another user may create the staging folder first, or a link in its place."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = tmp_path / f"alexnet-checkpoints-{os.getuid()}"
    mine.mkdir()
    mine.chmod(0o777)  # left world-writable
    with pytest.raises(checkpoint.CheckpointError, match="is open to other users \\(mode 777\\)"):
        with checkpoint.staging("run"):
            pass
    mine.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    mine.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(checkpoint.CheckpointError, match="is a link"):
        with checkpoint.staging("run"):
            pass
    mine.unlink()
    if os.getuid() == 0:  # as root the test can make it another user's
        mine.mkdir(mode=0o700)
        os.chown(mine, 65534, 65534)
        with pytest.raises(checkpoint.CheckpointError, match="belongs to user id 65534, not 0"):
            with checkpoint.staging("run"):
                pass
        mine.rmdir()
    with checkpoint.staging("run") as folder:  # made afresh: this user's, 0700
        assert folder.parent.parent == mine and oct(mine.stat().st_mode & 0o777) == "0o700"
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_resume_logs_to_this_environments_server_not_the_one_its_record_names(tmp_path):
    """Whoever can write a run record (a shared bucket) must not be able to send this job's MLflow login elsewhere."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    here = f"sqlite:///{tmp_path / 'here.db'}"
    said: list[str] = []
    record = {"run_id": "0123", "tracking_uri": "http://mlflow.attacker.example:5000"}
    with _use_tracking_uri(here):  # this environment's server (and back to the session's after)
        assert run.tracking_uri(config.resolve("sample", resume="r"), record, said.append) == here
    assert said == [
        f"the run record names MLflow at http://mlflow.attacker.example:5000; this job uses {here} from this "
        "environment (set MLFLOW_TRACKING_URI to the record's server if that is where the run lives)"
    ]
    with pytest.raises(
        mlflow_client.TrackingError,
        match=f"MLflow run 0123 is not on the server at {here}; its run record names http://mlflow.attacker",
    ):
        mlflow_client.reopen_run(here, "0123", record["tracking_uri"])


def test_resume_applies_the_flags_a_resumed_run_may_change_and_refuses_the_others(tmp_path):
    recorded = light(name="r", storage_path=str(tmp_path / "runs"), data=str(tmp_path / "shards"), epochs=2)
    (tmp_path / "runs" / "r").mkdir(parents=True)
    record = {"run_id": None, "tracking_uri": None, "config": recorded.to_dict(), "data": recorded.data}
    (tmp_path / "runs" / "r" / RUN_RECORD).write_text(json.dumps(record))
    said: list[str] = []
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)

    def resume(*argv: str):
        args = parser.parse_args(["--resume", "r", "--storage-path", str(tmp_path / "runs"), *argv])
        return run.resumed_config(config.from_args(args), said.append, config.given(args))[0]

    cfg = resume("--epochs", "5", "--max-failures", "7", "--stall-warning", "30")
    assert (cfg.epochs, cfg.max_failures, cfg.stall_warning) == (5, 7, 30.0)
    assert dataclasses.replace(cfg, epochs=2, max_failures=recorded.max_failures, stall_warning=recorded.stall_warning,
                               resume="", storage_path=recorded.storage_path) == recorded  # fmt: skip
    assert "(--epochs 5; --max-failures 7; --stall-warning 30.0)" in said[-1], said
    assert resume().epochs == 2 and said[-1].endswith("with its own config (nothing changed)")
    assert resume("--lr", str(recorded.lr)).lr == recorded.lr  # the run's own value: nothing to refuse
    with pytest.raises(
        config.ConfigError, match=r"--fc-width \(the run's: 64\), --lr \(the run's: 0.01\) cannot change"
    ):
        resume("--lr", "0.1", "--fc-width", "128")
