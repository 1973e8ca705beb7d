"""Is the training pipeline as fast as the hardware? Three ways to feed the same shards, same cores.

    python benchmarks/ingest.py                          # 8,000 images, 224-px crops, all cores, 3 × 4 epochs
    python benchmarks/ingest.py --images 8000 --cpus 2 --epochs 4 --repeats 5 --data /tmp/ingest --json /tmp/ingest.json

Shards of 256×256 JPEGs prepared by the project's own prepare job from natural-looking photos
(the sample's generator at ImageNet's photo size, ~375 px, with sensor noise), then, on --cpus cores:
  floor             decode + random 224 crop + flip in a tight loop, one process per core, the
                    JPEG bytes already in memory: what the cores can do at all
  ray_data          the project's training pipeline (pipeline.train.ingest: read shards, decode, crop,
                    flip, shuffle rows; Ray Data on a local Ray with --cpus CPUs) delivering uint8
                    batches of --batch-size to a Ray Train worker through iter_torch_batches; the
                    consumer only touches each batch
  torch_dataloader  a torch DataLoader over the same shards (rows in memory, shuffled), torchvision's
                    RandomCrop + RandomHorizontalFlip + PILToTensor, num_workers = --cpus,
                    persistent workers, the same batch size
Each repetition runs all three, one after the other, in an order that rotates between repetitions
(a slow minute of the machine then hits each of them); each run has --epochs epochs: the first is
reported apart (start-up, warm-up), its steady state is the mean of the others. Of those, also:
the seconds until each epoch's first batch (epoch start: Ray Data starts a new streaming execution
per epoch, the DataLoader's persistent workers have batches ready) and the streaming rate, between
the first and the third quarter of each epoch's batches, which is what an epoch of ImageNet's
length sees. The table gives the median
over the repetitions and the spread (lowest-highest); the ratios are taken within each
repetition. `--json PATH` writes the medians (floor, ray_data, torch_dataloader and their
*_first_epoch and *_streaming) and every repetition's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import decode_floor, load_images, make_source

# Per epoch: images delivered, seconds, seconds until its first batch, images/s between its first
# and third quarter of batches (mid-epoch: neither the start nor the last uneven round).
Epoch = tuple[int, float, float, float]


def _epoch(started: float, arrivals: list[float], batch_size: int) -> Epoch:
    """An epoch from the times its batches arrived (perf_counter), each of `batch_size` images."""
    seconds = time.perf_counter() - started
    if not arrivals:
        return (0, seconds, 0.0, 0.0)
    q1, q3 = len(arrivals) // 4, 3 * len(arrivals) // 4
    mid = (q3 - q1) * batch_size / (arrivals[q3] - arrivals[q1]) if q3 > q1 else len(arrivals) * batch_size / seconds
    return (len(arrivals) * batch_size, seconds, arrivals[0] - started, mid)


def make_shards(out: Path, images: int, shard_size: int, cpus: int) -> Path:
    """Prepared shards (256-px squares) of `images` natural-looking photos, made once per --data dir."""
    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    import ray

    from pipeline.data.prepare import PrepareOptions, prepare

    print(f"generating {images} ImageNet-sized photos and preparing them as 256-px shards ...", flush=True)
    make_source(out / "raw", images)
    ray.init(num_cpus=cpus, include_dashboard=False)
    try:
        prepare(out / "raw", shards, PrepareOptions(size=256, shard_size=shard_size))
    finally:
        ray.shutdown()
    return shards


# --- (a) the floor ------------------------------------------------------------------------------

# --- (b) the project's Ray Data pipeline into a Ray Train worker --------------------------------


def _consume(config: dict) -> list[Epoch]:
    import ray.train

    from pipeline.train import ingest

    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for _ in range(config["epochs"]):
        started, arrivals = time.perf_counter(), []
        for batch in ingest.torch_batches(shard, config["batch_size"], drop_last=True):
            batch["image"][0, 0, 0, 0].item()  # touch it
            arrivals.append(time.perf_counter())
        epochs.append(_epoch(started, arrivals, config["batch_size"]))
    return epochs


def ray_data(shards: Path, crop: int, cpus: int, epochs: int, batch_size: int) -> list[Epoch]:
    import ray
    from ray.data import DataContext
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import ingest

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # --cpus for Ray Data, plus one logical CPU for the consumer, which only counts (as the
    # DataLoader's main process does beside its --cpus workers).
    ray.init(num_cpus=cpus + 1)
    try:
        DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as storage:
            trainer = TorchTrainer(
                _consume,
                train_loop_config={"epochs": epochs, "batch_size": batch_size},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name="ingest", storage_path=storage),
                datasets={"train": ingest.train_dataset(shards / "train", crop, seed=0)},
                dataset_config=ingest.IngestConfig(),
            )
            result = trainer.fit()
    finally:
        ray.shutdown()
    return result.return_value


# --- (c) torch DataLoader ----------------------------------------------------------------------


class _ShardRows:
    """The shards' rows in memory, read and decoded with PIL, transformed with torchvision."""

    def __init__(self, images: list[bytes], crop: int) -> None:
        from torchvision import transforms

        self.images = images
        self.transform = transforms.Compose(
            [transforms.RandomCrop(crop), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.images[index])) as image:
            return self.transform(image.convert("RGB")), 0


