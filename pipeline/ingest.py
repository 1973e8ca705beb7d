"""The Ray Data pipelines that feed the train workers.

    train: read shards (file order reshuffled every epoch) → decode, random crop, flip,
           row shuffle (CPU workers) → uint8 NHWC batches → streaming_split, one per worker
    val:   read shards → decode, centre crop (CPU workers) → uint8 NHWC batches

Each shard is one read task fused with its decode (``batch_size=None``: the transform takes the
block the read produced): raw JPEG bytes never travel through the object store, only the crops.

Float conversion, colour augmentation and normalisation happen on the train worker's device
(pipeline.data.device); the wire carries uint8.
"""

from __future__ import annotations

import copy

from ray.data import DataIterator, Dataset, FileShuffleConfig
from ray.train import DataConfig

from pipeline.data.shards import read_shards
from pipeline.data.transforms import eval_batch, train_batch
from pipeline.storage import Location

PREFETCH_BATCHES = 2  # batches the train worker's iterator keeps ready ahead of the step


def train_dataset(shard_dir: str | Location, crop: int, seed: int) -> Dataset:
    # A different file order every epoch (seed + epoch), reproducible for a given seed.
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True)
    return read_shards(shard_dir, shuffle=shuffle).map_batches(
        train_batch, fn_kwargs={"crop": crop, "seed": seed}, batch_size=None, batch_format="numpy"
    )


def eval_dataset(shard_dir: str | Location, crop: int) -> Dataset:
    return read_shards(shard_dir).map_batches(
        eval_batch, fn_kwargs={"crop": crop}, batch_size=None, batch_format="numpy"
    )


def torch_batches(shard: DataIterator, batch_size: int, pin_memory: bool = False, drop_last: bool = False):
    """How a train worker takes its batches: uint8 NHWC images and int64 labels as torch tensors."""
    return shard.iter_torch_batches(
        batch_size=batch_size, drop_last=drop_last, prefetch_batches=PREFETCH_BATCHES, pin_memory=pin_memory
    )


class IngestConfig(DataConfig):
    """Ray Train's DataConfig with the project's execution options, and exact evaluation splits.

    Blocks reach the workers in file order (``preserve_order``): with seeded crops, runs repeat
    exactly. Ray Data's budget is what the cluster has beyond the train workers' reservation (Ray
    Train excludes it); ``cpu_limit`` caps it further, e.g. to leave CPUs to other jobs.

    DataConfig splits every dataset with ``equal=True``, which drops up to world_size - 1 rows
    so that DDP ranks take the same number of steps. Training needs that; evaluation does not
    (no gradient sync), and dropping validation images would make the error rates inexact.
    """

    def __init__(self, exact: tuple[str, ...] = ("val",), cpu_limit: float = 0.0) -> None:
        options = DataConfig.default_ingest_options()
        options.preserve_order = True
        if cpu_limit:
            options.resource_limits = options.resource_limits.copy(cpu=cpu_limit)
        super().__init__(execution_options=options)
        self.options = options
        self.exact = exact

    def configure(
        self, datasets, world_size, worker_handles, worker_node_ids, **kwargs
    ) -> list[dict[str, DataIterator]]:
        exact = {name: ds for name, ds in datasets.items() if name in self.exact}
        rest = {name: ds for name, ds in datasets.items() if name not in self.exact}
        output = (
            super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if rest
            else [{} for _ in range(world_size)]
        )
        for name, ds in exact.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = copy.deepcopy(self.options)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                output[rank][name] = split
        return output
