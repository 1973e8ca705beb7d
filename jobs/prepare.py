"""Prepare an ILSVRC-2012 folder as Parquet shards, with Ray Data over the cluster's CPUs.

    python jobs/prepare.py --source /data/ILSVRC2012 --out /data/imagenet-shards
    python jobs/prepare.py --source data/sample/raw --out data/sample/shards --size 72

Ray Data joins the cluster in RAY_ADDRESS (or one started with `ray start`), else starts a local Ray.
Every image: RGB, short side → --size, centre square, JPEG. OUT gets train/ and val/ shards,
classes.json (sorted wnids → 0..N-1) and manifest.json (counts, shards, files that could not be read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline.errors import InputError  # noqa: E402
from pipeline.prepare import DEFAULT_SHARD_SIZE, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder with train/<wnid>/ and val/ (ILSVRC-2012 layout)")
    parser.add_argument("--out", required=True, help="output folder for shards, classes.json, manifest.json")
    parser.add_argument("--size", type=int, default=256, help="side of the stored square images (default 256)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train shuffle across shards")
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.source, args.out, size=args.size, shard_size=args.shard_size, seed=args.seed)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"\nprepared {summary.out}\n"
        f"  images      {', '.join(f'{s} {n:,}' for s, n in summary.images.items())}\n"
        f"  bytes       {summary.bytes / 2**20:,.1f} MiB\n"
        f"  speed       {summary.images_per_s:,.0f} images/s ({summary.seconds:.1f}s)\n"
        f"  bad files   {len(summary.bad_files)}"
        + "".join(f"\n    {b['path']}: {b['reason']}" for b in summary.bad_files[:20])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
