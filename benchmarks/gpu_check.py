"""Every CUDA path of the project, checked and measured on one GPU in a few minutes: `make gpu-check`.

    make gpu-check                                        # = python3 benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py --json /tmp/gpu-check.json --seconds 5

Runs on a bare GPU machine: a stock PyTorch image (torch, torchvision, numpy, pillow, pyarrow),
offline, without Ray or MLflow: neither this script nor the pipeline modules it uses import them.
Without a CUDA GPU it says so and exits 0 (`--device cpu` runs every part on the CPU instead, to
check the script itself).

Parts, each timed for --seconds after a warm-up, each checking its own result:
  train_step  pipeline.step.train_step (DeviceAugment + the project's AlexNet + fused SGD) on
              synthetic uint8 batches from pinned host memory: fp32 or bf16 autocast, channels_last
              on or off, torch.compile on or off. Checks: finite loss; one fp32 step on the device
              gives the CPU's loss and weights, and bf16's logits are near the CPU's.
  decode      the --decode-on train worker's code (pipeline.data.device.decode_crops): JPEGs of
              256-px squares made here, written as the project's Parquet shards and read back,
              decoded as a batch by nvJPEG, random crop and flip. Checks: the device decodes the
              batch itself (no CPU fallback), and its pixels match the CPU's decode of the same
              bytes with the same crops (libjpeg-turbo; the two decoders round differently).
  cpu_decode  the data path's decode + crop + flip of the same JPEGs, one process per CPU core:
              images/s per core, i.e. how many cores each GPU needs with --decode-on data.
  predict     a model actor's scoring (pipeline.step.predict) of uint8 crops as Ray Data hands
              them over, probabilities back on the host. Check: the CPU's probabilities.
Prints a table, the cores per GPU each --decode-on needs at the measured step rate, and writes
JSON (--json). Exits 1 if a check fails. --budget (default 480 s) skips what would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import decode_floor
from pipeline.data.device import DeviceAugment, decode_crops
from pipeline.data.sample import render
from pipeline.data.shards import SCHEMA
from pipeline.data.transforms import encode_jpeg, square_image
from pipeline.model import AlexNet, ImageClassifier
from pipeline.step import StepPlan, predict, train_step

# What "the same result" means between the device and the CPU (float32 on both unless it says bf16).
LOGITS_RTOL = 0.02  # of the largest |logit|: cuDNN's convolution algorithms (TF32 included) sum in other orders
BF16_RTOL = 0.1  # bf16 keeps 8 bits of mantissa
PROBS_ATOL = 2e-3
DECODE_MEAN_LEVELS = 2.0  # mean |difference| in 0-255 levels, nvJPEG vs libjpeg-turbo (torchvision's own test bound)
PARTS = ("cpu_decode", "decode", "predict", "train_step")  # in the order they run


class Check:
    """The parts' results: one row each, with what was checked and whether it held."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, part: str, variant: str, rate: float | None, ok: bool, detail: str, **extra: float) -> None:
        self.rows.append({"part": part, "variant": variant, "images_per_s": rate, "ok": ok, "check": detail, **extra})
        shown = f"{rate:,.0f} images/s" if rate is not None else "-"
        print(f"  {part:<10} {variant:<32} {shown:>18}  {'ok  ' if ok else 'FAIL'}  {detail}", flush=True)

    @property
    def ok(self) -> bool:
        return all(row["ok"] for row in self.rows)

    def rate(self, part: str, variant: str | None = None) -> float | None:
        rates = [
            r["images_per_s"] for r in self.rows if r["part"] == part and (variant is None or r["variant"] == variant)
        ]
        rates = [r for r in rates if r]
        return max(rates) if rates else None


def timed(step: Callable[[], int], seconds: float, device: torch.device, warmup: int = 3) -> float:
    """images/s of `step` (which returns the images it did), after `warmup` calls, over >= `seconds`."""
    for _ in range(warmup):
        step()
    _sync(device)
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        done += step()
    _sync(device)
    return done / (time.perf_counter() - started)


