import dataclasses
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, call_job, run_job
from PIL import Image

from pipeline.data import shards
from pipeline.data.device import DeviceAugment
from pipeline.data.stats import PUBLISHED, compute_stats, normalization, read_stats


@pytest.fixture(scope="module")
def measured(ray_cluster, tiny_shards, tmp_path_factory):
    root = shutil.copytree(tiny_shards, tmp_path_factory.mktemp("stats") / "shards")
    return root, compute_stats(str(root))


def test_stats_equal_numpy_float64_over_the_same_decoded_pixels(measured):
    root, stats = measured
    images = pq.read_table(root / "train", columns=["image"])["image"].to_pylist()
    x = np.concatenate([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).reshape(-1, 3) for b in images])
    x = x.astype(np.float64) / 255.0
    cov = np.cov(x, rowvar=False, bias=True)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]

    assert stats["pixels"] == len(x) == 96 * 72 * 72
    np.testing.assert_allclose(stats["mean"], x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], x.std(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["covariance"], cov, rtol=1e-6)
    np.testing.assert_allclose(stats["eigenvalues"], eigenvalues, rtol=1e-6)
    got = np.array(stats["eigenvectors"])
    np.testing.assert_allclose(np.abs(got), np.abs(eigenvectors), rtol=1e-6, atol=1e-9)  # columns, up to sign
    np.testing.assert_allclose(got @ np.diag(stats["eigenvalues"]) @ got.T, cov, rtol=1e-6, atol=1e-12)
    assert json.loads((root / "stats.json").read_text()) == stats


def test_the_mean_image_is_the_per_pixel_mean_of_the_decoded_training_squares(measured):
    root, stats = measured
    images = pq.read_table(root / "train", columns=["image"])["image"].to_pylist()
    expected = np.mean([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64) for b in images], axis=0)
    mean_image = np.load(root / stats["mean_image"])
    assert mean_image.shape == (72, 72, 3) and mean_image.dtype == np.float32
    np.testing.assert_allclose(mean_image, expected / 255.0, rtol=1e-6, atol=1e-7)

    colour = dataclasses.asdict(read_stats(shards.open_dataset(root)))
    mean, std = normalization(colour, "mean-image", crop=64)
    np.testing.assert_array_equal(mean, mean_image[4:68, 4:68].transpose(2, 0, 1))  # its centre 64×64
    assert std.tolist() == [1, 1, 1]
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    out = DeviceAugment(torch.device("cpu"), alpha_std=0.0, mean=mean, std=std)(x, train=False)
    torch.testing.assert_close(out, x.permute(0, 3, 1, 2).float() / 255 - torch.from_numpy(mean)[None])
    with pytest.raises(shards.DataError, match="needs the dataset's mean image"):
        normalization(dataclasses.asdict(PUBLISHED), "mean-image", crop=64)


def test_training_uses_the_datasets_stats_and_the_published_ones_without(measured, tiny_shards):
    root, stats = measured
    colour = read_stats(shards.open_dataset(root))
    assert colour.mean == stats["mean"] and colour.eigenvectors == stats["eigenvectors"]
    assert colour.source.startswith("dataset ")
    assert read_stats(shards.open_dataset(tiny_shards)) == PUBLISHED


def test_stats_of_other_shards_are_refused(measured, tmp_path):
    root, stats = measured
    copy = shutil.copytree(root, tmp_path / "copy")
    (copy / "stats.json").write_text(json.dumps({**stats, "dataset_hash": "0123456789abcdef"}))
    with pytest.raises(shards.DataError, match="recompute it with jobs/prepare.py --stats"):
        read_stats(shards.open_dataset(copy))


def test_the_prepare_job_measures_existing_shards_and_prints_them(ray_cluster, tiny_shards, tmp_path):
    copy = shutil.copytree(tiny_shards, tmp_path / "shards")
    proc = call_job("jobs/prepare.py", "--stats", "--no-progress", "--output", copy)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads((copy / "stats.json").read_text())
    assert f"pixels        {stats['pixels']:,}" in proc.stdout and "eigenvalues" in proc.stdout


def test_the_prepare_job_needs_a_source_or_stats(tmp_path):
    proc = run_job("jobs/prepare.py", "--output", tmp_path)
    assert proc.returncode == 2 and "pass --input to prepare a dataset, --stats to measure one" in proc.stderr


def test_the_prepare_job_loads_no_torch_not_even_for_the_statistics():
    """`prepare.py --input … --stats` measures the colours after its Ray Data job, in one process: in a
    driver `ray job submit` started, torch loaded after Ray Data had run died in oneMKL's start-up
    ("Cannot load libtorch_cpu.so"). What the job imports keeps torch out."""
    probe = (
        "import sys; sys.path.insert(0, 'jobs'); import prepare; import pipeline.data.prepare, pipeline.data.stats, "
        "pipeline.cluster.connection; print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr[-2000:]
