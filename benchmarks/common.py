"""What the benchmarks share: a source of ImageNet-sized JPEGs, shards read back, the decode floor.

A library of the benchmark scripts (`benchmarks/*.py`), which import it and `pipeline`, never
each other.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.sample import make_sample
from pipeline.data.transforms import decode, random_crop_flip


def make_source(root: Path, images: int, seed: int = 0) -> int:
    """A sample source of `images` ImageNet-sized JPEGs; returns their total bytes."""
    per_class = max(1, images // 11)  # 10 classes, val a tenth of train
    make_sample(root, num_classes=10, train_per_class=per_class, val_per_class=max(1, per_class // 10), seed=seed)
    rng = np.random.default_rng(seed)
    total = 0
    for path in sorted(root.rglob("*.JPEG")):
        with Image.open(path) as image:
            image = image.convert("RGB")
        scale = rng.uniform(330, 420) / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 10, (image.height, image.width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total


def load_images(shards: Path) -> list[bytes]:
    return [
        b
        for f in sorted((shards / "train").glob("*.parquet"))
        for b in pq.read_table(f, columns=["image"])["image"].to_pylist()
    ]


_IMAGES: list[bytes] = []


def _floor_part(args: tuple[int, int, int]) -> int:
    start, stop, crop = args
    rng = np.random.default_rng(start)
    for data in _IMAGES[start:stop]:
        np.ascontiguousarray(random_crop_flip(decode(data), crop, rng))
    return stop - start


def decode_floor(images: list[bytes], crop: int, cpus: int, epochs: int) -> list[float]:
    """images/s of `cpus` forked processes, each decoding, cropping and flipping its share."""
    global _IMAGES
    _IMAGES = images
    bounds = np.linspace(0, len(images), cpus + 1).astype(int)
    rates = []
    with multiprocessing.get_context("fork").Pool(cpus) as pool:
        for _ in range(epochs):
            started = time.perf_counter()
            done = sum(pool.map(_floor_part, [(a, b, crop) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]))
            rates.append(done / (time.perf_counter() - started))
    return rates


def spread(values: list[float], fmt: str) -> str:
    """ "median (lowest-highest)" of the repetitions, each number in `fmt`."""
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"
