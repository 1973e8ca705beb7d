"""A run that diverges stops, says where and what to change, and nothing it made is registered or served."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FC_WIDTH, SECRET, job_env, light, run_job
from mlflow import MlflowClient

from pipeline.data.device import DeviceAugment
from pipeline.errors import TrainingDiverged
from pipeline.model import AlexNet
from pipeline.scoring import evaluation, inference, loading
from pipeline.step import StepPlan, train_step
from pipeline.tracking.registry import Registry
from pipeline.train import registration


def _model_and_step(lr: float):
    torch.manual_seed(0)
    model = AlexNet.from_config(4, light().to_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    return model, optimizer, DeviceAugment(torch.device("cpu"), 0.0), images, labels


def test_a_loss_or_gradient_that_is_not_finite_is_counted_on_the_device():
    model, optimizer, augment, images, labels = _model_and_step(lr=0.01)
    counts = torch.zeros(2, dtype=torch.float64)
    train_step(model, optimizer, augment, images, labels, StepPlan(clip_grad_norm=5.0), nonfinite=counts)
    assert counts.tolist() == [0.0, 0.0]
    with torch.no_grad():  # what an absurd lr leaves behind after a few steps
        model.classifier[-1].weight.fill_(math.inf)
    train_step(model, optimizer, augment, images, labels, StepPlan(clip_grad_norm=5.0), nonfinite=counts)
    assert counts.tolist() == [1.0, 1.0]  # the loss, and the clipped gradient's norm


def test_a_checkpoint_with_weights_or_metrics_that_are_not_finite_is_never_registered(tmp_path):
    model, *_ = _model_and_step(lr=0.01)
    metrics = {"epoch": 1, "val_top1_error": 0.5, "val_loss": 1.2}
    registration.check_finite(tmp_path, model, metrics)  # finite: nothing to say
    with pytest.raises(TrainingDiverged, match=r"is not finite \(val_loss\): it is not registered"):
        registration.check_finite(tmp_path, model, {**metrics, "val_loss": math.nan})
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match=r"is not finite \(weights features.0.weight\)"):
        registration.check_finite(tmp_path, model, metrics)


def test_a_version_no_better_than_chance_is_never_promoted_whatever_the_policy(tmp_path):
    uri, name = f"sqlite:///{tmp_path / 'm.db'}", "alexnet-chance"
    client, registry = MlflowClient(uri), Registry(uri, settle_s=0.05)
    run_id = client.create_run(client.create_experiment("chance")).info.run_id
    client.create_registered_model(name)

    def register(error: str) -> str:
        tags = {"val_top1_error": error, "dataset_hash": "a", "num_classes": "4"}
        return client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version

    for error in ("0.7500", "0.9000", "nan"):
        for policy in ("if-better", "always"):
            decision = registry.decide(name, register(error), policy)
            assert decision.alias == "challenger" and "no better than chance (0.7500 for 4 classes)" in decision.reason
    assert registry.settle(name, register("0.7000"), "if-better").alias == "champion"


def test_probabilities_that_are_not_finite_are_error_rows_and_never_hits():
    probs = torch.full((3, 1, 4), 0.25)
    probs[1, 0, 2] = math.nan
    batch = {"path": np.array(["a.jpg", "b.jpg", "c.jpg"], dtype=object), "error": np.array(["", "", "bad file"])}
    ref = loading.ModelRef(uri="x", crop=64, wnids=["a", "b", "c", "d"], run_id=None, tracking_uri="", names=("A",) * 4)
    rows = inference.top_five(probs, batch, ref).to_pylist()
    assert [r["error"] for r in rows] == [None, inference.NONFINITE, "bad file"]
    assert rows[1]["top5_probs"] is None and rows[0]["top1_prob"] == pytest.approx(0.25)
    scored = evaluation.hits(probs, {"label": np.array([0, 2, 0])})
    assert scored["centre_top5"].tolist() == [1, 0, 1] and scored["nonfinite"].tolist() == [0, 1, 0]


@pytest.mark.slow  # trains (a few steps) on the session's cluster and server
def test_a_run_with_an_absurd_lr_stops_with_the_divergence_named_and_registers_nothing(
    ray_cluster, tiny_shards, mlflow_server, tmp_path
):
    """Through the job, as a user starts it, logging in through a tracking URI that carries the password."""
    host = mlflow_server.url.removeprefix("http://")
    env = job_env(ray_cluster, tracking_uri=f"http://alice:{SECRET}@{host}")
    args = [
        "--data", tiny_shards, "--fc-width", FC_WIDTH, "--batch-size", 4, "--epochs", 2, "--lr", "1e6",
        "--workers", 2, "--cpus-per-worker", 1,
        "--checkpoint-every-steps", 1, "--storage-path", tmp_path / "runs", "--name", "absurd-lr",
        "--experiment", "alexnet-diverged", "--model-name", "alexnet-diverged",
    ]  # fmt: skip
    proc = run_job("jobs/train.py", *args, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged at epoch 1, step "), error
    assert "nothing was registered" in error and "the last finite checkpoint is " in error
    assert "lower --lr (this one: 1e+06" in error and "--warmup-epochs" in error
    assert SECRET not in proc.stdout + proc.stderr
    # Both workers stopped at the same step (rank 0 says so), and Ray Train did not retry it as if a
    # node had died: one attempt, stopped once, no worker left waiting in a collective.
    assert proc.stdout.count("stopping: training diverged") == 1, proc.stdout[-3000:]
    assert "restart" not in proc.stdout.lower().replace("restarts so far", ""), proc.stdout[-3000:]

    client = MlflowClient(mlflow_server.url)
    assert not client.search_registered_models(filter_string="name = 'alexnet-diverged'")
    experiment = client.get_experiment_by_name("alexnet-diverged")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags["diverged"].startswith("training diverged")
    # Every checkpoint kept holds finite weights: the one the error names loads and is finite.
    named = error.split("the last finite checkpoint is ", 1)[1].split(" ", 1)[0].rstrip(".;,")
    from pipeline.train import checkpoint

    net, meta = checkpoint.load_model(named)
    assert all(torch.isfinite(t).all() for t in net.state_dict().values()) and meta.progress.step_in_epoch >= 1
