"""Where an AlexNet training step goes on a small CPU machine: one 2-thread process vs two DDP ranks.

    python benchmarks/ddp_cpu.py [--batch 128] [--crop 64] [--classes 10] [--steps 6]

Runs the same global batch (synthetic data, no pipeline) three ways and prints images/s with the
ratio to the first: one process with all cores; two gloo DDP ranks with one thread each; and the
parts of a step that DDP adds or repeats (the 230 MB gradient all-reduce; the optimizer step that
every rank repeats, for-loop vs fused SGD).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import AlexNet


def _steps(model, optimizer, batch, crop, classes, steps) -> float:
    x, y = torch.randn(batch, 3, crop, crop), torch.randint(0, classes, (batch,))
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            started = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)


def _ddp_rank(rank, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(AlexNet(args.classes))
    seconds = _steps(model, _sgd(model.parameters()), args.batch // 2, args.crop, args.classes, args.steps)
    grads = torch.randn(sum(p.numel() for p in model.parameters()))
    started = time.perf_counter()
    dist.all_reduce(grads)
    if rank == 0:
        out.put((seconds, time.perf_counter() - started))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    torch.set_num_threads(cores)
    torch.manual_seed(0)
    model = AlexNet(args.classes)
    single = _steps(model, _sgd(model.parameters()), args.batch, args.crop, args.classes, args.steps)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.spawn(_ddp_rank, args=(port, args, out), nprocs=2)
    ddp, all_reduce = out.get()

    torch.set_num_threads(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer_ms = {}
    for name, kwargs in (("for-loop", {}), ("fused", {"fused": True})):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, **kwargs)
        optimizer.step()
        started = time.perf_counter()
        for _ in range(3):
            optimizer.step()
        optimizer_ms[name] = (time.perf_counter() - started) / 3 * 1000

    rate = lambda seconds: args.batch / seconds  # noqa: E731
    print(f"AlexNet, {args.classes} classes, {args.crop}px crops, global batch {args.batch}, {cores} cores")
    print(f"{'setup':<36}{'step ms':>9}{'img/s':>9}{'ratio':>7}")
    print(f"{f'1 process x {cores} threads':<36}{single * 1000:>9.0f}{rate(single):>9.0f}{1:>7.2f}")
    print(f"{'2 DDP ranks x 1 thread (gloo)':<36}{ddp * 1000:>9.0f}{rate(ddp):>9.0f}{single / ddp:>7.2f}")
    print(f"all-reduce of the gradients: {all_reduce * 1000:.0f} ms per step")
    loop_ms, fused_ms = optimizer_ms["for-loop"], optimizer_ms["fused"]
    print(f"optimizer step, 1 thread: for-loop SGD {loop_ms:.0f} ms, fused SGD {fused_ms:.0f} ms")


if __name__ == "__main__":
    main()