def check_train_step(args, device: torch.device, results: Check) -> None:
    """The training step's variants, timed; the device's fp32 step against the CPU's, and bf16's logits."""
    host = torch.randint(0, 256, (args.batch_size, args.crop, args.crop, 3), dtype=torch.uint8)
    host = host.pin_memory() if device.type == "cuda" else host
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    agree, detail = _one_step_agrees(args, device)
    results.add("train_step", "fp32 step = CPU's step", None, agree, detail)
    variants = [("fp32", False, False), ("fp32", True, False), ("bf16", False, False), ("bf16", True, False)]
    if args.compile:
        variants.append(("bf16", True, True))
    for precision, channels_last, compiled in variants:
        name = f"{precision}{' channels_last' if channels_last else ''}{' compile' if compiled else ''}"
        torch.manual_seed(0)
        net = AlexNet(args.classes, fc_width=args.fc_width).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        model = torch.compile(net) if compiled else net
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True)
        augment = DeviceAugment(device, 0.1, seed=0)
        if not channels_last:  # DeviceAugment's output is channels_last in memory: make it plain NCHW
            augment = _contiguous(augment)
        losses = []

        def step(model=model, optimizer=optimizer, augment=augment, precision=precision, losses=losses) -> int:
            loss, _ = train_step(model, optimizer, augment, host, labels, StepPlan(bf16=precision == "bf16"))
            losses.append(loss.detach())
            return args.batch_size

        started = time.perf_counter()
        rate = timed(step, args.seconds, device, warmup=3)
        finite = bool(torch.isfinite(torch.stack(losses[-20:])).all())
        detail = "loss finite" if finite else "loss not finite"
        if compiled:
            detail += f" (compile + warm-up + timing {time.perf_counter() - started:.0f} s)"
        if precision == "bf16" and not channels_last and not compiled:
            close, bf16_detail = _bf16_logits_agree(args, device)
            finite, detail = finite and close, f"{detail}; {bf16_detail}"
        results.add("train_step", name, rate, finite, detail)
        del model, net, optimizer
        _empty_cache(device)


def _one_step_agrees(args, device: torch.device) -> tuple[bool, str]:
    """One SGD step without dropout or colour noise, from the same weights and batch, on the device
    and on the CPU: the same loss, the same weights after it."""
    torch.manual_seed(1)
    cpu = AlexNet(args.classes, fc_width=args.fc_width, dropout=0.0)
    images = torch.randint(0, 256, (8, args.crop, args.crop, 3), dtype=torch.uint8)
    labels = torch.randint(0, args.classes, (8,))
    out = {}
    for where in (torch.device("cpu"), device):
        net = AlexNet(args.classes, fc_width=args.fc_width, dropout=0.0).to(where)
        net.load_state_dict(cpu.state_dict())
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
        loss, logits = train_step(
            net, optimizer, DeviceAugment(where, 0.0), images, labels.to(where), StepPlan(bf16=False)
        )
        out[where.type] = (loss.item(), logits.detach().cpu(), [p.detach().cpu() for p in net.parameters()])
    (loss_cpu, logits_cpu, weights_cpu), (loss_dev, logits_dev, weights_dev) = out["cpu"], out[device.type]
    logit_error = (logits_dev - logits_cpu).abs().max().item() / max(logits_cpu.abs().max().item(), 1e-6)
    weight_error = max(
        ((b - a).abs().max() / (a.abs().max() + 1e-6)).item() for a, b in zip(weights_cpu, weights_dev, strict=True)
    )
    ok = logit_error <= LOGITS_RTOL and weight_error <= LOGITS_RTOL and abs(loss_dev - loss_cpu) <= 1e-2 * abs(loss_cpu)
    return ok, f"loss {loss_dev:.5f} vs {loss_cpu:.5f}; logits {logit_error:.1e}, weights {weight_error:.1e} of max"


