r"""Batch inference: run a registered model over a bucket or folder of images, one Parquet row per file.

    python jobs/infer.py --model models:/alexnet@champion --input data/sample/raw/val --output preds/sample-val
    python jobs/infer.py --model models:/alexnet@champion --input s3://bucket/new-images/ \
        --output s3://bucket/preds/run1/ --replicas 1:8 --gpus-per-replica 1 --batch-size 256
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/infer.py --model models:/alexnet@champion --input s3://bucket/new/ --output s3://bucket/preds/

Lists the input recursively (jpg, jpeg, png, webp; any case), decodes with validation's
transform (short side to the model's image size, centre crop; --ten-crop for the paper's ten
views), scores in a pool of model actors (--replicas N, MIN:MAX to autoscale, or auto: 1 up to the
cluster's GPUs, or its CPUs without GPUs; one GPU each where the cluster has or can add GPU nodes;
each actor loads the model once), and
writes Parquet with one row per image: path, top1_wnid, top1_name, top1_prob, top5_wnids,
top5_names, top5_probs, model_uri, model_version, error (null when fine). The table is written to
a temporary location and moved into place when complete; an existing output is refused unless
--overwrite, which replaces it whole. MLflow: --tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli
from pipeline.config import FORWARD_ENV_HELP, positive, positive_int
from pipeline.errors import InputError
from pipeline.redaction import scrubbed_output


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint dir")
    parser.add_argument("--input", help="a folder or s3:// prefix of images (searched recursively)")
    parser.add_argument("--output", help="where the Parquet table goes: a folder or s3:// prefix")
    parser.add_argument("--ten-crop", action="store_true", help="the paper's ten views per image, softmax averaged")
    cli.add_replicas(parser)
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per model call (x10 views with --ten-crop)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output whole")
    parser.add_argument("--max-file-mb", type=positive, default=64.0, help="a larger file gets an error row, unread")
    cli.add_tracking(parser)
    parser.add_argument("--forward-env", default="", metavar="NAME,...", help=FORWARD_ENV_HELP)
    cli.add_progress(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()  # before Ray, MLflow and torch make their loggers: no secret reaches the job's logs
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.require(parser, args, "--model", "--input", "--output")
    cli.use_tracking_uri(args)
    # Once the flags are good: --help and a mistyped flag answer at once.
    from ray.data import DataContext

    from pipeline.cluster import connection
    from pipeline.cluster.resources import GpuCapacity, cpus_now_or_addable
    from pipeline.scoring import inference, loading, pool
    from pipeline.storage import locate
    from pipeline.tracking import mlflow_client

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    DataContext.get_current().enable_progress_bars = args.progress
    if not args.progress:  # MLflow's bar while it downloads the model, too
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:  # everything that can be wrong is found here, before any cluster work
        output, source = locate(args.output), locate(args.input)
        inference.prepare_output(output, args.overwrite, source)
        tracking_uri = mlflow_client.resolve_tracking_uri()
        if args.model.startswith("models:/"):
            mlflow_client.check_server(tracking_uri)
        ref = loading.resolve(args.model, tracking_uri)  # an alias → its version, once: every row is that version
        listing = inference.list_images(source)
        views = "ten crops" if args.ten_crop else "centre crop"
        print(
            f"{len(listing.images):,} images under {source.uri}; model {ref.uri} (version {ref.version or '-'}): "
            f"{ref.image_size}-px squares, {ref.crop}-px {views}",
            flush=True,
        )
        if listing.ignored:
            example = source.uri_of(listing.ignored[0])
            print(f"ignoring {len(listing.ignored)} files without an image extension, e.g. {example}")
        for path, why in listing.unlisted:  # also in the output's _SUCCESS.json
            print(f"not read: {source.uri_of(path)}: {why}")
        forward = connection.env_names(args.forward_env)
        connection.connect(
            env=mlflow_client.worker_env(tracking_uri, forward), joined_note=mlflow_client.credentials_note(forward)
        )
        actors = pool.plan(args.replicas, args.gpus_per_replica, GpuCapacity.read(), cpus_now_or_addable())
        print(actors.describe(), flush=True)
        options = inference.InferenceOptions(
            ten_crop_views=args.ten_crop,
            pool=actors,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            max_file_bytes=int(args.max_file_mb * 2**20),
        )
        summary = inference.infer(ref, source, listing, output, options)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"\n{summary.images:,} images, {summary.errors:,} with errors, in {summary.seconds:.1f}s "
        f"({summary.images_per_s:,.0f} images/s)\n"
        f"predictions: {summary.output} (Parquet; {inference.SUCCESS_FILE} written last)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
