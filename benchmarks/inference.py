"""Batch inference throughput: jobs/infer.py's pipeline vs a plain single-process PyTorch loop.

    python benchmarks/inference.py                                   # 4,000 and 20,000 images, 3 times each
    python benchmarks/inference.py --images 2000 --repeats 1 --listing 0 --json out.json

Both read the same ImageNet-sized JPEGs (330-420 px short side) from local disk, preprocess them
the same way (short side to the model's image size, centre square, centre crop) and run the same
registered model with softmax + top-5, on the same number of CPU cores: the loop with
torch.set_num_threads(cpus) and batches of --batch-size; the job in a local Ray of `cpus` CPUs
(listing, decode + `--replicas` model actors, Parquet files committed to Ray Data's checkpoint,
the rows counted against the listing). Ray itself is started once, before the runs.

The job runs over half and all of the images: end to end is all / its seconds, steady state the
rate between the two runs, the fixed cost what is left; the break-even point is the number of
images from which the job beats the loop end to end. Each size is repeated --repeats times (the
loop too); the median and the spread (min-max) are reported. Larger sizes reuse the smallest
size's files (hard links under other names): decoding costs the same.

--listing N: the driver's peak memory while it lists N files (empty, in 100 folders) with the
streamed listing the job uses, against holding every name as the job did before: the peak of the
Python allocations the listing makes (tracemalloc), each in a fresh process.
The model comes from MLFLOW_TRACKING_URI (else ./mlflow.db): run `make train` first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import make_source, spread
from pipeline.cluster.resources import GpuCapacity
from pipeline.data.transforms import center_crop, is_image_name, load_square
from pipeline.scoring import files, inference, loading, pool
from pipeline.storage import locate
from pipeline.tracking import mlflow_client


def plain_loop(ref: loading.ModelRef, paths: list[Path], cpus: int, batch_size: int) -> float:
    """images/s of read → preprocess → forward → softmax/top-5, in one process using `cpus` threads."""
    torch.set_num_threads(cpus)
    model = loading.load(ref)
    started = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch = np.stack(
            [
                center_crop(np.asarray(load_square(p.read_bytes(), ref.image_size)), ref.crop)
                for p in paths[i : i + batch_size]
            ]
        )
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(batch)).float(), dim=1)
            probs.topk(min(5, probs.shape[1]), dim=1)
    return len(paths) / (time.perf_counter() - started)


def job(ref: loading.ModelRef, source: Path, output: Path, options: inference.InferenceOptions) -> float:
    """Seconds for the whole job over `source`: listing, scoring, Parquet, the rows counted."""
    started = time.perf_counter()
    plan = inference.prepare_output(ref, locate(source), locate(output), options, log=lambda _: None)
    inference.infer(ref, locate(source), plan, options, log=lambda _: None)
    return time.perf_counter() - started


def inputs(root: Path, images: int, base: list[Path]) -> Path:
    """A folder of `images` files: the base files, linked again under other names as often as needed."""
    folder = root / f"in-{images}"
    for i in range(images):
        target = folder / f"{i // 1000:03d}" / f"{i:07d}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(base[i % len(base)], target)
    return folder


def halve(folder: Path) -> Path:
    """A folder of the first half of `folder`'s files (linked)."""
    half = folder.parent / f"{folder.name}-half"
    paths = sorted(folder.rglob("*.JPEG"))
    for p in paths[: len(paths) // 2]:
        (half / p.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(p, half / p.parent.name / p.name)
    return half


def measure(ref, tmp: Path, folder: Path, half: Path, args, actors: pool.Pool) -> dict[str, float]:
    paths = sorted(folder.rglob("*.JPEG"))
    options = inference.InferenceOptions(pool=actors, batch_size=args.batch_size)
    loop = plain_loop(ref, paths, args.cpus, args.batch_size)
    tag = time.monotonic_ns()
    t_half = job(ref, half, tmp / f"out-half-{tag}", options)
    t_all = job(ref, folder, tmp / f"out-all-{tag}", options)
    n_half, n_all = len(paths) // 2, len(paths)
    steady = (n_all - n_half) / (t_all - t_half)
    fixed = t_all - n_all / steady
    return {
        "loop": loop,
        "end_to_end": n_all / t_all,
        "steady": steady,
        "fixed_s": fixed,
        "ratio_end_to_end": n_all / t_all / loop,
        "ratio_steady": steady / loop,
        "break_even": fixed * loop * steady / (steady - loop) if steady > loop else float("inf"),
    }


def listing_probe(method: str, folder: str) -> None:
    """In a fresh process: list `folder` as `method` does, print the peak of Python's allocations as JSON."""
    tracemalloc.start()
    source = locate(folder)
    if method == "held":  # every name in the driver, as the job listed before
        names, _ = source.walk()
        images = [n for n in names if is_image_name(n)]
        count = len(images)
    else:
        with tempfile.TemporaryDirectory() as out:
            count = files.write_listing(source, locate(out)).images
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"files": count, "python_peak_mib": peak / 2**20}))