def _bf16_logits_agree(args, device: torch.device) -> tuple[bool, str]:
    torch.manual_seed(2)
    net = AlexNet(args.classes, fc_width=args.fc_width).eval()
    images = torch.randint(0, 256, (8, args.crop, args.crop, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = net(DeviceAugment(torch.device("cpu"), 0.0)(images, train=False))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got = net.to(device)(DeviceAugment(device, 0.0)(images.to(device), train=False)).float().cpu()
    error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-6)
    return error <= BF16_RTOL, f"bf16 logits {error:.1e} of max from CPU fp32"


def make_shards(root: Path, images: int, size: int) -> list[bytes]:
    """`images` JPEGs of size-px squares (the sample's scenes, photo-like noise), written as the
    project's Parquet shards (256 rows each) and read back: the bytes a train worker receives."""
    rng = np.random.default_rng(0)
    rows = {"image": [], "label": [], "wnid": [], "key": []}
    for n in range(images):
        scene, _ = render(n % 10, rng, n)
        pixels = np.asarray(square_image(scene, size), dtype=np.float32) + rng.normal(0, 10, (size, size, 3))
        rows["image"].append(encode_jpeg(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))))
        rows["label"].append(n % 10)
        rows["wnid"].append(f"n{n % 10:08d}")
        rows["key"].append(f"image_{n:05d}.JPEG")
    table = pa.Table.from_pydict(rows, schema=SCHEMA)
    for start in range(0, images, 256):
        pq.write_table(table.slice(start, 256), root / f"train-{start // 256:05d}.parquet")
    return [data for f in sorted(root.glob("*.parquet")) for data in pq.read_table(f)["image"].to_pylist()]


def check_decode(args, device: torch.device, jpegs: list[bytes], results: Check) -> None:
    """nvJPEG through decode_crops: timed over the shards' images; compared with the CPU's pixels."""
    from torchvision.io import ImageReadMode, decode_jpeg

    batch = jpegs[: args.batch_size]
    try:
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch]
        on_device = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        itself, why = all(image.device.type == device.type for image in on_device), f"{device.type} decoder"
    except RuntimeError as exc:  # decode_crops would fall back to the CPU: its rate would not be the device's
        itself, why = False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    results.add("decode", f"{device.type} decoder takes the batch", None, itself, why)
    got = decode_crops(batch, args.crop, device, np.random.default_rng(7)).cpu()
    expected = decode_crops(batch, args.crop, torch.device("cpu"), np.random.default_rng(7))
    difference = (got.int() - expected.int()).abs().float()
    mean, p99 = difference.mean().item(), torch.quantile(difference.flatten()[::97], 0.99).item()
    close = got.shape == expected.shape and mean <= DECODE_MEAN_LEVELS
    batches = [jpegs[i : i + args.batch_size] for i in range(0, len(jpegs) - args.batch_size + 1, args.batch_size)]
    rng, turn = np.random.default_rng(0), iter(range(1 << 62))

    def step() -> int:
        return len(decode_crops(batches[next(turn) % len(batches)], args.crop, device, rng))

    rate = timed(step, args.seconds, device, warmup=2)
    detail = f"vs CPU decode: mean |Δ| {mean:.2f} levels, 99th pct {p99:.0f}, max {difference.max().item():.0f}"
    results.add("decode", f"decode_crops {args.image_size}→{args.crop} crop+flip", rate, itself and close, detail)


def check_cpu_decode(args, jpegs: list[bytes], results: Check) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rates = decode_floor(jpegs, args.crop, cores, epochs=3)
    rate = float(np.median(rates[1:]))
    per_core = rate / cores
    results.add("cpu_decode", f"{cores} cores, data path", rate, rate > 0, f"{per_core:,.0f} images/s per core",
                per_core=per_core)  # fmt: skip


