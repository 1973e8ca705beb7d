"""Batch inference throughput: jobs/infer.py's pipeline vs a plain single-process PyTorch loop.

    python benchmarks/inference.py --images 2000 --cpus 2                  # models:/alexnet@champion
    python benchmarks/inference.py --model models:/alexnet/3 --images 5000 --cpus 8 --replicas 2 --json out.json

Both read the same ImageNet-sized JPEGs (330-420 px short side) from local disk, preprocess them
the same way (short side to the model's image size, centre square, centre crop) and run the same
registered model with softmax + top-5, on the same number of CPU cores: the loop with
torch.set_num_threads(cpus) and batches of --batch-size; the job in a local Ray of `cpus` CPUs
(decode tasks + `--replicas` model actors), writing its Parquet table. The model comes from
MLFLOW_TRACKING_URI (else ./mlflow.db): run `make train` first.
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

from benchmarks.common import make_source
from pipeline.cluster.resources import GpuCapacity
from pipeline.data.transforms import center_crop, load_square
from pipeline.scoring import inference, loading, pool
from pipeline.storage import locate
from pipeline.tracking import mlflow_client


def plain_loop(ref: loading.ModelRef, files: list[Path], cpus: int, batch_size: int) -> float:
    """images/s of read → preprocess → forward → softmax/top-5, in one process using `cpus` threads."""
    torch.set_num_threads(cpus)
    model = loading.load(ref)
    started = time.perf_counter()
    for i in range(0, len(files), batch_size):
        batch = np.stack(
            [
                center_crop(np.asarray(load_square(p.read_bytes(), ref.image_size)), ref.crop)
                for p in files[i : i + batch_size]
            ]
        )
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(batch)).float(), dim=1)
            probs.topk(min(5, probs.shape[1]), dim=1)
    return len(files) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/alexnet@champion")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--replicas", default="auto", help="model actors: N, MIN:MAX or auto (1 up to --cpus)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import ray

    uri = mlflow_client.resolve_tracking_uri()
    ref = loading.resolve(args.model, uri)
    with tempfile.TemporaryDirectory() as tmp:
        make_source(Path(tmp, "src"), args.images)
        files = sorted(Path(tmp, "src").rglob("*.JPEG"))
        print(
            f"{len(files)} JPEGs; model {args.model} ({ref.image_size}-px squares, {ref.crop}-px crops); {args.cpus} CPUs"
        )

        loop = plain_loop(ref, files, args.cpus, args.batch_size)
        print(f"plain PyTorch loop, 1 process x {args.cpus} threads: {loop:,.0f} images/s", flush=True)

        ray.init(num_cpus=args.cpus, runtime_env={"env_vars": mlflow_client.worker_env(uri)})
        try:
            source = locate(Path(tmp, "src"))
            listing = inference.list_images(source)
            actors = pool.plan(args.replicas, 0.0, GpuCapacity(0.0), ray.cluster_resources()["CPU"])
            runs = {}
            for label, images in (("half", listing.images[: len(files) // 2]), ("all", listing.images)):
                options = inference.InferenceOptions(pool=actors, batch_size=args.batch_size)
                runs[label] = inference.infer(
                    ref, source, inference.Listing(images), locate(Path(tmp, f"out-{label}")), options
                )
        finally:
            ray.shutdown()
    job = runs["all"].images_per_s
    steady = (runs["all"].images - runs["half"].images) / (runs["all"].seconds - runs["half"].seconds)
    fixed = runs["all"].seconds - runs["all"].images / steady
    print(
        f"jobs/infer.py pipeline, {actors.smallest}-{actors.largest} model actor(s):\n"
        f"  end to end   {job:,.0f} images/s ({runs['all'].seconds:.1f}s for {runs['all'].images} images, "
        "including Ray Data start-up, model loading and the Parquet write)\n"
        f"  steady state {steady:,.0f} images/s (from runs over half and all the images; fixed cost {fixed:.1f}s)\n"
        f"ratio job / loop: {job / loop:.2f} end to end, {steady / loop:.2f} steady state"
    )
    if args.json:
        results = {"plain_loop": loop, "ray_job": job, "ray_job_steady": steady, "images": len(files)}
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
