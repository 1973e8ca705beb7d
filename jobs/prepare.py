"""Prepare ILSVRC-2012 as Parquet shards with Ray Data over the cluster's CPUs; measure its colours.

    python jobs/prepare.py --input /data/ILSVRC2012 --output /data/imagenet-shards --stats
    python jobs/prepare.py --input s3://my-bucket/ILSVRC2012 --output s3://my-bucket/imagenet-shards --stats
    python jobs/prepare.py --stats --output /data/imagenet-shards          # statistics of existing shards
    python jobs/prepare.py --input data/sample/raw --output data/sample/shards --size 72

INPUT holds train/<wnid>/*.JPEG and val/ as wnid folders, or flat with Kaggle's LOC_val_solution.csv
or the devkit's ILSVRC2012_validation_ground_truth.txt + meta.mat (--devkit DIR if they are not
beside train/). Kaggle's ILSVRC/Data/CLS-LOC/ tree works as downloaded. S3 and S3-compatible stores
use the AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).

Every image: RGB, short side → --size, centre square, JPEG. OUTPUT gets train/ and val/ shards,
classes.json (sorted wnids → 0..N-1) and manifest.json (counts, shards, every file that could not be
used and why). Interrupted? Run the same command again: finished shards are kept. --stats writes
OUTPUT/stats.json (RGB mean, std, covariance, eigenvalues/vectors), which training then uses.

Ray Data joins the cluster in RAY_ADDRESS (or one started with `ray start`), else starts a local Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from typing import TYPE_CHECKING

from pipeline import cli
from pipeline.config import positive
from pipeline.data.shards import DEFAULT_SHARD_SIZE
from pipeline.errors import InputError
from pipeline.redaction import scrubbed_output

if TYPE_CHECKING:
    from pipeline.data.prepare import PrepareSummary

SHOWN_BAD_FILES = 20  # the rest are in manifest.json


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--input", help="ILSVRC-2012 folder or s3:// prefix holding train/ and val/")
    parser.add_argument("--output", help="the dataset: a folder or s3:// prefix")
    parser.add_argument("--size", type=int, default=256, help="side of the stored square images")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train shuffle across shards")
    parser.add_argument("--devkit", help="folder with the devkit's meta.mat and validation ground truth")
    parser.add_argument("--max-tasks", type=int, help="shard tasks at once (default: as the cluster's CPUs allow)")
    parser.add_argument("--max-file-mb", type=positive, default=64.0,
                        help="a larger input file is listed as a bad file, not read")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset OUTPUT holds from other arguments")
    parser.add_argument("--stats", action="store_true", help="compute OUTPUT/stats.json over the training shards")
    cli.add_progress(parser)
    cli.renamed(parser, "--source", "--input")
    cli.renamed(parser, "--out", "--output")
    return parser


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()  # before Ray and pyarrow make their loggers: no secret reaches the job's logs
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.require(parser, args, "--output")
    if not args.input and not args.stats:
        parser.error("pass --input to prepare a dataset, --stats to measure one, or both")
    from ray.data import DataContext  # once the flags are good: --help and a mistyped flag answer at once

    from pipeline.cluster import connection
    from pipeline.data.prepare import PrepareOptions, prepare

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the bars and the summary say it
    context = DataContext.get_current()
    context.enable_operator_progress_bars = False
    try:
        if args.input:
            context.enable_progress_bars = False  # one images/s bar of our own instead
            options = PrepareOptions(
                size=args.size,
                shard_size=args.shard_size,
                seed=args.seed,
                devkit=args.devkit,
                overwrite=args.overwrite,
                max_tasks=args.max_tasks,
                max_file_bytes=int(args.max_file_mb * 2**20),
            )
            summary = prepare(args.input, args.output, options, progress=args.progress, log=print)
            print(describe(summary), flush=True)
        if args.stats:
            from pipeline.data.stats import compute_stats

            context.enable_progress_bars = args.progress
            connection.connect()
            print(f"\ncomputing colour statistics over {args.output}/train ...", flush=True)
            stats = compute_stats(args.output)
            print(
                f"  pixels        {stats['pixels']:,}\n"
                f"  mean          {_vector(stats['mean'])}\n"
                f"  std           {_vector(stats['std'])}\n"
                f"  eigenvalues   {_vector(stats['eigenvalues'])}\n"
                f"  eigenvectors  {'  '.join(_vector(row) for row in stats['eigenvectors'])}  (columns)\n"
                f"  written to    {args.output.rstrip('/')}/stats.json"
            )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def describe(summary: PrepareSummary) -> str:
    resumed = f", {summary.shards_skipped} already written before" if summary.shards_skipped else ""
    lines = [
        f"\nprepared {summary.out}",
        f"  layout      {summary.layout}",
        f"  images      {', '.join(f'{s} {n:,}' for s, n in summary.images.items())}",
        f"  shards      {summary.shards_total}{resumed}",
        f"  bytes       {summary.bytes / 2**20:,.1f} MiB",
        f"  speed       {summary.images_per_s:,.0f} images/s ({summary.written_images:,} in {summary.seconds:.1f}s)"
        if summary.written_images
        else "  speed       nothing left to write",
        f"  bad files   {len(summary.bad_files)}" + (" (listed in manifest.json)" if summary.bad_files else ""),
    ]
    lines += [f"    {b['path']}: {b['reason']}" for b in summary.bad_files[:SHOWN_BAD_FILES]]
    if len(summary.bad_files) > SHOWN_BAD_FILES:
        lines.append(f"    ... and {len(summary.bad_files) - SHOWN_BAD_FILES} more")
    return "\n".join(lines)


def _vector(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


if __name__ == "__main__":
    sys.exit(main())