def check_predict(args, device: torch.device, results: Check) -> None:
    torch.manual_seed(3)
    net = AlexNet(args.classes, fc_width=args.fc_width)
    model = ImageClassifier(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    rng = np.random.default_rng(3)
    views = rng.integers(0, 256, (args.batch_size, 1, args.crop, args.crop, 3), dtype=np.uint8)
    expected = predict(model, views[:8], torch.device("cpu"))
    model = model.to(device)
    got = predict(model, views[:8], device).cpu()
    error = (got - expected).abs().max().item()
    rate = timed(lambda: len(predict(model, views, device).cpu()), args.seconds, device)
    results.add(
        "predict", "fp32 (what the model actor runs)", rate, error <= PROBS_ATOL, f"probabilities ±{error:.1e} of CPU's"
    )
    fast = model.to(memory_format=torch.channels_last)

    def bf16() -> int:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return len(predict(fast, views, device).cpu())

    rate = timed(bf16, args.seconds, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        error = (predict(fast, views[:8], device).cpu() - expected).abs().max().item()
    results.add(
        "predict",
        "bf16 channels_last (comparison)",
        rate,
        error <= 20 * PROBS_ATOL,
        f"probabilities ±{error:.1e} of CPU's",
    )


def advice(results: Check) -> list[str]:
    """Cores per GPU for each --decode-on, at the fastest measured training step."""
    step, gpu_decode = results.rate("train_step"), results.rate("decode")
    per_core = next((r.get("per_core") for r in results.rows if r["part"] == "cpu_decode"), None)
    lines = []
    if step and per_core:
        lines.append(f"--decode-on data: the step's {step:,.0f} images/s need ~{step / per_core:.1f} CPU cores of "
                     f"decoding per GPU ({per_core:,.0f} images/s per core here)")  # fmt: skip
    if step and gpu_decode:
        both = 1 / (1 / step + 1 / gpu_decode)
        lines.append(f"--decode-on train: the device decodes {gpu_decode:,.0f} images/s; step and decode in turn "
                     f"~{both:,.0f} images/s per GPU ({both / step:.0%} of the step alone), no decoding cores")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: check this script without a GPU"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="timing of each measurement, after its warm-up")
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds in all; parts that would not fit are skipped"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="per step, per decode, per scoring call")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--image-size", type=int, default=256, help="side of the stored squares")
    parser.add_argument("--images", type=int, default=512, help="JPEGs made for the decode parts (~20 ms each)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--fc-width", type=int, default=4096, help="fc6/fc7 width (4096: the paper's AlexNet)")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="also time torch.compile"
    )
    parser.add_argument("--only", action="append", choices=PARTS, help="run this part (repeatable); default: all")
    parser.add_argument("--json", default="gpu-check.json", help="where the results go (default: ./gpu-check.json)")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error(f"--images ({args.images}) must be at least --batch-size ({args.batch_size})")

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA GPU on this machine (torch {torch.__version__}, torch.cuda.is_available() is False): "
              "nothing to check. Run `make gpu-check` on a GPU node; `--device cpu` checks this script here.")  # fmt: skip
        return 0
    started = time.perf_counter()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    import torchvision

    print(f"{name}: torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPUs; batch {args.batch_size}, {args.crop}-px crops of {args.image_size}-px squares, "
          f"AlexNet fc {args.fc_width}, {args.classes} classes", flush=True)  # fmt: skip
    results = Check()
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = make_shards(Path(tmp), args.images, args.image_size)
    print(f"{len(jpegs)} JPEGs in shards, {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB average "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    # The CPU's decoding first: its worker processes fork before this process has a CUDA context.
    parts = [
        ("cpu_decode", lambda: check_cpu_decode(args, jpegs, results), 30),
        ("decode", lambda: check_decode(args, device, jpegs, results), 2 * args.seconds + 20),
        ("predict", lambda: check_predict(args, device, results), 2 * args.seconds + 20),
        ("train_step", lambda: check_train_step(args, device, results), 5 * args.seconds + 120),
    ]
    skipped = []
    for part, run, needs in parts:
        if args.only and part not in args.only:
            continue
        if time.perf_counter() - started + needs > args.budget:
            skipped.append(part)
            print(
                f"  {part:<10} skipped: it needs ~{needs:.0f} s and the budget (--budget {args.budget:.0f}) would not hold it"
            )
            continue
        run()
    lines = advice(results)
    elapsed = time.perf_counter() - started
    print("\n| part | variant | images/s | check |\n| --- | --- | --- | --- |")
    for row in results.rows:
        rate = f"{row['images_per_s']:,.0f}" if row["images_per_s"] else "-"
        print(f"| {row['part']} | {row['variant']} | {rate} | {'ok' if row['ok'] else 'FAILED'}: {row['check']} |")
    print(
        "\n" + "\n".join(lines) + f"\n{name}, {elapsed:.0f} s; {'every check held' if results.ok else 'A CHECK FAILED'}"
    )
    report = {
        "device": name, "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "cpus": os.cpu_count(), "settings": vars(args), "seconds": elapsed,
        "rows": results.rows, "advice": lines, "skipped": skipped, "ok": results.ok,
    }  # fmt: skip
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if results.ok else 1


def _contiguous(augment: DeviceAugment) -> Callable:
    return lambda images, train: augment(images, train).contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
