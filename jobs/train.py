r"""Train AlexNet with Ray Data streaming augmentation and Ray Train DDP, tracked in MLflow.

    python jobs/train.py                                  # the bundled sample, built on first use
    python jobs/train.py --data /data/imagenet-shards --profile imagenet --workers 8 --gpu
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": ["/.venv", "/data", "/runs", "/mlflow.db", "/.git"]}' \
        -- python jobs/train.py --data /shared/imagenet-shards --workers 4

Without RAY_ADDRESS or a running `ray start` cluster it starts a local Ray. MLflow goes to
MLFLOW_TRACKING_URI, else ./mlflow.db (open it with `mlflow ui` in this directory).
Every config field is a flag; `--profile` picks the preset they override.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import config  # noqa: E402
from pipeline.errors import InputError  # noqa: E402
from pipeline.metrics import format_duration  # noqa: E402
from pipeline.training import train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except config.ConfigError as exc:
        parser.error(str(exc))
    print("config:\n" + cfg.to_json(), flush=True)
    try:
        summary = train(cfg)
    except InputError as exc:  # bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    best = summary.best
    print(
        f"\ndone in {format_duration(summary.seconds)}\n"
        f"  best epoch        {best['epoch']}: val top-1 error {best['val_top1_error']:.3f}, "
        f"top-5 error {best['val_top5_error']:.3f}\n"
        f"  MLflow run        {summary.run_id} ({summary.run_name}), experiment {summary.experiment!r}\n"
        f"  registered model  models:/{summary.model_name}/{summary.model_version}\n"
        f"  best checkpoint   {summary.checkpoint}\n"
        f"  browse it         mlflow ui --backend-store-uri {summary.tracking_uri}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
