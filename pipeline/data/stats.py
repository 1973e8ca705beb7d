"""RGB statistics of a prepared training set: what the paper's colour augmentation is built on.

Over every pixel of the stored training squares, scaled to [0, 1]: the per-channel mean and
standard deviation, the 3×3 covariance and its eigen-decomposition (eigenvalues descending,
eigenvectors as the *columns* of the matrix, each signed so that its largest component is
positive; the sign does not matter to the augmentation, whose α is symmetric).

Computed as a Ray Data aggregation: each decode task sums pixel values and their pairwise
products as exact integers (uint8 × uint8 fits int64 for any dataset below ~10^14 pixels), Ray
Data adds the partial sums, and only the final division happens in float64. Written to
``OUT/stats.json``; training uses it for the lighting noise and the normalisation when present.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from pipeline.data import shards
from pipeline.data.shards import read_shards
from pipeline.data.transforms import decode
from pipeline.storage import Location, locate

# Published ImageNet statistics for pixels in [0, 1] (here, not beside the torch code that uses
# them: this module stays free of torch, see compute_stats).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet's RGB covariance: eigenvalues, and eigenvectors as the *columns* of the matrix.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

PAIRS = [(i, j) for i in range(3) for j in range(i, 3)]  # the 6 distinct entries of a 3×3 symmetric matrix
SUM_COLUMNS = ["pixels", "s0", "s1", "s2"] + [f"p{i}{j}" for i, j in PAIRS]
MEAN_IMAGE_FILE = "mean_image.npy"


@dataclass(frozen=True)
class ColourStats:
    mean: list[float]
    std: list[float]
    eigenvalues: list[float]
    eigenvectors: list[list[float]]  # columns are the eigenvectors
    source: str  # "dataset <hash>" or "published ImageNet values"
    mean_image: str = ""  # URI of the dataset's mean image (size×size×3 float32 .npy), if measured


PUBLISHED = ColourStats(
    mean=list(IMAGENET_MEAN),
    std=list(IMAGENET_STD),
    eigenvalues=list(IMAGENET_EIGVAL),
    eigenvectors=[list(row) for row in IMAGENET_EIGVEC],
    source="published ImageNet values",
)


def compute_stats(data: str | Location) -> dict:
    """Statistics of the training split of a prepared dataset; also written to its stats.json.

    Two passes over the training shards: the channel statistics as a Ray Data aggregation
    (``Dataset.sum`` of exact per-task integer sums), then the mean image (the paper's
    normalisation), whose per-task pixel sums stream to the driver and are added there.

    numpy only, as `jobs/prepare.py --stats` runs it after the shards' Ray Data job: in a driver that
    `ray job submit` started, torch loaded that late died with "Intel oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so" (tests/test_stats.py keeps torch out of that job).
    """
    dataset = shards.open_dataset(data)
    train = read_shards(dataset.split_dir("train"), columns=["image"])
    sums = train.map_batches(_pixel_sums, batch_size=None, batch_format="numpy").sum(SUM_COLUMNS)  # fused read
    stats = stats_from_sums({name: int(sums[f"sum({name})"]) for name in SUM_COLUMNS})
    total = np.zeros((dataset.image_size, dataset.image_size, 3), dtype=np.int64)
    for row in train.map_batches(_image_sums, batch_size=None, batch_format="numpy").iter_rows():
        total += np.frombuffer(row["sums"], dtype=np.int64).reshape(total.shape)
    out = io.BytesIO()
    np.save(out, (total / dataset.count("train") / 255.0).astype(np.float32))
    dataset.root.join(MEAN_IMAGE_FILE).write_bytes(out.getvalue())
    stats.update(images=dataset.count("train"), dataset_hash=dataset.dataset_hash, mean_image=MEAN_IMAGE_FILE)
    dataset.root.join(shards.STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def stats_from_sums(sums: dict[str, int]) -> dict:
    n = sums["pixels"]
    s = np.array([sums[f"s{c}"] for c in range(3)], dtype=np.float64)
    products = np.zeros((3, 3), dtype=np.float64)
    for i, j in PAIRS:
        products[i, j] = products[j, i] = sums[f"p{i}{j}"]
    mean = s / n
    cov = products / n - np.outer(mean, mean)  # in 0..255 units; exact sums, so no drift
    mean, cov = mean / 255.0, cov / 255.0**2
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    eigenvectors *= np.sign(eigenvectors[np.abs(eigenvectors).argmax(axis=0), range(3)])
    return {
        "pixels": n,
        "mean": mean.tolist(),
        "std": np.sqrt(np.diag(cov)).tolist(),
        "covariance": cov.tolist(),
        "eigenvalues": eigenvalues.tolist(),
        "eigenvectors": eigenvectors.tolist(),
        "scale": "pixels in [0, 1]; eigenvectors are the columns",
    }


def read_stats(dataset: shards.PreparedDataset) -> ColourStats:
    """The dataset's stats.json when it has one for these very shards, else the published values."""
    path = dataset.root.join(shards.STATS_FILE)
    if not path.is_file():
        return PUBLISHED
    stats = json.loads(path.read_text())
    if stats.get("dataset_hash") != dataset.dataset_hash:
        raise shards.DataError(
            f"{path.uri} was computed for dataset {stats.get('dataset_hash')}, not these shards "
            f"({dataset.dataset_hash}); recompute it with jobs/prepare.py --stats --output {dataset.uri}"
        )
    return ColourStats(
        mean=stats["mean"],
        std=stats["std"],
        eigenvalues=stats["eigenvalues"],
        eigenvectors=stats["eigenvectors"],
        source=f"dataset {dataset.dataset_hash} ({shards.STATS_FILE})",
        mean_image=shards.inside(dataset.root, stats["mean_image"], shards.STATS_FILE).uri
        if stats.get("mean_image")
        else "",
    )


def normalization(colour: dict, normalize: str, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) to normalise [0, 1] crops with: per channel (3,), or the mean image (3, crop, crop).

    "mean-image" is the paper's: subtract the training set's mean image (its centre crop, for the
    crop size), no division.
    """
    if normalize == "mean-std":
        return np.asarray(colour["mean"], dtype=np.float32), np.asarray(colour["std"], dtype=np.float32)
    if not colour.get("mean_image"):
        raise shards.DataError(
            "--normalize mean-image needs the dataset's mean image; compute it with jobs/prepare.py --stats --output DATA"
        )
    image = np.load(io.BytesIO(locate(colour["mean_image"]).read_bytes()))
    top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    mean = image[top : top + crop, left : left + crop].transpose(2, 0, 1)
    return np.ascontiguousarray(mean, dtype=np.float32), np.ones(3, dtype=np.float32)


def _pixel_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row of exact integer sums per batch: pixel count, Σx per channel, Σxy per channel pair."""
    totals = np.zeros(len(SUM_COLUMNS), dtype=np.int64)
    for data in batch["image"]:
        x = decode(data).reshape(-1, 3).astype(np.float64)  # float64 BLAS is exact below 2^53
        xtx = x.T @ x
        totals += np.array([len(x), *x.sum(axis=0), *(xtx[i, j] for i, j in PAIRS)], dtype=np.float64).astype(np.int64)
    return {name: totals[k : k + 1] for k, name in enumerate(SUM_COLUMNS)}


def _image_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per block: the per-pixel sums of its images, as int64 bytes."""
    total = sum(decode(data).astype(np.int64) for data in batch["image"])
    return {"sums": np.array([np.ascontiguousarray(total).tobytes()], dtype=object)}
