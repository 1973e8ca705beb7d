"""The model actors of a batch job (evaluate, infer), decided on the driver: how many, on what.

--replicas N | MIN:MAX | auto     a fixed pool, an autoscaling one, or auto: 1 up to what the
                                  cluster holds (its GPUs, else its CPUs); for inference, whose
                                  other tasks take no CPU, as many as it holds now from the start
--gpus-per-replica N | auto       auto: 1 where the cluster has GPUs or its autoscaler can add
                                  GPU nodes, else 0 (CPUs)
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.cli import AUTO, replica_counts
from pipeline.cluster.resources import GpuCapacity
from pipeline.errors import InputError


class PoolError(InputError):
    """--replicas or --gpus-per-replica that cannot be used; the message says how to write it."""


@dataclass(frozen=True)
class Pool:
    smallest: int
    largest: int
    gpus: float = 0.0  # per actor
    why: str = ""  # how the devices were chosen

    def describe(self) -> str:
        count = str(self.smallest) if self.smallest == self.largest else f"{self.smallest} to {self.largest}"
        device = f"{self.gpus:g} GPU each" if self.gpus else "on CPUs"
        return f"model replicas: {count}, {device}" + (f" ({self.why})" if self.why else "")

    def decoding(self, cpus: float) -> str:
        """Where the files are decoded, and what the CPUs the replicas leave can feed."""
        if not self.gpus:
            return "decoding: inside each replica (Ray Data fuses it with the model on CPUs)"
        free = max(0.0, cpus - self.largest)  # Ray Data gives each GPU replica a CPU of its own
        return (
            f"decoding: CPU tasks on the CPUs the replicas leave ({free:g} now): at ~{DECODE_PER_CORE} images/s per "
            f"core, ~{free * DECODE_PER_CORE:,.0f} images/s; add CPU nodes if the GPUs wait"
        )


ONE_ACTOR = Pool(1, 1)  # on CPUs: the library's default
# Images/s one core reads, decodes and crops (ImageNet-sized JPEGs, 224-px crops): the training
# side's sizing rule, measured by `python benchmarks/ingest.py --cpus 2` (docs/clusters.md).
DECODE_PER_CORE = 740


def parse_replicas(text: str) -> tuple[int, int] | None:
    """`4` → (4, 4), `1:8` → (1, 8), `auto` → None; anything else, a PoolError."""
    try:
        return replica_counts(text)
    except ValueError as exc:
        raise PoolError(f"--replicas {exc}") from None


def plan(replicas: str, gpus_per_replica: str | float, capacity: GpuCapacity, cpus: float, whole: bool = False) -> Pool:
    """The pool for this cluster: `capacity` its GPUs, `cpus` its CPUs now. `auto` is 1 up to what
    the cluster holds; `whole`, for a job whose other tasks take no CPU (inference), starts with it."""
    if gpus_per_replica == AUTO:
        gpus, why = (1.0 if capacity.any else 0.0), f"{capacity.describe()}; --gpus-per-replica decides"
    else:
        gpus, why = float(gpus_per_replica), "--gpus-per-replica"
    counts = parse_replicas(replicas)
    if counts is None:
        most = max(1, int((capacity.present or capacity.addable) / gpus if gpus else cpus))
        # Whole: what the cluster has now from the start (Ray Data grows a pool only while work
        # queues up before it), up to what its autoscaler may add.
        now = max(1, int(capacity.present / gpus if gpus else cpus)) if whole else 1
        counts = (min(now, most), most)
    return Pool(counts[0], counts[1], gpus, why)
