"""The paper's ReLU vs tanh experiment as a job: real Ray Train runs, real MLflow parent and child runs."""

import json
import pickle
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import call_job
from mlflow import MlflowClient
from PIL import Image

from pipeline.experiments import relu_vs_tanh

EPOCHS, TARGET = 4, 0.5  # 96 tiny images: the plumbing of the experiment, not its result (README: the sample)


def _write_cifar10(root: Path, per_batch: int, seed: int = 0) -> np.ndarray:
    """A CIFAR-10 folder in its python format (five data batches, a test batch, the meta file)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    everything = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        rows = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # channel-major rows, as CIFAR stores them
        with (root / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": rows}, f)
        if name != "test_batch":
            everything.append(images)
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, f)
    return np.concatenate(everything)


def test_cifar10_pickles_load_as_nhwc_images(tmp_path):
    written = _write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=7)
    images, labels = relu_vs_tanh.load_cifar10(tmp_path / "cifar-10-batches-py")
    assert images.shape == (35, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (35,)
    assert np.array_equal(images, written)  # channel-major rows turned into pixels exactly
    with pytest.raises(relu_vs_tanh.DataError, match="no CIFAR-10 training batches"):
        relu_vs_tanh.load_cifar10(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(relu_vs_tanh.DataError, match="is not a CIFAR-10 python batch"):
        relu_vs_tanh.load_cifar10(tmp_path / "broken")


class _Payload:
    """What a crafted batch holds: unpickling it calls a function of the attacker's choice."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_cifar10_folder_with_a_crafted_pickle_runs_nothing(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar10(root, per_batch=3)
    marker = tmp_path / "the-payload-ran"
    with (root / "data_batch_2").open("wb") as f:
        pickle.dump({b"labels": [0], b"data": _Payload(marker)}, f)
    with pytest.raises(relu_vs_tanh.DataError, match=r"data_batch_2 is not a CIFAR-10 python batch .*pathlib"):
        relu_vs_tanh.load_cifar10(root)
    assert not marker.exists()
    proc = call_job("jobs/relu_vs_tanh.py", "--cifar10", root, "--output", tmp_path / "out", "--no-tracking")
    assert proc.returncode == 2 and "data_batch_2 is not a CIFAR-10 python batch" in proc.stderr
    assert not marker.exists()
    with (root / "data_batch_2").open("wb") as f:  # the same pickled as stdlib pickle would load it: the threat
        pickle.dump(_Payload(marker), f)
    with (root / "data_batch_2").open("rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_epochs_to_target_interpolates_between_epochs():
    assert relu_vs_tanh.epochs_to_target([0.9, 0.5, 0.2], 0.25) == pytest.approx(1 + 0.25 / 0.3)
    assert relu_vs_tanh.epochs_to_target([0.9, 0.25], 0.25) == pytest.approx(1.0)
    assert relu_vs_tanh.epochs_to_target([0.9, 0.6, 0.3], 0.25) is None


@pytest.mark.slow
def test_the_job_on_the_sample_dir_trains_both_arms_and_logs_the_figure(
    ray_cluster, mlflow_server, tiny_shards, tmp_path
):
    # The job's default data: the bundled sample's shards in --sample-dir, found there already
    # prepared (here: the session's tiny shards, so nothing is generated), resized to 32×32.
    sample = tmp_path / "sample"
    shutil.copytree(tiny_shards, sample / "shards")
    out = tmp_path / "out"
    args = ["--sample-dir", sample, "--epochs", EPOCHS, "--batch-size", "8", "--target-error", TARGET, "--output", out]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)  # the job logs to the tracking URI in effect
    try:
        proc = call_job("jobs/relu_vs_tanh.py", *args)  # on the session's Ray
    finally:
        mlflow.set_tracking_uri(previous)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "generating the sample" not in proc.stdout and not (sample / "raw").exists()
    result = json.loads((out / "relu_vs_tanh.json").read_text())
    assert result["data"] == f"{sample / 'shards'} at 32×32"
    assert result["target_error"] == TARGET and result["epochs"] == EPOCHS
    curves = {name: arm["training_error"] for name, arm in result["arms"].items()}
    assert sorted(curves) == ["relu", "tanh"] and all(len(c) == EPOCHS + 1 for c in curves.values())  # + untrained
    reached = {name: relu_vs_tanh.epochs_to_target(curve, TARGET) for name, curve in curves.items()}
    assert result["epochs_to_target"] == reached
    assert all(result["arms"][name]["epochs_to_target"] == epochs for name, epochs in reached.items())
    if reached["relu"] and reached["tanh"]:
        assert result["ratio"] == pytest.approx(reached["tanh"] / reached["relu"])
    else:
        assert result["ratio"] is None

    with Image.open(out / "relu_vs_tanh.png") as png:
        assert png.format == "PNG" and png.size[0] >= 600 and png.size[1] >= 400
        assert len(set(png.convert("RGB").getdata())) > 50  # curves, text, legend: not a blank canvas

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("relu-vs-tanh")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {
        r.data.params["activation"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"relu", "tanh"}
    for name, child in children.items():
        history = client.get_metric_history(child.info.run_id, "training_error")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == result["arms"][name]["training_error"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"relu_vs_tanh.png", "relu_vs_tanh.json"} <= artifacts
