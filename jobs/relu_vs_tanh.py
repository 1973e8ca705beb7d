r"""The paper's Figure 1: ReLU against tanh in the same four-layer CNN, trained side by side.

    python jobs/relu_vs_tanh.py --output runs/relu-vs-tanh                        # the bundled sample at 32×32
    python jobs/relu_vs_tanh.py --cifar10 ~/data/cifar-10-batches-py --epochs 40 --output runs/relu-vs-tanh

Trains the same network twice, with ReLU and with tanh units (same initial weights, same batches
in the same order), as two Ray Train runs at the same time; records the training error after
every epoch; reports for each arm the (interpolated) epoch at which it first reaches
--target-error and the ratio tanh ÷ ReLU. Writes OUTPUT/relu_vs_tanh.png and OUTPUT/relu_vs_tanh.json,
and logs both to MLflow as one parent run with a child run per arm (--no-tracking: files only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli
from pipeline.errors import InputError
from pipeline.redaction import scrubbed_output


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--output", help="folder for relu_vs_tanh.png and relu_vs_tanh.json")
    parser.add_argument("--cifar10", help="CIFAR-10's python version (the folder with data_batch_1 … 5); no download")
    parser.add_argument("--data", help="prepared shards to use instead (resized to 32×32); default: the bundled sample")
    parser.add_argument(
        "--sample-dir", default="data/sample", help="where the bundled sample lives (built on first use)"
    )
    parser.add_argument("--target-error", type=float, default=0.25, help="training error to reach (the paper: 0.25)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 on CIFAR-10, 30 on shards")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9) of both arms")
    parser.add_argument("--lr-tanh", type=float, default=None, help="the tanh arm's own learning rate (default: --lr)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step of each arm")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order of both arms")
    parser.add_argument("--experiment", default="relu-vs-tanh", help="MLflow experiment")
    cli.add_tracking(parser, skip="write the files, log nothing")
    cli.renamed(parser, "--out", "--output")
    return parser


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()  # before Ray, MLflow and torch make their loggers: no secret reaches the job's logs
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.require(parser, args, "--output")
    cli.use_tracking_uri(args)
    if not 0 < args.target_error < 1 or args.batch_size < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error("--target-error must be in (0, 1), --batch-size and --epochs at least 1")
    sys.stdout.reconfigure(line_buffering=True)
    from pipeline.experiments import relu_vs_tanh  # once the flags are good: --help answers at once
    from pipeline.tracking import mlflow_client

    try:
        if args.cifar10:
            images, labels = relu_vs_tanh.load_cifar10(args.cifar10)
            source, epochs = f"CIFAR-10 ({args.cifar10})", args.epochs or 40
        else:
            from pipeline.data.prepare import sample_shards

            shards = args.data or str(sample_shards(args.sample_dir))
            images, labels = relu_vs_tanh.load_shards(shards)
            source, epochs = f"{shards} at 32×32", args.epochs or 30
        if args.tracking:
            uri = mlflow_client.resolve_tracking_uri()
            mlflow_client.check_server(uri)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from pipeline.cluster import connection

    connection.connect(local_cpus=lambda: 2)  # one CPU per arm on a laptop; a cluster's own CPUs otherwise
    lrs = {"relu": args.lr, "tanh": args.lr_tanh or args.lr}
    recipe = relu_vs_tanh.Recipe(epochs, args.target_error, lrs, args.batch_size, args.seed)
    arms = relu_vs_tanh.run(images, labels, recipe)
    result = relu_vs_tanh.summary(arms, args.target_error, source)
    files = relu_vs_tanh.write(result, Path(args.output))
    lines = [f"\n{name:>4}: {arm.epochs_to_target:.1f} epochs to {args.target_error:.0%} training error"
             if arm.epochs_to_target is not None else f"\n{name:>4}: did not reach {args.target_error:.0%} in {epochs} epochs"
             for name, arm in arms.items()]  # fmt: skip
    print("".join(lines))
    if result["ratio"]:
        print(f"ratio tanh ÷ ReLU: {result['ratio']:.2f} (the paper: about 6 on CIFAR-10)")
    elif result["ratio_at_least"]:
        print(f"ratio tanh ÷ ReLU: more than {result['ratio_at_least']:.2f} (tanh never reached the target)")
    print(f"figure: {files[0]}\nresults: {files[1]}")
    if args.tracking:
        parent, children = relu_vs_tanh.log_to_mlflow(uri, result, files, args.experiment, args.batch_size, args.seed)
        print(f"MLflow: run {parent} in experiment {args.experiment!r} (child runs relu {children['relu']}, "
              f"tanh {children['tanh']}) at {mlflow_client.redact(uri)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
