"""End to end on a real local Ray, real Parquet shards of real JPEGs and a real MLflow server."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from mlflow import MlflowClient
from PIL import Image

from pipeline import checkpoint, config, evaluation, training
from pipeline.config import ConfigError
from pipeline.data.shards import DataError
from pipeline.data.stats import compute_stats
from pipeline.data.transforms import eval_batch
from pipeline.mlflow_server import free_port
from pipeline.model import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "images_per_s", "data_wait_fraction"]


@pytest.fixture(scope="module")
def measured_shards(ray_cluster, tiny_shards, tmp_path_factory):
    """tiny_shards with their own stats.json: training must use it instead of the published values."""
    root = shutil.copytree(tiny_shards, tmp_path_factory.mktemp("measured") / "shards")
    compute_stats(str(root))
    return root


@pytest.fixture(scope="module")
def trained(ray_cluster, measured_shards, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    uri = mlflow_server.url
    mlflow.set_tracking_uri(uri)
    cfg = config.resolve(
        "sample",
        data=str(measured_shards),
        epochs=2,
        batch_size=8,
        workers=2,
        storage_path=str(tmp / "runs"),
        experiment="alexnet-test",
        model_name="alexnet-test",
    )
    summary = training.train(cfg)
    yield summary, cfg, uri
    mlflow.set_tracking_uri(None)


def test_the_run_holds_every_epochs_metrics_exactly_once(trained):
    summary, cfg, uri = trained
    client = MlflowClient(uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == summary.run_name
    for key in METRICS:
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == [1, 2], key
    assert {k: run.data.params[k] for k in cfg.to_dict()} == {k: str(v) for k, v in cfg.to_dict().items()}
    assert run.data.tags["dataset_hash"] and run.data.tags["num_classes"] == "4"


def test_the_run_says_which_colour_statistics_it_used(trained, measured_shards):
    summary, _, uri = trained
    run = MlflowClient(uri).get_run(summary.run_id)
    assert run.data.params["colour_stats"] == f"dataset {run.data.tags['dataset_hash']} (stats.json)"
    logged = json.loads(Path(MlflowClient(uri).download_artifacts(summary.run_id, "stats.json")).read_text())
    measured = json.loads((measured_shards / "stats.json").read_text())
    assert {k: logged[k] for k in ("mean", "std", "eigenvalues", "eigenvectors")} == {
        k: measured[k] for k in ("mean", "std", "eigenvalues", "eigenvectors")
    }


def test_validation_counts_every_image_across_workers(trained, measured_shards):
    summary, _, uri = trained
    n = json.loads((measured_shards / "manifest.json").read_text())["splits"]["val"]["images"]
    for m in MlflowClient(uri).get_metric_history(summary.run_id, "val_top1_error"):
        assert m.value * n == pytest.approx(round(m.value * n), abs=1e-6)  # a whole number of the 24 images


def test_the_best_epoch_is_kept_apart_from_the_most_recent_checkpoints(trained):
    summary, cfg, _ = trained
    run_dir = Path(cfg.storage_path) / summary.run_name
    assert summary.checkpoint == str(run_dir / f"best-epoch-{summary.best['epoch']:04d}")
    assert json.loads((run_dir / "best.json").read_text())["epoch"] == summary.best["epoch"]
    assert len(list(run_dir.glob("best-epoch-*"))) == 1  # an earlier best is removed
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == cfg.keep_checkpoints  # K most recent


def test_the_checkpoint_describes_itself(trained):
    summary, cfg, _ = trained
    meta = checkpoint.read_meta(summary.checkpoint)
    assert meta["config"] == cfg.to_dict() and meta["run_id"] == summary.run_id
    assert [c["wnid"] for c in meta["classes"]] == ["n01440764", "n01443537", "n01484850", "n01491361"]
    assert meta["epoch"] == summary.best["epoch"]
    assert set(checkpoint.load_state(summary.checkpoint, checkpoint.OPTIMIZER_FILE)) == {"state", "param_groups"}


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_the_registered_model_loads_by_version_and_matches_the_checkpoint(trained, measured_shards, batch, tmp_path):
    summary, _, uri = trained
    model_uri = f"models:/{summary.model_name}/{summary.model_version}"
    rows = pq.read_table(measured_shards / "val").slice(0, batch).to_pydict()
    images = eval_batch({"image": np.array(rows["image"], dtype=object), "label": np.array(rows["label"])}, 64)["image"]

    stats = json.loads((measured_shards / "stats.json").read_text())  # normalised as in training
    net, _ = checkpoint.load_model(summary.checkpoint)
    expected = ImageClassifier(net, stats["mean"], stats["std"]).eval()(torch.from_numpy(images))

    (tmp_path / "pytorch").mkdir()  # downloads here, not into a temporary directory MLflow never deletes
    (tmp_path / "pyfunc").mkdir()
    loaded = mlflow.pytorch.load_model(model_uri, dst_path=str(tmp_path / "pytorch"))
    torch.testing.assert_close(loaded(torch.from_numpy(images)), expected, rtol=1e-4, atol=1e-4)
    pyfunc = mlflow.pyfunc.load_model(model_uri, dst_path=str(tmp_path / "pyfunc"))
    np.testing.assert_allclose(pyfunc.predict(images), expected.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_the_registered_model_carries_its_class_index(trained, tmp_path):
    summary, _, _ = trained
    model_uri = f"models:/{summary.model_name}/{summary.model_version}"
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path))
    classes = json.loads(next(Path(local).rglob("classes.json")).read_text())
    assert [c["index"] for c in classes] == [0, 1, 2, 3]


def test_reusing_a_run_name_is_refused_instead_of_resuming_the_old_run(trained):
    summary, cfg, _ = trained
    with pytest.raises(ConfigError, match="already exists; pass another --name"):
        training.run_name(dataclasses.replace(cfg, name=summary.run_name))


def _fake_dataset(root: Path, columns: dict) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    for split in ("train", "val"):
        pq.write_table(pa.table(columns), root / split / f"{split}-00000.parquet")
    (root / "classes.json").write_text(json.dumps([{"index": 0, "wnid": "n01440764", "name": "tench"}]))
    splits = {s: {"images": 1, "shards": [{"file": f"{s}/{s}-00000.parquet", "rows": 1}]} for s in ("train", "val")}
    manifest = {"size": 72, "splits": splits, "hash": "x", "bad_files": [], "status": "complete"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _unfinished(root: Path) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "status": "in progress"}))
    return root


def _broken_manifest(root: Path) -> Path:
    (root / "manifest.json").write_text('{"splits": {}}')
    return root


def test_bad_data_fails_before_any_cluster_work(tmp_path):
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path, "has no classes.json"),
        (_fake_dataset(tmp_path / "foreign", {"img": [b"x"], "y": [0]}), "lacks columns"),
        (_broken_manifest(_fake_dataset(tmp_path / "broken", {"img": [b"x"]})), "is not what this version of"),
        (_unfinished(_fake_dataset(tmp_path / "unfinished", {"img": [b"x"]})), "run the jobs/prepare.py command"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message):
            training.load_data(config.resolve("sample", data=str(path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")
def test_gpu_training_on_a_local_ray_without_gpus_is_refused():
    with pytest.raises(ConfigError, match="--gpu asks for 2 GPU\\(s\\) but this machine has 0"):
        training.check_local_gpus(config.resolve("sample", gpu=True, workers=2))


def test_a_crop_bigger_than_the_shards_says_which_flag_to_change(tiny_shards):
    with pytest.raises(ConfigError, match="--crop 72"):
        training.load_data(config.resolve("sample", data=str(tiny_shards), crop=96))


def test_the_train_job_reports_a_missing_data_dir_without_starting_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/train.py"), "--data", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "error: data directory" in proc.stderr and "jobs/prepare.py" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr


def test_ten_crop_evaluation_matches_a_direct_pytorch_computation(trained, measured_shards):
    summary, _, uri = trained
    model_uri = f"models:/{summary.model_name}/{summary.model_version}"
    results = evaluation.evaluate(model_uri, str(measured_shards), ten_crop=True, tracking_uri=uri, batch_size=5)

    # Reference: torchvision's ten_crop of each decoded stored square, the checkpoint's network.
    rows = pq.read_table(measured_shards / "val").to_pydict()
    stats = json.loads((measured_shards / "stats.json").read_text())
    net, _ = checkpoint.load_model(summary.checkpoint)
    model = ImageClassifier(net, stats["mean"], stats["std"]).eval()
    correct = {"centre": [0, 0], "ten_crop": [0, 0]}
    with torch.no_grad():
        for data, label in zip(rows["image"], rows["label"]):
            chw = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
            views = torch.stack(TF.ten_crop(chw, 64)).permute(0, 2, 3, 1).contiguous()
            probs = torch.softmax(model(views), dim=1)
            for name, p in (("centre", probs[4]), ("ten_crop", probs.mean(dim=0))):
                top = p.topk(min(5, len(p))).indices.tolist()
                correct[name][0] += top[0] == label
                correct[name][1] += label in top
    n = len(rows["label"])
    for name, (top1, top5) in correct.items():
        assert results[name]["images"] == n
        assert results[name]["top1_error"] == pytest.approx(1 - top1 / n, abs=1e-9), name
        assert results[name]["top5_error"] == pytest.approx(1 - top5 / n, abs=1e-9), name
    from_checkpoint = evaluation.evaluate(summary.checkpoint, str(measured_shards), ten_crop=True, tracking_uri=uri)
    assert from_checkpoint == results


def test_the_evaluate_job_prints_the_table_and_logs_it_to_the_models_run(ray_cluster, trained, measured_shards):
    summary, _, uri = trained
    model_uri = f"models:/{summary.model_name}/{summary.model_version}"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/evaluate.py"),
            "--model",
            model_uri,
            "--data",
            str(measured_shards),
            "--ten-crop",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | top-1 error | top-5 error |" in proc.stdout
    assert f"| {model_uri}, centre crop |" in proc.stdout and f"| {model_uri}, 10 crops |" in proc.stdout
    metrics = MlflowClient(uri).get_run(summary.run_id).data.metrics
    assert {"eval_centre_top1_error", "eval_ten_crop_top1_error", "eval_ten_crop_top5_error"} <= set(metrics)


def test_evaluating_an_unknown_model_fails_before_any_cluster_work(trained, measured_shards):
    _, _, uri = trained
    with pytest.raises(evaluation.EvaluationError, match="cannot load models:/alexnet-test/99"):
        evaluation.evaluate("models:/alexnet-test/99", str(measured_shards), tracking_uri=uri)
    with pytest.raises(evaluation.EvaluationError, match="neither a models:/ URI nor a checkpoint"):
        evaluation.evaluate("/no/such/checkpoint", str(measured_shards), tracking_uri=uri)


def test_a_second_run_with_the_same_seed_and_workers_repeats_every_epochs_metrics(trained, tmp_path):
    # The second run trains with --no-tracking, against a tracking URI where nothing listens: it
    # must never ask MLflow. Its per-epoch metrics come from its checkpoints (all of them kept).
    summary, cfg, uri = trained
    repeat = dataclasses.replace(cfg, storage_path=str(tmp_path / "runs"), tracking=False, keep_checkpoints=cfg.epochs)
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    try:
        again = training.train(repeat, log=lambda m: None)
    finally:
        mlflow.set_tracking_uri(uri)
    assert again.run_id is None and again.model_version is None
    assert checkpoint.read_meta(again.checkpoint)["run_id"] is None
    metas = [json.loads(p.read_text()) for p in (tmp_path / "runs" / again.run_name).glob("checkpoint_*/meta.json")]
    by_epoch = {meta["epoch_metrics"]["epoch"]: meta["epoch_metrics"] for meta in metas}
    assert sorted(by_epoch) == list(range(1, cfg.epochs + 1))
    client = MlflowClient(uri)
    for key in ("train_loss", "train_top1_error", "val_loss", "val_top1_error", "val_top5_error"):
        first = [
            (m.step, m.value) for m in sorted(client.get_metric_history(summary.run_id, key), key=lambda m: m.step)
        ]
        assert first == [(epoch, by_epoch[epoch][key]) for epoch in sorted(by_epoch)], key
