"""How fast does AlexNet train here, with data that costs nothing vs fed by the pipeline? How many cores per GPU?

    python benchmarks/train_step.py                       # CPU: the sample (72-px shards, 64-px crops)
    python benchmarks/train_step.py --crop 224 --data /data/imagenet-shards   # on a GPU node: bf16, channels_last
    python benchmarks/train_step.py --json /tmp/train_step.json

  synthetic   the project's training step (pipeline.step.train_step: uint8 NHWC batch to
              the device, PCA lighting and normalisation there, forward, backward, fused SGD;
              bf16 autocast and channels_last on CUDA) on random uint8 batches already in memory:
              what the model costs alone
  pipeline    jobs/train.py's training itself (Ray Data → Ray Train worker, the same step) on
              --data for --epochs, without MLflow: images/s and data_wait_fraction per epoch, the
              first epoch apart
  per core    decode + random crop + flip of the shards' JPEGs in one process (benchmarks/common.py's decode_floor)

and the CPU cores per accelerator the pipeline needs at these rates:
  cores per GPU = synthetic images/s ÷ per-core images/s
On a CPU the model and the decoding share the same cores, so `pipeline` is below `synthetic` even
with no data wait.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import decode_floor, load_images
from pipeline import config
from pipeline.data.device import DeviceAugment
from pipeline.model import AlexNet
from pipeline.step import train_step


def synthetic(crop: int, batch_size: int, steps: int, device: torch.device, threads: int) -> float:
    """images/s of the training step on random batches that are already in memory."""
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    model = AlexNet(10).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
    augment = DeviceAugment(device, 0.1, seed=0)
    images = torch.randint(0, 256, (batch_size, crop, crop, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    for _ in range(3):  # warm-up: allocator, cuDNN autotuning, first-call overheads
        train_step(model, optimizer, augment, images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, augment, images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def pipeline(data: str, crop: int, batch_size: int, epochs: int, cpus: int, gpu: bool) -> list[dict]:
    """Per-epoch metrics of a real training run (the project's driver, one worker, no MLflow)."""
    import ray

    from pipeline.train import driver

    with tempfile.TemporaryDirectory() as storage:
        cfg = config.resolve(
            "sample", data=data, crop=crop, batch_size=batch_size, epochs=epochs, workers=1, gpu=gpu,
            cpus_per_worker=float(cpus), tracking=False, storage_path=storage, name="bench", keep_checkpoints=epochs,
        )  # fmt: skip
        try:
            driver.train(cfg, log=lambda line: None)
        finally:
            ray.shutdown()
        metas = sorted(Path(storage, "bench").glob("checkpoint_*/meta.json"))
        epochs_seen = [json.loads(m.read_text())["epoch_metrics"] for m in metas]
    return sorted(epochs_seen, key=lambda m: m["epoch"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/sample/shards", help="prepared shards (default: the sample's)")
    parser.add_argument("--crop", type=int, default=None, help="default: 64 on CPU (the sample), 224 on CUDA")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed synthetic steps")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the pipeline-fed run")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores (train worker threads on CPU)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    crop = args.crop or (224 if cuda else 64)
    if not Path(args.data, "manifest.json").is_file():
        parser.error(f"no prepared shards in {args.data}: run `make train` once (the sample), or pass --data")
    name = torch.cuda.get_device_name() if cuda else f"CPU, {args.cpus} cores"
    print(f"{name}; AlexNet, {crop}-px crops, batch {args.batch_size}; shards {args.data}", flush=True)

    results: dict[str, float | str] = {"device": name, "crop": crop, "batch_size": args.batch_size}
    results["synthetic"] = synthetic(crop, args.batch_size, args.steps, device, args.cpus)
    print(f"  synthetic           {results['synthetic']:8.0f} images/s", flush=True)

    per_epoch = pipeline(args.data, crop, args.batch_size, args.epochs, args.cpus, cuda)
    steady = per_epoch[1:] or per_epoch
    results["pipeline_first_epoch"] = per_epoch[0]["images_per_s"]
    results["pipeline"] = float(np.mean([m["images_per_s"] for m in steady]))
    results["data_wait_fraction"] = float(np.mean([m["data_wait_fraction"] for m in steady]))
    for m in per_epoch:
        print(
            f"  pipeline, epoch {m['epoch']}   {m['images_per_s']:8.0f} images/s, data wait {m['data_wait_fraction']:.1%}"
        )

    images = load_images(Path(args.data))
    results["per_core"] = float(np.mean(decode_floor(images[:2000], crop, 1, 2)[1:]))
    print(f"  per core            {results['per_core']:8.0f} images/s (decode + crop + flip, one process)")
    results["cores_per_accelerator"] = results["synthetic"] / results["per_core"]

    print(f"\n| {name} | images/s |\n| --- | --- |")
    print(f"| synthetic (model only) | {results['synthetic']:.0f} |")
    print(f"| fed by the pipeline, first epoch | {results['pipeline_first_epoch']:.0f} |")
    print(
        f"| fed by the pipeline, steady | {results['pipeline']:.0f} (data wait {results['data_wait_fraction']:.1%}) |"
    )
    print(f"| pipeline ÷ synthetic | {results['pipeline'] / results['synthetic']:.2f}× |")
    print(f"| one core's decode + crop + flip | {results['per_core']:.0f} |")
    what = "GPU" if cuda else "device running at the synthetic rate"
    print(f"\ncores per {what} to keep it fed: {results['cores_per_accelerator']:.2f} "
          f"(= {results['synthetic']:.0f} ÷ {results['per_core']:.0f})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
