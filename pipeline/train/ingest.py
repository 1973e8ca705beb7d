"""The Ray Data pipelines that feed the train workers, and how a worker takes its batches.

    --decode-on data (default):
    train: read shards (file order reshuffled every epoch) → decode, random crop, flip,
           row shuffle (CPU workers) → uint8 NHWC batches → streaming_split, one per worker
    val:   read shards → decode, centre crop (CPU workers) → uint8 NHWC batches

    --decode-on train:
    train: read shards (file order reshuffled every epoch) → row shuffle → JPEG bytes → split;
           the train worker decodes each batch on its device (nvJPEG on a GPU), crops and flips
    val:   read shards → JPEG bytes; the train worker decodes and takes the centre crop

Each shard is one read task fused with its transform (``batch_size=None``: the transform takes the
block the read produced). With the decode on the data side, raw JPEG bytes never travel through
the object store, only the crops; with it on the train side, only the bytes (about a seventh of the
crops' size at 224 px) travel, and the CPU nodes do no decoding at all.

Float conversion, colour augmentation and normalisation happen on the train worker's device
(pipeline.data.device) either way.
"""

from __future__ import annotations

import copy

import torch
from ray.data import DataIterator, Dataset, FileShuffleConfig
from ray.train import DataConfig

from pipeline.data.device import decode_crops
from pipeline.data.shards import read_shards
from pipeline.data.transforms import batch_rng, eval_batch, shuffle_rows, stored_bytes, train_batch
from pipeline.storage import Location

PREFETCH_BATCHES = 2  # batches the train worker's iterator keeps ready ahead of the step


def train_dataset(shard_dir: str | Location, crop: int, seed: int, decode_on: str = "data") -> Dataset:
    # A different file order every epoch (seed + epoch), reproducible for a given seed.
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True)
    if decode_on == "train":
        transform, kwargs = shuffle_rows, {"seed": seed}
    else:
        transform, kwargs = train_batch, {"crop": crop, "seed": seed}
    return read_shards(shard_dir, shuffle=shuffle).map_batches(
        transform, fn_kwargs=kwargs, batch_size=None, batch_format="numpy"
    )


def eval_dataset(shard_dir: str | Location, crop: int, decode_on: str = "data") -> Dataset:
    if decode_on == "train":
        return read_shards(shard_dir).map_batches(stored_bytes, batch_size=None, batch_format="numpy")
    return read_shards(shard_dir).map_batches(
        eval_batch, fn_kwargs={"crop": crop}, batch_size=None, batch_format="numpy"
    )


def torch_batches(shard: DataIterator, batch_size: int, pin_memory: bool = False, drop_last: bool = False):
    """How a train worker takes its decoded batches: uint8 NHWC images and int64 labels as torch tensors."""
    return shard.iter_torch_batches(
        batch_size=batch_size, drop_last=drop_last, prefetch_batches=PREFETCH_BATCHES, pin_memory=pin_memory
    )


class Feed:
    """A train worker's batches as (uint8 NHWC images, int64 labels) on its device, whichever side decodes.

    ``batches`` is what the worker waits for (its data wait); ``tensors`` turns one batch into the
    step's input, decoding it first with ``--decode-on train`` (step time, not data wait). The
    worker's random crops are a function of the seed, the epoch and the batch's contents, as the
    data path's are of its blocks': a restarted worker draws the same crops for the same batch.
    """

    def __init__(self, decode_on: str, crop: int, seed: int, device: torch.device) -> None:
        self.decode_on, self.crop, self.seed, self.device = decode_on, crop, seed, device

    def batches(self, shard: DataIterator, batch_size: int, drop_last: bool = False):
        if self.decode_on == "train":
            return shard.iter_batches(
                batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=PREFETCH_BATCHES
            )
        return torch_batches(shard, batch_size, pin_memory=self.device.type == "cuda", drop_last=drop_last)

    def tensors(self, batch, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch → (images, labels) on the device: training crops for `epoch` (from 1), else validation's."""
        if self.decode_on != "train":
            return batch["image"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)
        rng = None if epoch is None else batch_rng(batch, self.seed, epoch - 1)
        images = decode_crops(list(batch["image"]), self.crop, self.device, rng)
        return images, torch.tensor(batch["label"], dtype=torch.int64, device=self.device)


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
