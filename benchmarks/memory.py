"""Does the training pipeline stream? Feed a dataset several times the object store through it.

    python benchmarks/memory.py                                   # 6,000 images through a 300 MiB store
    python benchmarks/memory.py --images 20000 --object-store-mb 300 --json /tmp/memory.json

Writes Parquet shards of 256×256 JPEGs (noisy, so they are large on disk too), starts its own
local Ray with a small object store, and runs the project's training pipeline (read → decode →
random crop → flip → uint8 batches through ``iter_torch_batches``) for a few epochs while sampling
the object store and the RSS of every Ray process. Streaming means: the object store never fills,
nothing is spilled to disk, and RSS stays flat from epoch to epoch.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.shards import SCHEMA

MiB = 2**20


def write_shards(root: Path, images: int, size: int, shard_size: int, seed: int = 0) -> int:
    """`images` noisy size×size JPEGs (~55 KB each) in shards of `shard_size`; returns the bytes on disk."""
    rng = np.random.default_rng(seed)
    distinct = []
    for _ in range(32):  # a few distinct images, reused: the pipeline's cost does not depend on which
        base = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
        pixels = np.clip(base + rng.normal(0, 100, (size, size, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        distinct.append(out.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, images, shard_size)):
        n = min(shard_size, images - start)
        table = pa.table(
            {
                "image": [distinct[(start + i) % len(distinct)] for i in range(n)],
                "label": np.arange(start, start + n, dtype=np.int32) % 10,
                "wnid": ["n00000000"] * n,
                "key": [f"{start + i}.JPEG" for i in range(n)],
            },
            schema=SCHEMA,
        )
        # No dictionary encoding: repeated images take their full size on disk, as distinct ones would.
        pq.write_table(table, root / f"train-{index:05d}.parquet", compression="none", use_dictionary=False)
    return sum(p.stat().st_size for p in root.glob("*.parquet"))


class Sampler(threading.Thread):
    """Peak object-store use and peak summed RSS of the driver and every Ray process, 4× a second."""

    def __init__(self, gcs_address: str) -> None:
        super().__init__(daemon=True)
        from ray._private import internal_api

        self.state = internal_api.get_state_from_address(gcs_address)
        self.internal_api = internal_api
        self.peak_store = self.peak_rss = 0
        self.rss_by_epoch: list[int] = []
        self.stop = threading.Event()

    def store(self):
        return self.internal_api.get_memory_info_reply(self.state).store_stats

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.peak_store = max(self.peak_store, self.store().object_store_bytes_used)
            self.peak_rss = max(self.peak_rss, ray_rss())


def ray_rss() -> int:
    total = psutil.Process().memory_info().rss
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid != psutil.Process().pid and ("ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd):
                total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=256, help="stored image side")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--object-store-mb", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import ray

    from pipeline.train import ingest

    with tempfile.TemporaryDirectory() as tmp:
        disk = write_shards(Path(tmp) / "train", args.images, args.size, args.shard_size)
        ray.init(
            num_cpus=args.cpus,
            object_store_memory=args.object_store_mb * MiB,
            include_dashboard=False,
            _temp_dir=str(Path(tmp) / "ray"),
        )
        try:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            sampler = Sampler(ray.get_runtime_context().gcs_address)
            sampler.start()
            ds = ingest.train_dataset(str(Path(tmp) / "train"), crop=args.crop, seed=0)
            epochs = []
            for _ in range(args.epochs):
                started, rows, delivered = time.perf_counter(), 0, 0
                for batch in ds.iter_torch_batches(batch_size=128, prefetch_batches=2):
                    rows += len(batch["label"])
                    delivered += batch["image"].numel()
                epochs.append(
                    {
                        "rows": rows,
                        "delivered_mib": delivered / MiB,
                        "seconds": time.perf_counter() - started,
                        "rss_mib": ray_rss() / MiB,
                    }
                )
            sampler.stop.set()
            sampler.join()
            store = sampler.store()
            result = {
                "images": args.images,
                "object_store_mib": args.object_store_mb,
                "dataset_on_disk_mib": disk / MiB,
                "decoded_per_epoch_mib": epochs[0]["delivered_mib"],
                "peak_object_store_mib": sampler.peak_store / MiB,
                "spilled_mib": store.spilled_bytes_total / MiB,
                "fallback_mib": store.object_store_bytes_fallback / MiB,
                "peak_rss_mib": sampler.peak_rss / MiB,
                "epochs": epochs,
            }
        finally:
            ray.shutdown()

    print(
        f"dataset {result['dataset_on_disk_mib']:.0f} MiB on disk, {result['decoded_per_epoch_mib']:.0f} MiB decoded "
        f"per epoch, through a {args.object_store_mb} MiB object store\n"
        f"peak object store {result['peak_object_store_mib']:.0f} MiB, spilled {result['spilled_mib']:.0f} MiB, "
        f"fallback {result['fallback_mib']:.0f} MiB, peak RSS of Ray + driver {result['peak_rss_mib']:.0f} MiB\n"
        + "\n".join(
            f"epoch {i + 1}: {e['rows']} images, {e['rows'] / e['seconds']:,.0f} img/s, RSS {e['rss_mib']:.0f} MiB"
            for i, e in enumerate(epochs)
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
