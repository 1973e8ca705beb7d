r"""Train AlexNet with Ray Data streaming augmentation and Ray Train DDP, tracked in MLflow.

    python jobs/train.py                                  # the bundled sample, built on first use
    python jobs/train.py --data /data/imagenet-shards --profile imagenet --workers 8 --gpu
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python jobs/train.py --data s3://bucket/imagenet-shards --storage-path s3://bucket/runs --workers 4 --gpu
    python jobs/train.py ... --gpu --decode-on train    # Ray Data ships JPEG bytes; each GPU decodes (nvJPEG)

Without RAY_ADDRESS or a running `ray start` cluster it starts a local Ray. MLflow goes to
MLFLOW_TRACKING_URI (a team server: `make mlflow`), else ./mlflow.db; --no-tracking turns it off.
The new model version becomes @champion if it beats the current one (--promote if-better|always|never).
Every config field is a flag; `--profile` picks the preset they override.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli, config
from pipeline.errors import InputError, TrainingFailed
from pipeline.redaction import scrubbed_output


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    config.add_arguments(parser)
    groups = {group.title: group for group in parser._action_groups}
    cli.add_tracking(groups["tracking"])
    cli.add_progress(groups["run, checkpoints and fault tolerance"])
    return parser


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()  # before Ray, MLflow and torch make their loggers: no secret reaches the job's logs
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.use_tracking_uri(args)
    if not args.progress:
        args.progress_interval = 0.0
    try:
        cfg = config.from_args(args)
    except config.ConfigError as exc:
        parser.error(str(exc))
    # Line by line even into a file or pipe (`ray job logs`, nohup): progress shows as it happens.
    sys.stdout.reconfigure(line_buffering=True)
    from pipeline.train import reports

    reports.keep_whole()  # before Ray is imported: each epoch's line in the log, restarts included
    from pipeline.data.shards import open_dataset

    try:
        if cfg.data and not cfg.resume:  # a wrong --data answers before torch, Ray and MLflow load
            open_dataset(cfg.data)  # (train() checks the data again, fully)
        # Imported once the flags and the data are good: --help and a bad flag answer at once too.
        from pipeline.metrics import format_duration, per_epoch
        from pipeline.train.driver import train

        summary = train(cfg, given=config.given(args))  # prints the config that runs, --resume's included
    except InputError as exc:  # bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:  # failures past --max-failures: what failed and how to continue
        print(f"error: {exc}", file=sys.stderr)
        return 1
    best = summary.best
    lines = [
        f"\ndone in {format_duration(summary.seconds)}",
        f"  best epoch        {best['epoch']}: val top-1 error {best['val_top1_error']:.3f}, "
        f"top-5 error {best['val_top5_error']:.3f}",
        f"  best checkpoint   {summary.checkpoint}",
    ]
    if summary.curves:
        lines.append(f"  curves            {summary.curves}")
    if summary.run_id:
        lines += [
            f"  MLflow run        {summary.run_id} ({summary.run_name}), experiment {summary.experiment!r}",
            f"  registered model  models:/{summary.model_name}/{summary.model_version} "
            f"-> @{summary.alias} ({summary.promotion})",
            f"  browse it         {_browse_hint(summary)}",
        ]
    else:
        lines.append("  MLflow            off (--no-tracking): nothing logged or registered")
    if summary.delayed_epochs:
        lines.append(f"  MLflow outage     {summary.delayed_epochs} epoch(s) of metrics were sent late; none lost")
    if summary.restarts:
        lines.append(f"  restarts          {summary.restarts} (resumed from checkpoints)")
    if len(set(summary.world_sizes)) > 1 or cfg.elastic:
        batches = set(summary.global_batches)
        batch = f"{batches.pop()} throughout" if len(batches) == 1 else per_epoch(summary.global_batches)
        lines.append(f"  train workers     {per_epoch(summary.world_sizes)}; global batch {batch}")
    print("\n".join(lines))
    return 0


def _browse_hint(summary) -> str:
    registry = f"python jobs/registry.py show {summary.model_name}"
    if summary.tracking_uri.startswith(("http://", "https://")):
        return f"{summary.tracking_uri}/#/models/{summary.model_name}  or  {registry}"
    return f"mlflow ui --backend-store-uri {summary.tracking_uri}  or  {registry}"


if __name__ == "__main__":
    sys.exit(main())
