"""How fast does jobs/prepare.py turn source JPEGs into shards, per CPU core, and what does that mean for ImageNet?

    python benchmarks/prepare.py                       # 2,000 ImageNet-sized images, all cores
    python benchmarks/prepare.py --images 4000 --cpus 2 --json /tmp/prepare.json

The source is the bundled sample's generator scaled to ImageNet's typical photo (short side ~375,
aspect up to 1.6) with sensor-like noise, so the JPEGs weigh ~100 KB like real ones. Measured in
the same run on the same files:
  floor    one process, one core: read, decode, resize to 256, centre square, encode (no Ray)
  job      the prepare job end to end on a local Ray with --cpus CPUs (listing, planning, tasks,
           Parquet writes, manifest), and the rate inside its shard tasks (images per task-second)
The rate inside the tasks is what a long job sustains per core (a short run also pays Ray's
start-up and an uneven last round of tasks); it is extrapolated to ILSVRC-2012's 1,331,167 images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import make_source
from pipeline.data.transforms import encode_jpeg, load_square

IMAGENET_IMAGES = 1_281_167 + 50_000


def floor(files: list[Path], size: int) -> float:
    """images/s of the per-image work alone, in this one process."""
    started = time.perf_counter()
    for path in files:
        encode_jpeg(load_square(path.read_bytes(), size))
    return len(files) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: all)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=64, help="smaller than the default 1024: more tasks")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import ray
    from ray.data import DataContext

    from pipeline.data.prepare import PrepareOptions, prepare

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "raw"
        print(f"generating {args.images} ImageNet-sized JPEGs ...", flush=True)
        source_bytes = make_source(source, args.images)
        files = sorted(source.rglob("*.JPEG"))
        floor_rate = floor(files[: min(len(files), 500)], args.size)

        ray.init(num_cpus=args.cpus, include_dashboard=False)
        try:
            DataContext.get_current().enable_progress_bars = False
            summary = prepare(
                str(source), str(Path(tmp) / "shards"), PrepareOptions(size=args.size, shard_size=args.shard_size)
            )
        finally:
            ray.shutdown()

    job_rate = summary.images_per_s
    task_rate = summary.written_images / summary.task_seconds
    result = {
        "images": len(files),
        "mean_source_kib": source_bytes / len(files) / 1024,
        "cpus": args.cpus,
        "floor_images_per_s_per_core": floor_rate,
        "job_images_per_s": job_rate,
        "job_seconds": summary.seconds,
        "task_images_per_s_per_core": task_rate,
        "task_vs_floor": task_rate / floor_rate,
        "imagenet_minutes": {n: IMAGENET_IMAGES / (task_rate * n) / 60 for n in (8, 32, 128)},
    }
    print(
        f"\n{len(files)} source JPEGs, {result['mean_source_kib']:.0f} KiB on average, {args.cpus} CPUs\n"
        f"  floor (1 process, no Ray)        {floor_rate:8,.0f} images/s per core\n"
        f"  prepare job, inside its tasks    {task_rate:8,.0f} images/s per core ({result['task_vs_floor']:.2f}x the floor)\n"
        f"  prepare job, end to end          {job_rate:8,.0f} images/s on {args.cpus} CPUs ({summary.seconds:.1f} s)\n"
        f"  ILSVRC-2012 ({IMAGENET_IMAGES:,} images) at the in-task rate: "
        + ", ".join(f"{n} cores {m:.0f} min" for n, m in result["imagenet_minutes"].items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
