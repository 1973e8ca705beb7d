"""The Ray Data pipelines that feed the train workers.

    train: read shards (file order reshuffled every epoch) → decode, random crop, flip,
           row shuffle (CPU workers) → uint8 NHWC batches → streaming_split, one per worker
    val:   read shards → decode, centre crop (CPU workers) → uint8 NHWC batches

Float conversion, colour augmentation and normalisation happen on the train worker's device
(pipeline.data.device); the wire carries uint8.
"""

from __future__ import annotations

import ray
from ray.data import DataContext, DataIterator, Dataset, FileShuffleConfig
from ray.train import DataConfig

from pipeline.data.transforms import eval_batch, train_batch

DECODE_BATCH = 64  # images per decode task: big enough to amortise task overhead, small enough to stream


def train_dataset(shard_dir: str, crop: int, seed: int) -> Dataset:
    _use_file_reader()
    return ray.data.read_parquet(
        shard_dir,
        columns=["image", "label"],
        file_extensions=["parquet"],
        # A different file order every epoch (seed + epoch), reproducible for a given seed.
        shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True),
    ).map_batches(train_batch, fn_kwargs={"crop": crop}, batch_size=DECODE_BATCH, batch_format="numpy")


def eval_dataset(shard_dir: str, crop: int) -> Dataset:
    _use_file_reader()
    return ray.data.read_parquet(shard_dir, columns=["image", "label"], file_extensions=["parquet"]).map_batches(
        eval_batch, fn_kwargs={"crop": crop}, batch_size=DECODE_BATCH, batch_format="numpy"
    )


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

    def __init__(self, exact: tuple[str, ...] = ("val",), **kwargs) -> None:
        super().__init__(**kwargs)
        self._exact = exact

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
