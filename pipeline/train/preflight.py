"""Checks before any cluster work, on the driver: the data and crop, the local GPUs, the plan against
the cluster's resources, and whether the train workers can reach local paths."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from pipeline.cluster.resources import ClusterState, GpuCapacity, Plan, refusal
from pipeline.config import ConfigError, TrainConfig
from pipeline.data.shards import PreparedDataset, open_dataset
from pipeline.storage import locate


def check_reachable(cfg: TrainConfig, data_uri: str, nodes: list[dict[str, Any]], driver_node: str) -> None:
    """Local paths only where every train worker can reach them: one node that trains, or --shared-storage.

    `nodes` is ray.nodes(); `driver_node` the node this driver runs on. A head that keeps no CPUs
    (the cluster definitions' layout) runs no train worker: its disk is unreachable to them even
    before the autoscaler has added a node.
    """
    local = [(flag, uri) for flag, uri in (("--storage-path", cfg.storage_path), ("--data", data_uri))
             if locate(uri).is_local]  # fmt: skip
    if cfg.shared_storage or not local:
        return
    alive = [node for node in nodes if node.get("Alive")]
    here = next((node for node in alive if node["NodeID"] == driver_node), {})
    if len(alive) == 1 and here.get("Resources", {}).get("CPU", 0) > 0:
        return
    where = f"{len(alive)} nodes" if len(alive) > 1 else "a head node that runs no train workers"
    flag, uri = local[0]
    raise ConfigError(
        f"{flag} {locate(uri).uri} is a local path, and this Ray cluster has {where}: the train workers on other "
        "nodes cannot read or write it (checkpoints would fail at the first save). Use s3://bucket/prefix, or a "
        "filesystem every node mounts at the same path and pass --shared-storage"
    )


def check_resources(cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
    """On a cluster with no autoscaler, refuse a plan that can never run (pipeline.cluster.resources)."""
    if cfg.skip_resource_check:
        return
    try:
        state = ClusterState.read()
    except Exception as exc:  # noqa: BLE001 -- Ray's GCS calls changed or failed: the watchdog still reports
        log(f"could not read the cluster's resources ({type(exc).__name__}: {exc}); starting without the check")
        return
    problem = refusal(Plan.of(cfg), state)
    if problem:
        raise ConfigError(problem)


IMAGENET_SIZED = 100_000  # training images from which an epoch on CPUs takes hours


def choose_gpus(
    cfg: TrainConfig, capacity: GpuCapacity, train_images: int, log: Callable[[str], None] = print
) -> TrainConfig:
    """--gpu unset: one GPU per train worker where the cluster has GPUs or its autoscaler can add
    them, else CPUs. Says which and why; an ImageNet-sized run about to train on CPUs, loudly."""
    if cfg.gpu is None:
        cfg = dataclasses.replace(cfg, gpu=capacity.any)
        why = f"{capacity.describe()}; --gpu or --no-gpu decides"
    else:
        why = "--gpu" if cfg.gpu else "--no-gpu"
    log(f"devices: {'one GPU per train worker' if cfg.gpu else 'CPUs, no GPU'} ({why})")
    if not cfg.gpu and train_images >= IMAGENET_SIZED:
        log(
            f"WARNING: {train_images:,} training images on CPUs: expect hours per epoch (the first epoch's line "
            "gives the ETA). On a cluster with GPU nodes, train with --gpu"
        )
    return cfg


def check_local_gpus(cfg: TrainConfig) -> None:
    """A local Ray has only this machine's GPUs: one per train worker without enough of them would
    wait forever."""
    if cfg.gpu and torch.cuda.device_count() < cfg.workers:
        raise ConfigError(
            f"one GPU per train worker needs {cfg.workers} GPU(s) but this machine has {torch.cuda.device_count()}; "
            "pass --no-gpu to train on CPUs, lower --workers, or set RAY_ADDRESS to a cluster with GPU nodes"
        )


def load_data(cfg: TrainConfig) -> PreparedDataset | None:
    """The prepared dataset named by cfg.data, fully checked; None for the sample (built later)."""
    if not cfg.data:
        return None
    return check_crop(cfg, open_dataset(cfg.data))


def check_crop(cfg: TrainConfig, data: PreparedDataset) -> PreparedDataset:
    if cfg.crop > data.image_size:
        raise ConfigError(
            f"crop {cfg.crop} is larger than the {data.image_size}-pixel images in {data.uri}; "
            f"pass --crop {min(data.image_size, 224)} or prepare shards with --size >= {cfg.crop}"
        )
    return data