def listing_memory(count: int, tmp: Path) -> dict[str, dict]:
    folder = tmp / "listing"
    for i in range(count):
        sub = folder / f"{i % 100:03d}"
        if i < 100:
            sub.mkdir(parents=True)
        (sub / f"n{i:08d}_some_long_camera_name_{i % 7}.JPEG").touch()
    results = {}
    for method in ("held", "streamed"):
        proc = subprocess.run(
            [sys.executable, __file__, "--listing-probe", method, str(folder)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/alexnet@champion")
    parser.add_argument("--images", type=int, nargs="+", default=[4000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--replicas", default="auto", help="model actors: N, MIN:MAX or auto (1 up to --cpus)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--listing", type=int, default=100_000, help="files for the listing's memory (0: skip)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--listing-probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.listing_probe:
        listing_probe(*args.listing_probe)
        return 0

    import ray

    uri = mlflow_client.resolve_tracking_uri()
    ref = loading.resolve(args.model, uri)
    results: dict[str, object] = {"cpus": args.cpus, "model": args.model}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if args.listing:
            results["listing"] = memory = listing_memory(args.listing, tmp)
            for method, m in memory.items():
                print(f"listing {m['files']:,} files, names {method}: peak {m['python_peak_mib']:.1f} MiB", flush=True)
        make_source(tmp / "src", min(args.images))
        base = sorted((tmp / "src").rglob("*.JPEG"))
        print(
            f"{len(base)} JPEGs (larger sizes link them again); model {args.model} ({ref.image_size}-px squares, "
            f"{ref.crop}-px crops); {args.cpus} CPUs; {args.repeats} repetitions",
            flush=True,
        )
        ray.init(num_cpus=args.cpus, runtime_env={"env_vars": mlflow_client.worker_env(uri)})
        try:
            actors = pool.plan(args.replicas, 0.0, GpuCapacity(0.0), ray.cluster_resources()["CPU"], whole=True)
            for images in args.images:
                folder = inputs(tmp, images, base)
                half = halve(folder)
                runs = [measure(ref, tmp, folder, half, args, actors) for _ in range(args.repeats)]
                results[str(images)] = runs
                column = {k: [r[k] for r in runs] for k in runs[0]}
                print(
                    f"\n{images:,} images, {actors.describe()}, median (min-max) of {args.repeats}:\n"
                    f"  plain loop        {spread(column['loop'], ',.0f')} images/s\n"
                    f"  job end to end    {spread(column['end_to_end'], ',.0f')} images/s "
                    f"= {spread(column['ratio_end_to_end'], '.2f')}x the loop\n"
                    f"  job steady state  {spread(column['steady'], ',.0f')} images/s "
                    f"= {spread(column['ratio_steady'], '.2f')}x the loop\n"
                    f"  fixed cost        {spread(column['fixed_s'], '.1f')} s; "
                    f"break-even {spread(column['break_even'], ',.0f')} images",
                    flush=True,
                )
        finally:
            ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
