"""Is the training pipeline as fast as the hardware? Three ways to feed the same shards, same cores.

    python benchmarks/ingest.py                          # 4,000 images, 224-px crops, all cores, 4 epochs
    python benchmarks/ingest.py --images 6000 --cpus 2 --epochs 4 --json /tmp/ingest.json

Shards of 256×256 JPEGs prepared by the project's own prepare job from natural-looking photos
(the sample's generator at ImageNet's photo size, ~375 px, with sensor noise), then, on --cpus cores:
  floor             decode + random 224 crop + flip in a tight loop, one process per core, the
                    JPEG bytes already in memory: what the cores can do at all
  ray_data          the project's training pipeline (pipeline.ingest: read shards, decode, crop,
                    flip, shuffle rows; Ray Data on a local Ray with --cpus CPUs) delivering uint8
                    batches of --batch-size to a Ray Train worker through iter_torch_batches; the
                    consumer only touches each batch
  torch_dataloader  a torch DataLoader over the same shards (rows in memory, shuffled), torchvision's
                    RandomCrop + RandomHorizontalFlip + PILToTensor, num_workers = --cpus,
                    persistent workers, the same batch size
Several epochs each; the first is reported apart (start-up, warm-up), steady state is the mean
of the others. `--json PATH` writes floor, ray_data and torch_dataloader (steady images/s) and
their *_first_epoch figures.
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


def make_shards(out: Path, images: int, shard_size: int, cpus: int) -> Path:
    """Prepared shards (256-px squares) of `images` natural-looking photos, made once per --data dir."""
    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    import ray

    from pipeline.prepare import prepare

    print(f"generating {images} ImageNet-sized photos and preparing them as 256-px shards ...", flush=True)
    make_source(out / "raw", images)
    ray.init(num_cpus=cpus, include_dashboard=False)
    try:
        prepare(out / "raw", shards, size=256, shard_size=shard_size)
    finally:
        ray.shutdown()
    return shards


# --- (a) the floor ------------------------------------------------------------------------------

# --- (b) the project's Ray Data pipeline into a Ray Train worker --------------------------------


def _consume(config: dict) -> list[tuple[int, float]]:
    import ray.train

    from pipeline import ingest

    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for _ in range(config["epochs"]):
        started, seen = time.perf_counter(), 0
        for batch in ingest.torch_batches(shard, config["batch_size"], drop_last=True):
            images = batch["image"]
            seen += int(images.shape[0])
            images[0, 0, 0, 0].item()  # touch it
        epochs.append((seen, time.perf_counter() - started))
    return epochs


def ray_data(shards: Path, crop: int, cpus: int, epochs: int, batch_size: int) -> list[float]:
    import ray
    from ray.data import DataContext
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import ingest

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
    return [seen / seconds for seen, seconds in result.return_value]


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


def torch_dataloader(images: list[bytes], crop: int, cpus: int, epochs: int, batch_size: int) -> list[float]:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    loader = DataLoader(
        _ShardRows(images, crop), batch_size=batch_size, shuffle=True, num_workers=cpus, persistent_workers=True,
        drop_last=True,
    )  # fmt: skip
    rates = []
    for _ in range(epochs):
        started, seen = time.perf_counter(), 0
        for batch, _labels in loader:
            seen += int(batch.shape[0])
            batch[0, 0, 0, 0].item()
        rates.append(seen / (time.perf_counter() - started))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="photos generated (about 91%% become train)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores for each of the three (default: all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard (one Ray Data task each)")
    parser.add_argument("--data", help="keep the generated shards here and reuse them (default: a temp dir)")
    parser.add_argument("--only", choices=("floor", "ray_data", "torch_dataloader"), action="append")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(args.data or tmp), args.images, args.shard_size, args.cpus)
        images = load_images(shards)
        print(f"{len(images)} training images, {sum(map(len, images)) / len(images) / 1024:.0f} KiB average, "
              f"{args.cpus} cores, {args.crop}-px crops, batch {args.batch_size}, {args.epochs} epochs", flush=True)  # fmt: skip
        runs = {
            "floor": lambda: decode_floor(images, args.crop, args.cpus, args.epochs),
            "ray_data": lambda: ray_data(shards, args.crop, args.cpus, args.epochs, args.batch_size),
            "torch_dataloader": lambda: torch_dataloader(images, args.crop, args.cpus, args.epochs, args.batch_size),
        }
        results: dict[str, float] = {}
        for name in args.only or list(runs):
            rates = runs[name]()
            results[name] = float(np.mean(rates[1:])) if len(rates) > 1 else rates[0]
            results[f"{name}_first_epoch"] = rates[0]
            print(f"  {name:<17} " + "  ".join(f"{r:7.0f}" for r in rates) + " images/s per epoch", flush=True)

    print("\n| pipeline | first epoch, images/s | steady state, images/s | vs floor | vs DataLoader |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("floor", "ray_data", "torch_dataloader"):
        if name in results:
            vs_floor = f"{results[name] / results['floor']:.2f}×" if "floor" in results else "-"
            vs_dl = f"{results[name] / results['torch_dataloader']:.2f}×" if "torch_dataloader" in results else "-"
            print(f"| {name} | {results[name + '_first_epoch']:.0f} | {results[name]:.0f} | {vs_floor} | {vs_dl} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
