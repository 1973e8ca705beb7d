"""Evaluate a model on prepared validation shards: top-1 and top-5 error, centre crop and the paper's 10 crops.

    python jobs/evaluate.py --model models:/alexnet/1 --data data/sample/shards --ten-crop
    python jobs/evaluate.py --model models:/alexnet@champion --data s3://bucket/imagenet-shards --ten-crop \\
        --replicas 4 --gpus-per-replica 1
    python jobs/evaluate.py --model runs/alexnet-sample-20261125-084915/checkpoint_2026-11-25_08-54-10.123456 \\
        --data data/sample/shards

Ray Data decodes the stored squares into test views on CPU workers and a pool of model actors
(each loading the model once) scores them. Prints the table (model | top-1 error | top-5 error, one
row per protocol) and logs it to the model's MLflow run (metrics eval_centre_top1_error, ...,
artifacts evaluation/). MLflow: --tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli
from pipeline.config import FORWARD_ENV_HELP, positive_int
from pipeline.errors import InputError
from pipeline.redaction import redact, scrubbed_output


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", help="models:/NAME/VERSION, models:/NAME@ALIAS or a checkpoint directory")
    parser.add_argument("--data", help="prepared shards (jobs/prepare.py --output): local or s3://")
    parser.add_argument("--ten-crop", action="store_true", help="also the paper's 10-crop protocol")
    parser.add_argument(
        "--output",
        help="a new folder or s3:// prefix for the files it also logs to MLflow: the table, evaluation.json, "
        "per_class.csv, confusion.png",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per model call (x10 views with --ten-crop)"
    )
    cli.add_replicas(parser)
    cli.add_tracking(parser, skip="do not log the results to the model's MLflow run")
    parser.add_argument("--forward-env", default="", metavar="NAME,...", help=FORWARD_ENV_HELP)
    cli.add_progress(parser)
    cli.renamed(parser, "--no-log", "--no-tracking")
    return parser


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()  # before Ray, MLflow and torch make their loggers: no secret reaches the job's logs
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.require(parser, args, "--model", "--data")
    cli.use_tracking_uri(args)
    # Once the flags are good: --help and a mistyped flag answer at once.
    from ray.data import DataContext

    from pipeline.cluster import connection
    from pipeline.cluster.resources import GpuCapacity, cpus_now_or_addable
    from pipeline.data.shards import open_dataset
    from pipeline.scoring import evaluation, loading, pool
    from pipeline.tracking import mlflow_client

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the table says it
    DataContext.get_current().enable_progress_bars = args.progress
    if not args.progress:  # MLflow's bar while it downloads the model, too
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        tracking_uri = mlflow_client.resolve_tracking_uri()
        if args.model.startswith("models:/") or args.tracking:
            mlflow_client.check_server(tracking_uri)  # a dead server is named now, not after minutes of retries
        ref = loading.resolve(args.model, tracking_uri)  # an alias → its version, once
        dataset = open_dataset(args.data)
        evaluation.check(ref, dataset)  # the model fits the dataset: checked before any cluster work
        output = _output(args.output, dataset)
        forward = connection.env_names(args.forward_env)
        connection.connect(
            env=mlflow_client.worker_env(tracking_uri, forward), joined_note=mlflow_client.credentials_note(forward)
        )
        actors = pool.plan(args.replicas, args.gpus_per_replica, GpuCapacity.read(), cpus_now_or_addable())
        print(actors.describe(), flush=True)
        result = evaluation.evaluate(ref, dataset, args.ten_crop, args.batch_size, actors)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    version = f" (version {ref.version})" if ref.version else ""
    print(f"\n{dataset.count('val'):,} validation images of {dataset.uri}; model {ref.uri}{version}\n")
    print(evaluation.table(args.model, result.protocols))
    worst = ", ".join(f"{r['name'].split(',')[0]} {r[result.main + '_top1_error']:.2f}" for r in result.worst())
    print(f"\nhighest top-1 error by class ({evaluation.PROTOCOL_NAMES[result.main]}): {worst}")
    broken = max(r["nonfinite"] for r in result.protocols.values())
    if broken:
        print(f"\nwarning: the model gave probabilities that are not finite for {broken:,} images (counted as "
              "errors): it is broken (trained until it diverged?)")  # fmt: skip
    written = evaluation.files(ref, dataset, result)
    if output is not None:
        evaluation.write(output, written)
        print(f"\nwritten to {output.uri}: {', '.join(written)}")
    if args.tracking and ref.run_id:
        evaluation.log_to_run(ref, result, written)
        print(
            f"\nlogged to MLflow run {ref.run_id} at {redact(tracking_uri)} (metrics, and evaluation/: {', '.join(written)})"
        )
    return 0


def _output(uri: str | None, dataset):
    """Where --output puts the files: a new place, apart from the dataset; None without --output."""
    if not uri:
        return None
    from pipeline import outputs
    from pipeline.storage import check_apart, locate

    output = locate(uri)
    check_apart(output, "--output", {"--data": dataset.root})
    output.check_writable()
    if outputs.exists(output):
        raise InputError(f"--output {output.uri} already holds files; name a new folder or prefix")
    return output


if __name__ == "__main__":
    sys.exit(main())
