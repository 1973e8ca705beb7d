import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import shards
from pipeline.data.stats import PUBLISHED, compute_stats, read_stats


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