def torch_dataloader(images: list[bytes], crop: int, cpus: int, epochs: int, batch_size: int) -> list[Epoch]:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    loader = DataLoader(
        _ShardRows(images, crop), batch_size=batch_size, shuffle=True, num_workers=cpus, persistent_workers=True,
        drop_last=True,
    )  # fmt: skip
    out = []
    for _ in range(epochs):
        started, arrivals = time.perf_counter(), []
        for batch, _labels in loader:
            batch[0, 0, 0, 0].item()
            arrivals.append(time.perf_counter())
        out.append(_epoch(started, arrivals, batch_size))
    return out


PIPELINES = ("floor", "ray_data", "torch_dataloader")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000, help="photos generated (about 91%% become train)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores for each of the three (default: all)")
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is reported apart")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the three runs, interleaved")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard (one Ray Data task each)")
    parser.add_argument("--data", help="keep the generated shards here and reuse them (default: a temp dir)")
    parser.add_argument("--only", choices=PIPELINES, action="append")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.repeats < 1:
        parser.error("--epochs must be at least 2 (the first is start-up) and --repeats at least 1")

    names = [name for name in PIPELINES if name in (args.only or PIPELINES)]
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in names}  # one dict per repetition
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(args.data or tmp), args.images, args.shard_size, args.cpus)
        images = load_images(shards)
        print(f"{len(images)} training images, {sum(map(len, images)) / len(images) / 1024:.0f} KiB average, "
              f"{args.cpus} cores, {args.crop}-px crops, batch {args.batch_size}, {args.epochs} epochs per run, "
              f"{args.repeats} repetitions", flush=True)  # fmt: skip
        runs = {
            # The floor has no batches and no start: one "epoch" is its images/s over one second.
            "floor": lambda: [(r, 1.0, 0.0, r) for r in decode_floor(images, args.crop, args.cpus, args.epochs)],
            "ray_data": lambda: ray_data(shards, args.crop, args.cpus, args.epochs, args.batch_size),
            "torch_dataloader": lambda: torch_dataloader(images, args.crop, args.cpus, args.epochs, args.batch_size),
        }
        for repetition in range(args.repeats):
            order = names[repetition % len(names) :] + names[: repetition % len(names)]
            for name in order:
                epochs = runs[name]()
                measured[name].append(_summary(epochs))
                line = "  ".join(f"{seen / seconds:7.0f}" for seen, seconds, _, _ in epochs)
                print(f"  {repetition + 1}/{args.repeats} {name:<17} {line} images/s per epoch", flush=True)
                if name != "floor":
                    starts = "  ".join(f"{first:7.2f}" for _, _, first, _ in epochs)
                    print(f"      {'':<17} {starts} s to the epoch's first batch", flush=True)

    def values(name: str, key: str) -> list[float]:
        return [m[key] for m in measured[name]]

    print("\n| pipeline | first epoch, images/s | steady state, images/s | streaming, images/s | epoch start, s | "
          "steady vs floor | steady vs DataLoader | streaming vs DataLoader |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        ratios = [_ratio(measured, name, base, key) for base, key in
                  (("floor", "steady"), ("torch_dataloader", "steady"), ("torch_dataloader", "streaming"))]  # fmt: skip
        start = _median_spread(values(name, "start"), digits=2) if name != "floor" else "-"
        print(f"| {name} | {_median_spread(values(name, 'first'))} | {_median_spread(values(name, 'steady'))} | "
              f"{_median_spread(values(name, 'streaming'))} | {start} | " + " | ".join(ratios) + " |")  # fmt: skip
    if "ray_data" in measured and "torch_dataloader" in measured:
        ahead = sum(
            r >= d for r, d in zip(values("ray_data", "steady"), values("torch_dataloader", "steady"), strict=True)
        )
        print(f"\nray_data's steady state at or above the DataLoader's in {ahead} of {args.repeats} repetitions")
    if args.json:
        results: dict = {name: float(np.median(values(name, "steady"))) for name in names}
        results.update({f"{name}_first_epoch": float(np.median(values(name, "first"))) for name in names})
        results.update({f"{name}_streaming": float(np.median(values(name, "streaming"))) for name in names})
        results["repetitions"] = measured
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _summary(epochs: list[Epoch]) -> dict[str, float]:
    """One run: its first epoch's rate; over the others, the mean rate (steady), the mid-epoch rate
    (streaming: what long epochs see) and the seconds to each one's first batch."""
    rest = epochs[1:]
    return {
        "first": epochs[0][0] / epochs[0][1],
        "steady": float(np.mean([seen / seconds for seen, seconds, _, _ in rest])),
        "streaming": float(np.mean([mid for _, _, _, mid in rest])),
        "start": float(np.mean([first for _, _, first, _ in rest])),
    }


def _median_spread(values: list[float], digits: int = 0, unit: str = "") -> str:
    """ "2,500 (2,410-2,560)": the median and the lowest and highest of the repetitions."""
    fmt = f",.{digits}f"
    low, high = min(values), max(values)
    spread = f" ({low:{fmt}}{unit}-{high:{fmt}}{unit})" if len(values) > 1 else ""
    return f"{float(np.median(values)):{fmt}}{unit}{spread}"


def _ratio(measured: dict[str, list[dict[str, float]]], name: str, base: str, key: str) -> str:
    """The ratio within each repetition, as median (lowest-highest)."""
    if base not in measured:
        return "-"
    ratios = [a[key] / b[key] for a, b in zip(measured[name], measured[base], strict=True)]
    return _median_spread(ratios, digits=2, unit="×")


if __name__ == "__main__":
    sys.exit(main())
