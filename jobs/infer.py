r"""Batch inference: run a registered model over a bucket or folder of images, one Parquet row per file.

    python jobs/infer.py --model models:/alexnet@champion --input data/sample/raw/val --output preds/sample-val
    python jobs/infer.py --model models:/alexnet@champion --input s3://bucket/new-images/ \
        --output s3://bucket/preds/2026-12-05/ --skip-scored s3://bucket/preds/
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/infer.py --model models:/alexnet@champion --input s3://bucket/new/ --output s3://bucket/preds/run1/

Lists the input recursively (jpg, jpeg, png, webp; any case) as a stream, decodes with
validation's transform (short side to the model's image size, centre crop; --ten-crop for the
paper's ten views), scores in a pool of model actors (--replicas N, MIN:MAX to autoscale, or auto:
as many as the cluster's GPUs, or its CPUs without GPUs, now; one GPU each where the cluster has or can
add GPU nodes; each actor loads the model once), and writes Parquet with one row per image: path,
top1_wnid, top1_name, top1_prob, top5_wnids, top5_names, top5_probs, model_uri, model_version,
error (null when fine). _SUCCESS.json is written last.

Stopped (Ctrl-C, SIGTERM, `ray job stop`, a lost driver), the same command resumes: files already
scored are kept and skipped (Ray Data's checkpoint, at _NAME.checkpoint beside the output until the
job finishes; one run at a time per output).
Another model version or other preprocessing over an unfinished output is refused (--restart
starts over); a finished output is refused unless --overwrite, which deletes it first.
--skip-scored PREVIOUS scores only files no earlier output (or prefix of outputs) holds.
MLflow: --tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli
from pipeline.config import FORWARD_ENV_HELP, non_negative, positive, positive_int
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
    parser.add_argument(
        "--skip-scored",
        action="append",
        metavar="PREVIOUS",
        help="an earlier --output, or a prefix holding several: its files (scored without error) are not scored "
        "again; repeat for more",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the predictions at --output (finished or not) first, then write",
    )
    parser.add_argument("--restart", action="store_true", help="delete an unfinished output's rows and start over")
    parser.add_argument(
        "--rows-per-file",
        type=positive_int,
        default=10_000,
        help="at least this many rows per Parquet file; a stop loses at most the unwritten rows of each writer",
    )
    parser.add_argument("--max-file-mb", type=positive, default=64.0, help="a larger file gets an error row, unread")
    cli.add_tracking(parser)
    parser.add_argument("--forward-env", default="", metavar="NAME,...", help=FORWARD_ENV_HELP)
    cli.add_progress(parser)
    parser.add_argument(
        "--progress-interval", type=non_negative, default=30.0, help="seconds between progress lines (0: none)"
    )
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
    connection.stop_on_sigterm()  # `ray job stop`, a scheduler: stop as Ctrl-C does, and say so
    plan = None
    try:  # everything that can be wrong is found here, before any cluster work
        output, source = locate(args.output), locate(args.input)
        tracking_uri = mlflow_client.resolve_tracking_uri()
        if args.model.startswith("models:/"):
            mlflow_client.check_server(tracking_uri)
        ref = loading.resolve(args.model, tracking_uri)  # an alias → its version, once: every row is that version
        options = inference.InferenceOptions(
            ten_crop_views=args.ten_crop,
            batch_size=args.batch_size,
            max_file_bytes=int(args.max_file_mb * 2**20),
            overwrite=args.overwrite,
            restart=args.restart,
            skip_scored=tuple(args.skip_scored or ()),
            rows_per_file=args.rows_per_file,
            progress_interval=args.progress_interval if args.progress else 0.0,
        )
        plan = inference.prepare_output(ref, source, output, options)
        listing = inference.list_input(source, plan)
        views = "ten crops" if args.ten_crop else "centre crop"
        print(
            f"{listing.images:,} images under {source.uri}; model {ref.uri} (version {ref.version or '-'}): "
            f"{ref.image_size}-px squares, {ref.crop}-px {views}",
            flush=True,
        )
        if listing.ignored:
            print(f"ignoring {listing.ignored:,} files without an image extension, e.g. {listing.ignored_examples[0]}")
        for path, why in listing.unlisted:  # also in the output's _SUCCESS.json
            print(f"not read: {path}: {why}")
        forward = connection.env_names(args.forward_env)
        connection.connect(
            env=mlflow_client.worker_env(tracking_uri, forward), joined_note=mlflow_client.credentials_note(forward)
        )
        cpus = cpus_now_or_addable()
        actors = pool.plan(args.replicas, args.gpus_per_replica, GpuCapacity.read(), cpus, whole=True)
        print(f"{actors.describe()}\n{actors.decoding(cpus)}", flush=True)
        summary = inference.infer(ref, source, plan, dataclasses.replace(options, pool=actors))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if plan is None or not plan.output.join(inference.JOB_FILE).is_file():
            print("\nstopped before any prediction was written", file=sys.stderr)
        else:
            print(
                f"\nstopped: the rows scored so far are kept in {plan.output.uri}; run the same command again to "
                "resume",
                file=sys.stderr,
            )
        return 130
    print(f"\n{summary.describe()}\npredictions: {summary.output} (Parquet; {inference.SUCCESS_FILE} written last)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
