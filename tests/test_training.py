"""End to end on a real local Ray, real Parquet shards of real JPEGs and a real MLflow server.

The trained run is the session's (conftest.trained): two DDP workers, two epochs, a light AlexNet.
"""

import csv
import dataclasses
import io
import json
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import REGISTERED_MODEL, ROOT, call_job, free_port, light, run_job
from mlflow import MlflowClient
from PIL import Image
from ray._private.ray_logging import LogDeduplicator

from pipeline import config
from pipeline.cluster.resources import GpuCapacity, in_cluster_yaml
from pipeline.config import ConfigError
from pipeline.data.device import DeviceAugment
from pipeline.data.shards import DataError
from pipeline.data.transforms import eval_batch
from pipeline.model import AlexNet, ImageClassifier
from pipeline.scoring import evaluation, loading
from pipeline.step import StepPlan, train_step
from pipeline.train import checkpoint, driver, preflight, reports
from pipeline.train.run import claim, free_name, new_name
from pipeline.train.worker import EpochSums, Ticker, rank_seed

METRICS = [
    "train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "images_per_s", "data_wait_fraction",
    "train_images", "val_images",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(trained):
    """The session's two-worker, two-epoch run: (its summary, the config that ran, the tracking URI).
    The session's Ray has no GPUs, so the run decided to train on CPUs."""
    return trained.first, dataclasses.replace(trained.cfg, gpu=False), trained.tracking_uri


@pytest.fixture(scope="module")
def registered(run, tmp_path_factory):
    """The run's registered version, loaded once as a PyTorch program and as a pyfunc model."""
    summary, _, uri = run
    model_uri = f"models:/{summary.model_name}/{summary.model_version}"
    mlflow.set_tracking_uri(uri)
    tmp = tmp_path_factory.mktemp("registered")  # downloads here, not into temporary dirs MLflow never deletes
    (tmp / "pytorch").mkdir()
    (tmp / "pyfunc").mkdir()
    pytorch = mlflow.pytorch.load_model(model_uri, dst_path=str(tmp / "pytorch"))
    pyfunc = mlflow.pyfunc.load_model(model_uri, dst_path=str(tmp / "pyfunc"))
    return pytorch, pyfunc


@pytest.mark.slow
def test_the_run_holds_every_epochs_metrics_exactly_once(run):
    summary, cfg, uri = run
    client = MlflowClient(uri)
    found = client.get_run(summary.run_id)
    assert found.info.status == "FINISHED" and found.info.run_name == summary.run_name
    for key in METRICS:
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == [1, 2], key
    assert {k: found.data.params[k] for k in cfg.to_dict()} == {k: str(v) for k, v in cfg.to_dict().items()}
    assert found.data.params["fc_width"] == "64" and found.data.tags["num_classes"] == "4"
    assert found.data.tags["dataset_hash"]
    # one warmup epoch: its last step's lr is short of the scaled lr by one step of the ramp, then the lr holds
    steps = 96 // cfg.global_batch  # steps per epoch: 96 training images (measured_shards)
    lrs = [m.value for m in sorted(client.get_metric_history(summary.run_id, "lr"), key=lambda m: m.step)]
    ramp = 0.01 + 0.99 * (steps - 1) / steps
    assert lrs == pytest.approx([cfg.scaled_lr * ramp, cfg.scaled_lr]) and lrs[0] < lrs[1]


@pytest.mark.slow
def test_the_run_says_which_colour_statistics_it_used(run, measured_shards):
    summary, _, uri = run
    found = MlflowClient(uri).get_run(summary.run_id)
    assert found.data.params["colour_stats"] == f"dataset {found.data.tags['dataset_hash']} (stats.json)"
    logged = json.loads(Path(MlflowClient(uri).download_artifacts(summary.run_id, "stats.json")).read_text())
    measured = json.loads((measured_shards / "stats.json").read_text())
    assert {k: logged[k] for k in ("mean", "std", "eigenvalues", "eigenvectors")} == {
        k: measured[k] for k in ("mean", "std", "eigenvalues", "eigenvectors")
    }


@pytest.mark.slow
def test_every_epoch_counts_every_validation_image_and_every_training_step_across_workers(run, measured_shards):
    summary, cfg, uri = run
    splits = json.loads((measured_shards / "manifest.json").read_text())["splits"]
    client = MlflowClient(uri)
    val = [m.value for m in client.get_metric_history(summary.run_id, "val_images")]
    assert val == [splits["val"]["images"]] * cfg.epochs == [24, 24]  # no rank's share dropped or doubled
    steps = splits["train"]["images"] // (cfg.workers * cfg.batch_size)  # 96 images: 6 full global batches
    train = [m.value for m in client.get_metric_history(summary.run_id, "train_images")]
    assert train == [steps * cfg.workers * cfg.batch_size] * cfg.epochs == [96, 96]


@pytest.mark.slow
def test_ray_train_keeps_the_best_checkpoint_and_the_latest(run):
    summary, cfg, _ = run
    run_dir = Path(cfg.storage_path) / summary.run_name
    kept = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    epochs = {p.name: checkpoint.read_meta(p).epoch for p in kept}
    assert Path(summary.checkpoint) in kept and epochs[Path(summary.checkpoint).name] == summary.best["epoch"]
    assert epochs[kept[-1].name] == cfg.epochs  # the latest, what a restart resumes from
    assert len(kept) <= cfg.keep_checkpoints + 1  # the K best by val top-1 error, and the latest
    best = checkpoint.read_meta(summary.checkpoint).epoch_metrics["val_top1_error"]
    assert best == summary.best["val_top1_error"] == min(checkpoint.read_meta(p).progress.val_errors[-1] for p in kept)


@pytest.mark.slow
def test_the_checkpoint_describes_itself(run):
    summary, cfg, _ = run
    meta = checkpoint.read_meta(summary.checkpoint)
    assert meta.config == cfg and meta.run_id == summary.run_id
    assert [c.wnid for c in meta.classes] == ["n01440764", "n01443537", "n01484850", "n01491361"]
    assert meta.epoch == summary.best["epoch"] == meta.epoch_metrics["epoch"] and meta.progress.step_in_epoch == 0
    assert meta.image_size == 72 and meta.unsent_metrics == ()
    stored = json.loads((Path(summary.checkpoint) / checkpoint.META_FILE).read_text())  # the file's own layout
    assert stored["config"] == cfg.to_dict() and stored["progress"]["epoch"] == meta.epoch
    assert set(stored) == {"progress", "epoch_metrics", "config", "classes", "colour", "run_id", "dataset_hash",
                           "image_size", "unsent_metrics"}  # every key read back, none twice  # fmt: skip
    assert set(checkpoint.load_state(summary.checkpoint, checkpoint.OPTIMIZER_FILE)) == {"state", "param_groups"}
    net, _ = checkpoint.load_model(summary.checkpoint)
    assert net.classifier[1].out_features == net.classifier[4].out_features == cfg.fc_width == 64


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_the_registered_model_loads_by_version_and_matches_the_checkpoint(run, registered, measured_shards, batch):
    summary, _, _ = run
    rows = pq.read_table(measured_shards / "val").slice(0, batch).to_pydict()
    images = eval_batch({"image": np.array(rows["image"], dtype=object), "label": np.array(rows["label"])}, 64)["image"]

    stats = json.loads((measured_shards / "stats.json").read_text())  # normalised as in training
    net, _ = checkpoint.load_model(summary.checkpoint)
    expected = ImageClassifier(net, stats["mean"], stats["std"]).eval()(torch.from_numpy(images))

    pytorch, pyfunc = registered
    torch.testing.assert_close(pytorch(torch.from_numpy(images)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pyfunc.predict(images), expected.detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_registered_model_carries_its_class_index(run, tmp_path):
    summary, _, _ = run
    model_uri = f"models:/{summary.model_name}/{summary.model_version}"
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path))
    classes = json.loads(next(Path(local).rglob("classes.json")).read_text())
    assert [c["index"] for c in classes] == [0, 1, 2, 3]


@pytest.mark.slow
def test_reusing_a_run_name_is_refused_instead_of_resuming_the_old_run(run):
    summary, cfg, _ = run
    with pytest.raises(ConfigError, match="already exists; pass another --name"):
        free_name(dataclasses.replace(cfg, name=summary.run_name))
    with pytest.raises(ConfigError, match="already exists; pass another --name"):
        claim(cfg, summary.run_name)


def test_run_names_are_unique_and_a_name_is_claimed_by_one_job_only(tmp_path):
    cfg = config.resolve("sample", storage_path=str(tmp_path / "runs"))
    names = {new_name(cfg) for _ in range(50)}  # the same second
    assert len(names) == 50 and all(re.fullmatch(r"alexnet-sample-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names)
    named = dataclasses.replace(cfg, name="shared")
    start, outcomes = threading.Barrier(8), []

    def try_claim() -> None:
        start.wait()
        try:
            claim(named, free_name(named))
            outcomes.append("claimed")
        except ConfigError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=try_claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("claimed") == 1 and sum("already exists" in o for o in outcomes) == 7


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


def _shard(label, label_type: pa.DataType | None = None, rows: int = 1) -> dict:
    return {
        "image": pa.array([b"x"] * rows, pa.binary()), "label": pa.array([label] * rows, label_type or pa.int32()),
        "wnid": pa.array(["n01440764"] * rows), "key": pa.array(["a.JPEG"] * rows),
    }  # fmt: skip


def _with_stray(root: Path) -> Path:
    pq.write_table(pa.table(_shard(0)), root / "train" / "notes.parquet")
    return root


def test_bad_data_fails_before_any_cluster_work(tmp_path):
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path, "has no classes.json"),
        (_fake_dataset(tmp_path / "foreign", {"img": [b"x"], "y": [0]}), "lacks columns"),
        (_broken_manifest(_fake_dataset(tmp_path / "broken", {"img": [b"x"]})), "is not what this version of"),
        (_unfinished(_fake_dataset(tmp_path / "unfinished", {"img": [b"x"]})), "run the jobs/prepare.py command"),
        (_fake_dataset(tmp_path / "typed", _shard("0", pa.string())), "label is string, not int32"),
        (_fake_dataset(tmp_path / "labels", _shard(3)), r"has labels 3\.\.3, outside 0\.\.0 \(classes.json lists 1\)"),
        (_fake_dataset(tmp_path / "rows", _shard(0, rows=2)), "has 2 rows, manifest.json recorded 1"),
        (_with_stray(_fake_dataset(tmp_path / "stray", _shard(0))), r"stray/train/notes.parquet is not in .*manifest"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message):
            preflight.load_data(config.resolve("sample", data=str(path)))
    _fake_dataset(tmp_path / "good", _shard(0))
    assert preflight.load_data(config.resolve("sample", data=str(tmp_path / "good"))).num_classes == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")
def test_gpu_training_on_a_local_ray_without_gpus_is_refused():
    with pytest.raises(ConfigError, match="needs 2 GPU\\(s\\) but this machine has 0; pass --no-gpu"):
        preflight.check_local_gpus(config.resolve("sample", gpu=True, workers=2))


def test_gpus_are_used_where_the_cluster_has_or_can_add_them_unless_the_flags_say_otherwise():
    said = []
    for capacity, given, uses in [
        (GpuCapacity(present=8), None, True),
        (GpuCapacity(present=0, addable=4), None, True),  # nodes the autoscaler may still launch
        (GpuCapacity(present=0), None, False),
        (GpuCapacity(present=8), False, False),  # --no-gpu
        (GpuCapacity(present=0), True, True),  # --gpu: the plan check or the watchdog says what is missing
    ]:
        cfg = preflight.choose_gpus(config.resolve("imagenet", gpu=given), capacity, 1_281_167, said.append)
        assert cfg.gpu is uses
    assert said[0] == "devices: one GPU per train worker (the cluster has 8 GPU(s); --gpu or --no-gpu decides)"
    assert said[1].endswith("(its autoscaler can add GPU nodes (4 GPU(s) at most); --gpu or --no-gpu decides)")
    assert said[2].startswith("devices: CPUs, no GPU (the cluster has no GPUs and its autoscaler cannot add any")
    assert said[3].startswith("WARNING: 1,281,167 training images on CPUs: expect hours per epoch")
    assert said[4:6] == ["devices: CPUs, no GPU (--no-gpu)", said[3]]
    assert said[6:] == ["devices: one GPU per train worker (--gpu)"]
    # What `ray up cluster/aws.yaml` leaves on its head: 2 on-demand GPU nodes and the spot ones may come.
    assert in_cluster_yaml(ROOT / "cluster/aws.yaml", "GPU") >= 2
    assert in_cluster_yaml(ROOT / "cluster/local.yaml", "GPU") == 0  # its "GPU" nodes carry mock_gpu
    assert in_cluster_yaml(ROOT / "cluster/local.yaml", "CPU") == 8  # 2 cpu and 2 gpu nodes of 2 CPUs


def test_a_cluster_whose_nodes_declare_gpus_is_read_as_one_with_gpus_for_training_and_batch_inference():
    """A real Ray whose node declares 2 GPUs (Ray takes a node's word for them), in its own process:
    the session's Ray has none. Its own short --temp-dir (Ray's socket paths have a length limit)."""
    with tempfile.TemporaryDirectory(prefix="ray-gpus-", dir="/tmp") as temp:
        probe = (
            "import sys, ray\nfrom pipeline.cluster.resources import GpuCapacity\n"
            "ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, _temp_dir=sys.argv[1])\n"
            "from pipeline.cluster.resources import cpus_now_or_addable\nfrom pipeline.scoring import pool\n"
            "print(pool.plan('auto', 'auto', GpuCapacity.read(), cpus_now_or_addable(), whole=True).describe())\n"
            "print(GpuCapacity.read().describe())\nray.shutdown()\n"
        )
        proc = subprocess.run([sys.executable, "-c", probe, temp], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, check=False)  # fmt: skip
    assert proc.stdout.strip().endswith("the cluster has 2 GPU(s)"), proc.stdout + proc.stderr[-3000:]
    # Batch inference's model replicas on it: one GPU each, up to its two (jobs/infer.py, jobs/evaluate.py).
    assert "model replicas: 2, 1 GPU each (the cluster has 2 GPU(s); --gpus-per-replica decides)" in proc.stdout


def test_a_crop_bigger_than_the_shards_says_which_flag_to_change(tiny_shards):
    with pytest.raises(ConfigError, match="--crop 72"):
        preflight.load_data(config.resolve("sample", data=str(tiny_shards), crop=96))


def test_the_train_job_reports_a_missing_data_dir_without_starting_ray(tmp_path):
    proc = run_job("jobs/train.py", "--data", tmp_path / "nope")
    assert proc.returncode == 2
    assert "error: data directory" in proc.stderr and "jobs/prepare.py" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr


def test_a_training_step_is_a_function_of_the_seed():
    """Same seed, same batch: the same lighting, the same loss and the same weights after the step."""
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    cfg = light()

    def one_step(seed: int):
        torch.manual_seed(seed)  # as every rank does before building the model
        model = AlexNet.from_config(4, cfg.to_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        augment = DeviceAugment(torch.device("cpu"), alpha_std=0.1, seed=seed)
        loss, _ = train_step(model, optimizer, augment, images, labels, StepPlan(clip_grad_norm=5.0))
        return loss.item(), model.state_dict()

    (loss_a, weights_a), (loss_b, weights_b), (loss_c, weights_c) = one_step(0), one_step(0), one_step(1)
    assert loss_a == loss_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert loss_c != loss_a and not torch.equal(weights_a["features.0.weight"], weights_c["features.0.weight"])


def test_accumulated_micro_batches_make_the_same_step_as_one_batch_of_their_size():
    """What an elastic run with fewer workers does: k micro-batches, one update, the update of their union."""
    images = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    cfg = light(dropout=0.0)

    def step_in(chunks: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = AlexNet.from_config(4, cfg.to_dict()).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        augment = DeviceAugment(torch.device("cpu"), alpha_std=0.0, seed=0)
        for micro, (x, y) in enumerate(zip(images.chunk(chunks), labels.chunk(chunks), strict=True)):
            before = model.features[0].weight.detach().clone()
            train_step(model, optimizer, augment, x, y, StepPlan(clip_grad_norm=5.0, accumulate=chunks), micro=micro)
            updated = not torch.equal(before, model.features[0].weight)
            assert updated == (micro == chunks - 1), "the weights move once, after the last micro-batch"
        return model.state_dict()

    whole, accumulated = step_in(1), step_in(4)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6)


def test_dropout_differs_between_ranks_and_epochs_and_repeats_with_the_seed():
    """Every rank starts from the same weights (the seed alone), then draws its own dropout masks."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = AlexNet.from_config(4, light().to_dict()).train()

    def forward(rank: int, epoch: int) -> torch.Tensor:
        torch.manual_seed(rank_seed(0, rank, epoch))  # what each rank does at the start of an epoch
        with torch.no_grad():
            return model(x)

    assert torch.equal(forward(0, 1), forward(0, 1))  # reproducible
    assert not torch.equal(forward(0, 1), forward(1, 1))  # ranks differ
    assert not torch.equal(forward(0, 1), forward(0, 2))  # epochs differ
    assert len({rank_seed(0, r, e) for r in range(64) for e in range(1, 91)}) == 64 * 90


def test_a_long_epoch_says_where_it_is_every_progress_interval_and_never_with_no_progress(monkeypatch):
    clock = iter(range(0, 1000, 25))  # each step takes 25 s
    monkeypatch.setattr("pipeline.train.worker.time.perf_counter", lambda: float(next(clock)))
    lines: list[str] = []

    def say(line: str, flush: bool = False) -> None:
        lines.append(line)

    sums = EpochSums(torch.device("cpu"))
    cfg = config.resolve("imagenet", progress_interval=60.0, epochs=90)
    ticker = Ticker(cfg, epoch=3, first_step=0, steps=100, global_batch=256, say=say)
    for step in range(1, 9):
        sums.add(torch.tensor(2.5), torch.eye(4)[:2].repeat(128, 1)[:256], torch.zeros(256, dtype=torch.long))
        ticker(step, sums)
    assert lines == [
        "  epoch   3/90  step 3/100  10 img/s  running loss 2.500  epoch ends in 40m25s",
        "  epoch   3/90  step 6/100  10 img/s  running loss 2.500  epoch ends in 39m10s",
    ]
    quiet = Ticker(dataclasses.replace(cfg, progress_interval=0.0), 3, 0, 100, 256, say)
    for step in range(1, 9):
        quiet(step, sums)
    assert len(lines) == 2


def test_every_line_rank_0_prints_reaches_the_log_when_a_restart_prints_from_new_processes():
    """Ray's driver folds lines that differ only in numbers, from different processes within 5 s, into
    "[repeated Nx]": after a restart each epoch comes from a new worker process. The train job exempts
    its report lines; the other lines of the workers are still folded."""
    cfg = config.TrainConfig(workers=2, min_workers=1, batch_size=4)
    metrics = dict.fromkeys(METRICS + ["val_loss", "lr", "epoch_seconds"], 0.5)
    lines = [
        reports.world_line(cfg, 1),
        reports.resumed_line(3, 5, "/runs/r/checkpoint_000003", 1),
        *(reports.epoch_line(12, {**metrics, "epoch": epoch}, 1.0) for epoch in range(4, 13)),
        reports.preemption_line(["a1b2", "c3d4"], [1], None),
        reports.stopping_line("training diverged at epoch 12, step 3 (loss not finite)"),
    ]
    environ = {reports.ALLOW_ENV: "^mine"}
    reports.keep_whole(environ)
    reports.keep_whole(environ)
    assert environ[reports.ALLOW_ENV] == f"(?:^mine)|{reports.REPORT_LINES}"

    def printed(allow: str | None, lines: list[str]) -> list[str]:
        ray_driver = LogDeduplicator(5, allow, None, _timesource=lambda: 0.0)
        batches = [{"ip": "10.0.0.1", "pid": pid, "lines": [line]} for pid, line in enumerate(lines)]
        return [out for batch in batches for b in ray_driver.deduplicate(batch) for out in b["lines"]]

    assert printed(environ[reports.ALLOW_ENV], lines) == lines
    assert len(printed(None, lines)) < len(lines)  # what Ray does to them unexempted
    others = [f"Dataset train_{n} execution finished in 0.{n} seconds" for n in range(5)]
    assert printed(environ[reports.ALLOW_ENV], others) == others[:1]


@pytest.mark.slow
def test_the_evaluate_job_matches_a_direct_pytorch_ten_crop_computation_and_logs_it_to_the_models_run(
    ray_cluster, run, measured_shards, tmp_path
):
    summary, _, uri = run
    model_uri = f"models:/{summary.model_name}/{summary.model_version}"
    mlflow.set_tracking_uri(uri)  # the job's default: the tracking URI in force
    out = tmp_path / "evaluation"
    proc = call_job("jobs/evaluate.py", "--model", model_uri, "--data", measured_shards, "--ten-crop", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "highest top-1 error by class (10 crops): " in proc.stdout
    assert "| model | top-1 error | top-5 error |" in proc.stdout
    assert f"| {model_uri}, centre crop |" in proc.stdout and f"| {model_uri}, 10 crops |" in proc.stdout
    metrics = MlflowClient(uri).get_run(summary.run_id).data.metrics

    # Reference: torchvision's ten_crop of each decoded stored square, the checkpoint's network.
    rows = pq.read_table(measured_shards / "val").to_pydict()
    stats = json.loads((measured_shards / "stats.json").read_text())
    net, _ = checkpoint.load_model(summary.checkpoint)
    model = ImageClassifier(net, stats["mean"], stats["std"]).eval()
    correct = {"centre": [0, 0], "ten_crop": [0, 0]}
    classes = len(json.loads((measured_shards / "classes.json").read_text()))
    confusion = np.zeros((classes, classes), dtype=np.int64)  # of the 10 crops
    with torch.no_grad():
        for data, label in zip(rows["image"], rows["label"], strict=True):
            chw = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
            views = torch.stack(TF.ten_crop(chw, 64)).permute(0, 2, 3, 1).contiguous()
            probs = torch.softmax(model(views), dim=1)
            for name, p in (("centre", probs[4]), ("ten_crop", probs.mean(dim=0))):
                top = p.topk(min(5, len(p))).indices.tolist()
                correct[name][0] += top[0] == label
                correct[name][1] += label in top
            confusion[label, int(probs.mean(dim=0).argmax())] += 1
    n = len(rows["label"])
    for name, (top1, top5) in correct.items():
        assert metrics[f"eval_{name}_top1_error"] == pytest.approx(1 - top1 / n, abs=1e-9), name
        assert metrics[f"eval_{name}_top5_error"] == pytest.approx(1 - top5 / n, abs=1e-9), name

    # The checkpoint evaluates as its registered program does, whatever the batch size.
    result = evaluation.evaluate(loading.resolve(summary.checkpoint, uri), str(measured_shards), True, 5)
    for name, (top1, top5) in correct.items():
        assert result.protocols[name]["images"] == n
        assert result.protocols[name]["top1_error"] == pytest.approx(1 - top1 / n, abs=1e-9), name
        assert result.protocols[name]["top5_error"] == pytest.approx(1 - top5 / n, abs=1e-9), name
    # Per class: the same confusion matrix, and each class's error from its row.
    assert (result.confusion["ten_crop"] == confusion).all()
    written = {row["wnid"]: row for row in csv.DictReader((out / "per_class.csv").open())}
    for c in result.classes:
        images = confusion[c.index].sum()
        assert int(written[c.wnid]["images"]) == images
        assert float(written[c.wnid]["ten_crop_top1_error"]) == pytest.approx(1 - confusion[c.index, c.index] / images)
    assert Image.open(out / "confusion.png").format == "PNG" and (out / "evaluation.json").is_file()
    logged = {a.path for a in MlflowClient(uri).list_artifacts(summary.run_id, "evaluation")}
    assert {f"evaluation/{name}" for name in ("per_class.csv", "confusion.png", "evaluation.md")} <= logged


def test_evaluating_an_unknown_model_fails_before_any_cluster_work(tiny_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(loading.ModelError, match=f"cannot load models:/{REGISTERED_MODEL}/99"):
        loading.resolve(f"models:/{REGISTERED_MODEL}/99", uri)
    with pytest.raises(loading.ModelError, match="neither a models:/ URI nor a checkpoint"):
        loading.resolve("/no/such/checkpoint", uri)
    with pytest.raises(loading.ModelError, match="write models:/NAME/VERSION or models:/NAME@ALIAS"):
        loading.resolve(f"models:/{REGISTERED_MODEL}/latest", uri)


@pytest.mark.slow
def test_a_run_without_tracking_checkpointing_to_s3_repeats_every_epochs_metrics(trained, s3_server):
    # The session's second run (seed, data, lr) again with --no-tracking, against a tracking URI
    # where nothing listens (it must never ask MLflow), and its checkpoints in the S3 server: the
    # same metrics every epoch, read back from the checkpoints (all of them kept).
    summary, cfg, uri = trained.second, trained.second_cfg, trained.tracking_uri
    s3_server.create_dir("runs")
    repeat = dataclasses.replace(
        cfg, storage_path="s3://runs/alexnet", name="repeat", tracking=False, keep_checkpoints=cfg.epochs
    )
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    try:
        again = driver.train(repeat, log=lambda m: None)
    finally:
        mlflow.set_tracking_uri(uri)
    assert again.run_id is None and again.model_version is None
    assert again.checkpoint.startswith("s3://runs/alexnet/repeat/checkpoint_")
    stored = [i.path for i in s3_server.get_file_info(pafs.FileSelector("runs/alexnet/repeat", recursive=True))]
    assert "runs/alexnet/repeat/alexnet_run.json" in stored
    # The training curves beside the checkpoints without MLflow, named in the summary.
    assert (
        again.curves == "s3://runs/alexnet/repeat/training_curves.png" and again.curves.removeprefix("s3://") in stored
    )
    assert Image.open(io.BytesIO(s3_server.open_input_file(again.curves.removeprefix("s3://")).read())).format == "PNG"
    assert f"{again.checkpoint.removeprefix('s3://')}/model.pt" in stored
    metas = [
        json.loads(s3_server.open_input_file(path).read())
        for path in stored
        if "/checkpoint_" in path and path.endswith("/meta.json")
    ]
    assert metas and all(meta["run_id"] is None for meta in metas)
    by_epoch = {meta["epoch_metrics"]["epoch"]: meta["epoch_metrics"] for meta in metas}
    assert sorted(by_epoch) == list(range(1, cfg.epochs + 1))
    client = MlflowClient(uri)
    for key in ("train_loss", "train_top1_error", "val_loss", "val_top1_error", "val_top5_error", "train_images"):
        first = sorted((m.step, m.value) for m in client.get_metric_history(summary.run_id, key))
        assert first == [(epoch, by_epoch[epoch][key]) for epoch in sorted(by_epoch)], key


def test_local_paths_are_refused_where_train_workers_cannot_reach_them():
    """ray.nodes()'s view of a cluster: a local path is fine on one node that trains, refused otherwise."""

    def node(node_id: str, cpus: float) -> dict:
        return {"NodeID": node_id, "Alive": True, "Resources": {"CPU": cpus} if cpus else {}}

    laptop, head_only = [node("a", 2)], [node("head", 0)]
    cluster = [node("head", 0), node("gpu-1", 8), {"NodeID": "gone", "Alive": False, "Resources": {}}]
    cfg = config.resolve("sample", storage_path="runs")
    preflight.check_reachable(cfg, "/data/shards", laptop, "a")
    for nodes, where in ((cluster, "2 nodes"), (head_only, "a head node that runs no train workers")):
        with pytest.raises(
            ConfigError, match=f"--storage-path /.*/runs is a local path, and this Ray cluster has {where}"
        ):
            preflight.check_reachable(cfg, "/data/shards", nodes, "head")
    remote = dataclasses.replace(cfg, storage_path="s3://bucket/runs")
    with pytest.raises(ConfigError, match="--data /data/shards is a local path.*pass --shared-storage"):
        preflight.check_reachable(remote, "/data/shards", cluster, "head")
    preflight.check_reachable(remote, "s3://bucket/shards", cluster, "head")
    preflight.check_reachable(dataclasses.replace(cfg, shared_storage=True), "/mnt/efs/shards", cluster, "head")


@pytest.mark.parametrize(
    "job, args, message",
    [
        ("jobs/evaluate.py", ["--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
        (
            "jobs/evaluate.py",
            ["--replicas", "0"],
            "argument --replicas: '0' is not N, MIN:MAX (1 <= MIN <= MAX) or auto",
        ),
        ("jobs/infer.py", ["--replicas", "4:2"], "argument --replicas: '4:2' is not N, MIN:MAX"),
        ("jobs/evaluate.py", ["--gpus-per-replica", "-1"], "argument --gpus-per-replica: -1 must be at least 0"),
        ("jobs/infer.py", ["--batch-size", "x"], "argument --batch-size: 'x' is not a whole number"),
        ("jobs/infer.py", ["--max-file-mb", "0"], "argument --max-file-mb: 0 must be above 0"),
    ],
)
def test_evaluate_and_infer_check_every_argument_before_any_cluster_work(job, args, message):
    base = {"jobs/evaluate.py": ["--data", "x"], "jobs/infer.py": ["--input", "x", "--output", "y"]}[job]
    proc = call_job(job, "--model", "models:/m/1", *base, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_paths_a_datasets_json_files_name_stay_inside_the_dataset(tiny_shards, tmp_path):
    import shutil

    from pipeline.data.stats import read_stats

    escaped = shutil.copytree(tiny_shards, tmp_path / "escaped")
    manifest = json.loads((escaped / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["file"] = "../../../etc/passwd"
    (escaped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError, match=r"manifest.json names '../../../etc/passwd', which is not a file inside .*/val/"
    ):
        preflight.load_data(config.resolve("sample", data=str(escaped)))

    measured = shutil.copytree(tiny_shards, tmp_path / "measured")
    dataset = preflight.load_data(config.resolve("sample", data=str(measured)))
    stats = {"mean": [0.5] * 3, "std": [0.2] * 3, "eigenvalues": [0.1] * 3, "eigenvectors": np.eye(3).tolist(),
             "dataset_hash": dataset.dataset_hash}  # fmt: skip
    for where in ("/etc/passwd", "../outside.npy"):
        (measured / "stats.json").write_text(json.dumps({**stats, "mean_image": where}))
        with pytest.raises(DataError, match=re.escape(f"stats.json names {where!r}, which is not a file inside")):
            read_stats(dataset)
