"""What a training job asks of the cluster, what the cluster has, and why a job would wait.

    Plan          the train workers' bundles (Ray Train's placement group) + a CPU for Ray Data
    ClusterState  nodes, resources in use, what waits for resources, the autoscaler's launches
    refusal()     on a cluster that cannot add nodes: a plan that can never run, with the numbers
    describe_stall()  what the watchdog (pipeline.cluster.watchdog) says when no batch arrives

Ray Train reserves the train workers' resources for the whole run; Ray Data's read-and-decode
tasks take one CPU each from what is left. A plan that leaves Ray Data no CPU, or asks for a GPU or
a custom resource no node has, does not fail in Ray: it waits forever. On a cluster with an
autoscaler the nodes may still come, so there the job starts and the watchdog explains any wait.

Ray 2.60 has no public API for the autoscaler's state or the pending resource demands (`ray
status` reads them from the GCS; `ray.util.state` needs the dashboard): `ClusterState.read()`
uses the same GCS calls as `ray status`, in this one place (tests/test_resources.py checks them on
a real cluster).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import yaml

from pipeline.config import TrainConfig
from pipeline.metrics import format_duration

DATA_CPUS = 1.0  # one Ray Data task (read a shard, decode, crop) needs one CPU
AUTOSCALER_FRESH_S = 60.0  # an autoscaler status older than this is one that no longer runs
MONITOR_WAIT_S = 15.0  # how long a head started a moment ago may take to write its first status
Bundle = dict[str, float]


@dataclass(frozen=True)
class Plan:
    workers: int  # what must be placed to start: the fixed count, or an elastic run's fewest
    per_worker: Bundle  # what each train worker reserves: CPU, GPU, custom resources
    most: int = 0  # an elastic run's most workers (0: a fixed count)

    @classmethod
    def of(cls, cfg: TrainConfig) -> Plan:
        per_worker = dict(cfg.resources_per_worker)
        if cfg.gpu:
            per_worker["GPU"] = 1.0
        # An elastic run starts once its fewest workers are placed: that is what must fit.
        workers, most = (cfg.min_workers, cfg.workers) if cfg.elastic else (cfg.workers, 0)
        return cls(workers, {name: amount for name, amount in per_worker.items() if amount > 0}, most)

    def describe(self) -> str:
        count = f"{self.workers} to {self.most}" if self.most else str(self.workers)
        return f"{count} train worker{'s' if self.most or self.workers > 1 else ''} × {_bundle(self.per_worker)}"


@dataclass(frozen=True)
class ClusterState:
    autoscaling: bool  # an autoscaler runs, so nodes may be added (also: a head too new to tell)
    address: str  # the GCS address other nodes join (`ray start --address`)
    nodes: tuple[Bundle, ...]  # each alive node's total resources
    used: Bundle = field(default_factory=dict)  # reserved or in use, over the cluster
    waiting_groups: tuple[tuple[Bundle, int], ...] = ()  # placement-group bundles not placed: (bundle, count)
    waiting_tasks: tuple[tuple[Bundle, int], ...] = ()  # tasks and actors waiting for resources
    launching: tuple[str, ...] = ()  # nodes the autoscaler is starting ("2 × gpu")
    failed: tuple[str, ...] = ()  # launches that failed, with the reason where known

    @property
    def total(self) -> Bundle:
        total: Bundle = {}
        for node in self.nodes:
            for name, amount in node.items():
                total[name] = total.get(name, 0.0) + amount
        return total

    @classmethod
    def read(cls) -> ClusterState:
        """The connected cluster, now (what `ray status` shows)."""
        from ray.autoscaler.v2.sdk import get_cluster_status

        address = ray.get_runtime_context().gcs_address
        status = get_cluster_status(address)
        nodes = tuple(
            {name: float(amount) for name, amount in node["Resources"].items() if not name.startswith("node:")}
            for node in ray.nodes()
            if node.get("Alive")
        )
        used = {u.resource_name: u.used for u in status.cluster_resource_usage if u.used > 0}
        demands = status.resource_demands
        groups = tuple(
            (dict(request.bundle), request.count)
            for demand in demands.placement_group_demand
            for request in demand.bundles_by_count
        )
        tasks = tuple(
            (dict(request.bundle), request.count)
            for demand in demands.ray_task_actor_demand
            for request in demand.bundles_by_count
        )
        launching = [f"{launch.count} × {launch.ray_node_type_name}" for launch in status.pending_launches]
        launching += [f"{node.ray_node_type_name} ({node.details or 'starting'})" for node in status.pending_nodes]
        failed = [
            f"{launch.count} × {launch.ray_node_type_name}: {launch.details}" for launch in status.failed_launches
        ]
        autoscaling, v1 = _autoscaler()
        launching += [f"{count} × {kind}" for kind, count in (v1.get("pending_launches") or {}).items()]
        launching += [f"{entry[1]} ({entry[-1]})" for entry in v1.get("pending_nodes") or [] if len(entry) >= 2]
        failed += [f"{entry[1]}" for entry in v1.get("failed_nodes") or [] if len(entry) >= 2]
        return cls(
            autoscaling=autoscaling,
            address=address,
            nodes=nodes,
            used=used,
            waiting_groups=groups,
            waiting_tasks=tasks,
            launching=tuple(launching),
            failed=tuple(failed),
        )


def refusal(plan: Plan, state: ClusterState) -> str | None:
    """Why `plan` can never run on this cluster, with the arithmetic and the fix; None if it can,
    or if the cluster has an autoscaler (nodes may come: the watchdog reports instead)."""
    if state.autoscaling:
        return None
    placed, left = _pack(plan, state.nodes)
    fixed = (
        "This cluster has no autoscaler: the run would wait for resources forever. "
        "If nodes will join it by other means, pass --skip-resource-check."
    )
    if placed < plan.workers:
        absent = sorted(name for name, amount in plan.per_worker.items()
                        if not any(node.get(name, 0.0) >= amount for node in state.nodes))  # fmt: skip
        why = (
            f"no node has {', '.join(f'{name} {plan.per_worker[name]:g}' for name in absent)}"
            if absent
            else f"its nodes hold {placed} of them"
        )
        return (
            f"{plan.describe()} cannot be placed on this Ray cluster: {why} "
            f"(nodes: {_nodes(state.nodes)}). {_fixes(plan, state)}. {fixed}"
        )
    if max(left, default=0.0) < DATA_CPUS:
        cpus, total = plan.per_worker.get("CPU", 0.0), state.total.get("CPU", 0.0)
        return (
            f"{plan.workers} train worker{'s' if plan.workers > 1 else ''} × {cpus:g} CPUs = {plan.workers * cpus:g} "
            f"of this cluster's {total:g} "
            f"CPUs, which leaves {max(total - plan.workers * cpus, 0):g} for Ray Data: reading and decoding need "
            f"at least {DATA_CPUS:g} CPU free on a node (more keep the workers fed). "
            f"{_fixes(plan, state)}. {fixed}"
        )
    return None


def describe_stall(quiet_s: float, batches_seen: bool, plan: Plan, state: ClusterState) -> str:
    """What the watchdog prints: how long without a batch, what waits, what is reserved, what to change."""
    total = state.total
    if batches_seen:
        lines = [f"watchdog: no training batch for {format_duration(quiet_s)}."]
    else:
        lines = [f"watchdog: no training batch yet, {format_duration(quiet_s)} after the job asked for {plan.describe()}."]  # fmt: skip
    in_use = ", ".join(f"{name} {state.used.get(name, 0.0):g}/{amount:g}" for name, amount in sorted(total.items())
                       if name in ("CPU", "GPU") or name in plan.per_worker)  # fmt: skip
    lines.append(f"  in use (reserved): {in_use or 'nothing'} over {len(state.nodes)} node(s)")
    if state.waiting_groups:
        lines.append(f"  waiting to be placed (train workers): {_demands(state.waiting_groups)}")
    if state.waiting_tasks:
        lines.append(f"  waiting for resources (tasks and actors, e.g. Ray Data's reads): {_demands(state.waiting_tasks)}")  # fmt: skip
    if state.launching:
        lines.append(f"  the autoscaler is starting: {', '.join(state.launching)}")
    if state.failed:
        lines.append(f"  failed to start: {', '.join(state.failed)}")
    lines.append("  " + _advice(plan, state))
    return "\n".join(lines)


def _advice(plan: Plan, state: ClusterState) -> str:
    cpus_free = state.total.get("CPU", 0.0) - state.used.get("CPU", 0.0)
    if state.waiting_groups:
        if state.launching:
            return "what to do: nothing yet; training starts when the new nodes join (check `ray status`)."
        if state.autoscaling:
            return (
                "what to do: no node is being started for them: check the node types and their max_workers "
                "in the cluster definition (`ray status` shows why), or ask for less (--workers, "
                "--cpus-per-worker, --worker-resources, --gpu)."
            )
        return f"what to do: {_fixes(plan, state)}."
    if state.waiting_tasks and cpus_free < DATA_CPUS:
        fix = "lower --cpus-per-worker, or add CPU nodes"
        if state.launching:
            fix = f"the autoscaler is adding nodes; if they do not come, {fix}"
        return f"what to do: Ray Data has no free CPU ({cpus_free:g} left beside the train workers): {fix}."
    return (
        "what to do: nothing waits for resources, so the time goes elsewhere: starting the workers and "
        "Ray Data, reading --data (storage throughput), a checkpoint upload, or a stuck worker; "
        "see `ray status` and the Ray dashboard."
    )


def _fixes(plan: Plan, state: ClusterState) -> str:
    """Changes that make `plan` fit these nodes (checked), then adding a node."""
    options = []
    cpus = plan.per_worker.get("CPU", 0.0)
    for fewer in range(math.ceil(cpus) - 1, 0, -1):  # whole CPUs below today's, the most that fits first
        if _fits(replace(plan, per_worker={**plan.per_worker, "CPU": float(fewer)}), state):
            options.append(f"--cpus-per-worker {fewer}")
            break
    for workers in range(plan.workers - 1, 0, -1):
        if _fits(replace(plan, workers=workers), state):
            options.append(f"--workers {workers}")
            break
    options.append(
        f"add a node (`RAY_AUTH_MODE=token ray start --address {state.address or '<head>:6379'}` on another machine)"
    )
    return "Use " + ", or ".join(options)


def _fits(plan: Plan, state: ClusterState) -> bool:
    placed, left = _pack(plan, state.nodes)
    return placed >= plan.workers and max(left, default=0.0) >= DATA_CPUS


def _pack(plan: Plan, nodes: Iterable[Bundle]) -> tuple[int, list[float]]:
    """Train workers placed node by node, as many on each as fit (Ray Train's PACK strategy):
    how many were placed and the CPUs left on each node."""
    placed, left = 0, []
    for node in nodes:
        room = min((math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in plan.per_worker.items()),
                   default=plan.workers)  # fmt: skip
        here = min(room, plan.workers - placed)
        placed += here
        left.append(node.get("CPU", 0.0) - here * plan.per_worker.get("CPU", 0.0))
    return placed, left


@dataclass(frozen=True)
class GpuCapacity:
    """The GPUs of the connected cluster: those its nodes have, and those its autoscaler may add."""

    present: float
    addable: float = 0.0

    @property
    def any(self) -> bool:
        return self.present > 0 or self.addable > 0

    def describe(self) -> str:
        if self.present:
            return f"the cluster has {self.present:g} GPU(s)"
        if self.addable:
            return f"its autoscaler can add GPU nodes ({self.addable:g} GPU(s) at most)"
        return "the cluster has no GPUs and its autoscaler cannot add any"

    @classmethod
    def read(cls) -> GpuCapacity:
        return cls(float(ray.cluster_resources().get("GPU", 0.0)), addable("GPU"))


def cpus_now_or_addable() -> float:
    """The connected cluster's CPUs; where it has none yet (workers scale from zero), the CPUs its
    autoscaler may add."""
    return float(ray.cluster_resources().get("CPU", 0.0)) or addable("CPU")


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the cluster's YAML on its head


def addable(resource: str, bootstrap: str = BOOTSTRAP_CONFIG) -> float:
    """How much of `resource` the autoscaler may launch: from the cluster config it reports to the
    GCS (autoscaler v2, KubeRay), else from the YAML `ray up` left on this head; 0 when neither says."""
    try:
        from ray._private.state import state  # what Ray Train reads for the same question

        reported = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 -- no such GCS entry or call in this Ray: the YAML, or nothing
        reported = {}
    if reported.get(resource):
        return float(min(reported[resource], 1e6))
    return in_cluster_yaml(Path(bootstrap).expanduser(), resource)


def in_cluster_yaml(path: Path, resource: str) -> float:
    """How much of `resource` a cluster YAML's worker node types may add: resources × max_workers, summed."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 0.0
    head = config.get("head_node_type")
    return float(
        sum(
            (kind.get("resources") or {}).get(resource, 0) * kind.get("max_workers", config.get("max_workers", 0))
            for name, kind in (config.get("available_node_types") or {}).items()
            if name != head and isinstance(kind, dict)
        )
    )


def _autoscaler() -> tuple[bool, dict]:
    """Whether an autoscaler may add nodes, and the (v1) autoscaler's report as `ray status` reads it.

    Every head runs Ray's monitor, which writes that report every few seconds. A plain `ray start
    --head` (or a local `ray.init`) runs it with a read-only provider that names each node type
    `node_<node id>` and never launches anything. No report yet (a head started a moment ago):
    it cannot be told, so the cluster is taken as one that may grow (nothing is refused; the
    watchdog still reports a wait).
    """
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    if _autoscaler_v2_runs():
        return True, {}
    deadline = time.monotonic() + MONITOR_WAIT_S
    while (raw := internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)) is None:
        if time.monotonic() > deadline:
            return True, {}
        time.sleep(0.5)
    status = json.loads(raw)
    report = status.get("autoscaler_report") or {}
    types = report.get("node_type_mapping") or {}
    read_only = all(kind == f"node_{node_id}" for node_id, kind in types.items())
    running = time.time() - status.get("time", 0) <= AUTOSCALER_FRESH_S
    return running and not read_only, report


def _autoscaler_v2_runs() -> bool:
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    return is_autoscaler_v2(fetch_from_server=True)


def _bundle(bundle: Bundle) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in sorted(bundle.items())) + "}"


def _nodes(nodes: Iterable[Bundle]) -> str:
    shown = [_bundle({k: v for k, v in node.items() if k not in ("memory", "object_store_memory")}) for node in nodes]
    return ", ".join(shown) or "none"


def _demands(demands: Iterable[tuple[Bundle, int]]) -> str:
    return ", ".join(f"{count} × {_bundle(bundle)}" for bundle, count in demands)
