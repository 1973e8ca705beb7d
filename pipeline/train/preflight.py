"""Checks before any cluster work, on the driver: the data and crop, the local GPUs, the plan against
the cluster's resources, and whether the train workers can reach local paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeline.cluster.resources import ClusterState, Plan, refusal
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


def check_local_gpus(cfg: TrainConfig) -> None:
    """A local Ray has only this machine's GPUs: --gpu without enough of them would wait forever."""
    if cfg.gpu and torch.cuda.device_count() < cfg.workers:
        raise ConfigError(
            f"--gpu asks for {cfg.workers} GPU(s) but this machine has {torch.cuda.device_count()}; "
            "drop --gpu, lower --workers, or set RAY_ADDRESS to a cluster with GPU nodes"
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
