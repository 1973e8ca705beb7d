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

import ray
from ray.data import DataContext, DataIterator, Dataset, ExecutionResources, FileShuffleConfig
from ray.train import DataConfig

from pipeline.data.transforms import eval_batch, train_batch
from pipeline.storage import Location, locate

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


def read_shards(
    shard_dir: str | Location,
    columns: tuple[str, ...] = ("image", "label"),
    shuffle: FileShuffleConfig | None = None,
) -> Dataset:
    """The shards of one split (a local folder or s3:// prefix), streamed one file per read task.

    One block per file is also what lets Ray Data fuse the read with the decode that follows:
    with fewer files than its default minimum of 200 read blocks it would split each file's
    output, and split reads are never fused, so every raw shard would wait in the object store
    for a separate decode task (and spill, with a small store).
    """
    _use_file_reader()
    shard_dir = shard_dir if isinstance(shard_dir, Location) else locate(shard_dir)
    files = [e for e in shard_dir.listdir() if e.base_name.endswith(".parquet")]
    ds = ray.data.read_parquet(
        shard_dir.path,
        filesystem=shard_dir.fs,
        columns=list(columns),
        file_extensions=["parquet"],
        shuffle=shuffle,
        override_num_blocks=max(1, len(files)),
    )
    # The whole pipeline is one fused operator (read → decode → crop): Ray Data's per-operator
    # reservation would hold back half of the CPUs for operators it does not have (on 2 cores,
    # one decode task at a time instead of two). Object-store backpressure still applies.
    ds.context.op_resource_reservation_enabled = False
    return ds


def _use_file_reader() -> None:
    """Read Parquet with one task per shard file (Ray Data's V1 reader).

    Ray 2.60's default V2 reader lists files and provisions footer-reader actors again at every
    execution (3-4 s per epoch on a 2-core machine) and bin-packs small shards into one read
    task, so an epoch arrives as a single block after that delay instead of streaming.
    """
    DataContext.get_current().use_datasource_v2 = False


class IngestConfig(DataConfig):
    """Ray Train's DataConfig, except that evaluation splits are not equalised.

    DataConfig splits every dataset with ``equal=True``, which drops up to world_size - 1 rows
    so that DDP ranks take the same number of steps. Training needs that; evaluation does not
    (no gradient sync), and dropping validation images would make the error rates inexact.
    """

    def __init__(self, exact: tuple[str, ...] = ("val",), cpu_limit: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self._exact = exact
        self._cpu_limit = cpu_limit

    def _resolve_execution_options(self, dataset_name: str):
        """Blocks reach the workers in file order: with seeded crops, runs repeat exactly.

        Ray Data's budget is what the cluster has beyond the train workers' reservation (Ray Train
        excludes it); `cpu_limit` caps it further, e.g. to leave CPUs to other jobs.
        """
        options = super()._resolve_execution_options(dataset_name)
        options.preserve_order = True
        if self._cpu_limit:
            limits = options.resource_limits
            options.resource_limits = ExecutionResources(
                cpu=self._cpu_limit,
                gpu=limits.gpu,
                object_store_memory=limits.object_store_memory,
                memory=limits.memory,
            )
        return options

    def configure(
        self, datasets, world_size, worker_handles, worker_node_ids, **kwargs
    ) -> list[dict[str, DataIterator]]:
        exact = {name: ds for name, ds in datasets.items() if name in self._exact}
        rest = {name: ds for name, ds in datasets.items() if name not in self._exact}
        output = (
            super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if rest
            else [{} for _ in range(world_size)]
        )
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in exact.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank][name] = split
        return output
