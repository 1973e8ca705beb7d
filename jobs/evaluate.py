"""Evaluate a model on prepared validation shards: top-1 and top-5 error, centre crop and the paper's 10 crops.

    python jobs/evaluate.py --model models:/alexnet/1 --data data/sample/shards --ten-crop
    python jobs/evaluate.py --model models:/alexnet@champion --data s3://bucket/imagenet-shards --ten-crop \\
        --replicas 4 --gpus-per-replica 1
    python jobs/evaluate.py --model runs/alexnet-sample-20261125-084915/checkpoint_2026-11-25_08-54-10.123456 \\
        --data data/sample/shards

Ray Data decodes the stored squares into test views on CPU workers and a pool of model actors
(each loading the model once) scores them. Prints the table (model | top-1 error | top-5 error, one
row per protocol) and logs it to the model's MLflow run (metrics eval_centre_top1_error, ...,
artifacts evaluation/). MLflow: MLFLOW_TRACKING_URI, else ./mlflow.db.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline.config import FORWARD_ENV_HELP, non_negative, positive_int
from pipeline.errors import InputError
from pipeline.redaction import redact, scrubbed_output


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()  # before Ray, MLflow and torch make their loggers: no secret reaches the job's logs
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS or a checkpoint directory"
    )
    parser.add_argument("--data", required=True, help="prepared shards (jobs/prepare.py --out): local or s3://")
    parser.add_argument("--ten-crop", action="store_true", help="also the paper's 10-crop protocol")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per model call (x10 views with --ten-crop)"
    )
    parser.add_argument("--replicas", type=positive_int, default=1, help="model actors at most")
    parser.add_argument("--gpus-per-replica", type=non_negative, default=0, help="GPUs per model actor")
    parser.add_argument("--no-log", action="store_true", help="do not log the results to the model's MLflow run")
    parser.add_argument("--forward-env", default="", metavar="NAME,...", help=FORWARD_ENV_HELP)
    args = parser.parse_args(argv)
    # Once the flags are good: --help and a mistyped flag answer at once.
    from pipeline.cluster import connection
    from pipeline.data.shards import open_dataset
    from pipeline.scoring import evaluation, loading
    from pipeline.tracking import mlflow_client

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the table says it
    try:
        tracking_uri = mlflow_client.resolve_tracking_uri()
        if args.model.startswith("models:/") or not args.no_log:
            mlflow_client.check_server(tracking_uri)  # a dead server is named now, not after minutes of retries
        ref = loading.resolve(args.model, tracking_uri)  # an alias → its version, once
        dataset = open_dataset(args.data)
        evaluation.check(ref, dataset)  # the model fits the dataset: checked before any cluster work
        forward = connection.env_names(args.forward_env)
        connection.connect(
            env=mlflow_client.worker_env(tracking_uri, forward), joined_note=mlflow_client.credentials_note(forward)
        )
        results = evaluation.evaluate(
            ref,
            dataset,
            ten_crop=args.ten_crop,
            batch_size=args.batch_size,
            replicas=args.replicas,
            gpus_per_replica=args.gpus_per_replica,
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    version = f" (version {ref.version})" if ref.version else ""
    print(f"\n{dataset.count('val'):,} validation images of {dataset.uri}; model {ref.uri}{version}\n")
    print(evaluation.table(args.model, results))
    broken = max(r["nonfinite"] for r in results.values())
    if broken:
        print(f"\nwarning: the model gave probabilities that are not finite for {broken:,} images (counted as "
              "errors): it is broken (trained until it diverged?)")  # fmt: skip
    if not args.no_log and ref.run_id:
        evaluation.log_to_run(ref, dataset, results)
        print(f"\nlogged to MLflow run {ref.run_id} at {redact(tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
