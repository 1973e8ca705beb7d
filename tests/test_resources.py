"""A plan that cannot run is refused with its arithmetic; a run that waits is explained.

The arithmetic is checked on described clusters; reading a cluster's state and the watchdog's
thread and actor run against the session's real Ray. A real fixed cluster refusing a job, and the
watchdog of a job that waits on it, are in tests/test_cluster.py.
"""

from __future__ import annotations

import time

import pytest

from pipeline.cluster.resources import ClusterState, Plan, describe_stall, refusal
from pipeline.cluster.watchdog import Heartbeat, Watchdog
from pipeline.config import resolve

FOUR_CPUS = ({"CPU": 4.0, "memory": 8e9},)


def fixed(*nodes, **state) -> ClusterState:
    return ClusterState(autoscaling=False, address="10.0.0.1:6379", nodes=tuple(nodes), **state)


def test_train_workers_that_take_every_cpu_are_refused_with_the_arithmetic_and_fixes_that_fit():
    plan = Plan.of(resolve("sample", workers=2))  # the default profile: 2 CPUs per worker
    assert plan.per_worker == {"CPU": 2.0}
    message = refusal(plan, fixed(*FOUR_CPUS))
    assert message.startswith("2 train workers × 2 CPUs = 4 of this cluster's 4 CPUs, which leaves 0 for Ray Data"), (
        message
    )
    # Each fix offered leaves Ray Data a CPU on these nodes.
    assert "--cpus-per-worker 1" in message and "--workers 1" in message
    assert "ray start --address 10.0.0.1:6379" in message and "--skip-resource-check" in message
    assert refusal(Plan(2, {"CPU": 1.0}), fixed(*FOUR_CPUS)) is None
    assert refusal(Plan(1, {"CPU": 2.0}), fixed(*FOUR_CPUS)) is None


def test_cpus_are_counted_per_node_where_the_workers_are_placed():
    gpu_node = {"CPU": 2.0, "GPU": 1.0}
    # 2 workers × {CPU 2, GPU 1} on two such nodes: placed, but each node is left with no CPU.
    message = refusal(Plan(2, {"CPU": 2.0, "GPU": 1.0}), fixed(gpu_node, gpu_node))
    assert "which leaves 0 for Ray Data" in message and "--cpus-per-worker 1" in message
    assert refusal(Plan(2, {"CPU": 1.0, "GPU": 1.0}), fixed(gpu_node, gpu_node)) is None
    # A CPU node beside them gives Ray Data its CPUs.
    assert refusal(Plan(2, {"CPU": 2.0, "GPU": 1.0}), fixed(gpu_node, gpu_node, {"CPU": 2.0})) is None


def test_gpus_or_custom_resources_no_node_has_are_refused():
    cfg = resolve("sample", workers=2, gpu=True)
    message = refusal(Plan.of(cfg), fixed(*FOUR_CPUS))
    assert "cannot be placed on this Ray cluster: no node has GPU 1" in message, message
    message = refusal(Plan(2, {"CPU": 1.0, "mock_gpu": 1.0}), fixed({"CPU": 4.0, "mock_gpu": 1.0}))
    assert "its nodes hold 1 of them" in message and "--workers 1" in message, message


def test_a_cluster_with_an_autoscaler_is_never_refused():
    autoscaling = ClusterState(autoscaling=True, address="", nodes=({"CPU": 0.0},))
    assert refusal(Plan(64, {"CPU": 8.0, "GPU": 1.0}), autoscaling) is None


def test_the_stall_report_says_what_waits_and_what_to_do():
    plan = Plan(2, {"CPU": 2.0})
    starved = fixed(*FOUR_CPUS, used={"CPU": 4.0}, waiting_tasks=(({"CPU": 1.0}, 11),))
    report = describe_stall(130, True, plan, starved)
    assert report.splitlines()[0] == "watchdog: no training batch for 2m10s."
    assert "in use (reserved): CPU 4/4 over 1 node(s)" in report
    assert "11 × {CPU: 1}" in report and "Ray Data has no free CPU (0 left" in report

    waiting = ClusterState(
        autoscaling=True, address="", nodes=({"CPU": 0.0},),
        waiting_groups=(({"CPU": 1.0, "mock_gpu": 1.0}, 2),), launching=("2 × gpu",),
    )  # fmt: skip
    report = describe_stall(125, False, Plan(2, {"CPU": 1.0, "mock_gpu": 1.0}), waiting)
    assert report.startswith("watchdog: no training batch yet, 2m05s after the job asked for 2 train workers")
    assert "waiting to be placed (train workers): 2 × {CPU: 1, mock_gpu: 1}" in report
    assert "the autoscaler is starting: 2 × gpu" in report and "when the new nodes join" in report
    nothing = ClusterState(autoscaling=True, address="", nodes=({"CPU": 0.0},), waiting_groups=waiting.waiting_groups)
    assert "no node is being started for them" in describe_stall(125, False, plan, nothing)
    assert "nothing waits for resources" in describe_stall(300, True, plan, fixed(*FOUR_CPUS))


def test_the_cluster_state_shows_a_placement_group_that_cannot_be_placed(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group

    state = ClusterState.read()
    assert not state.autoscaling, "a local Ray has no autoscaler"
    assert state.total["CPU"] == ray_cluster.cluster_resources()["CPU"]
    assert state.address == ray_cluster.get_runtime_context().gcs_address
    group = placement_group([{"CPU": 1000.0}])
    try:
        deadline = time.monotonic() + 30
        while ({"CPU": 1000.0}, 1) not in ClusterState.read().waiting_groups:
            assert time.monotonic() < deadline, ClusterState.read()
            time.sleep(0.5)
    finally:
        remove_placement_group(group)


def test_the_watchdog_reports_a_stall_until_batches_arrive_again(ray_cluster):
    said: list[str] = []
    with Watchdog(1.0, Plan(1, {"CPU": 1.0}), said.append) as actor:
        _wait_until(lambda: any(line.startswith("watchdog: no training batch yet") for line in said))
        beat = Heartbeat(actor, every=0.1)
        _wait_until(lambda: _beat_and_check(beat, said))
    stalls = [line for line in said if line.startswith("watchdog: no training batch")]
    assert "in use (reserved):" in stalls[0] and "what to do:" in stalls[0]
    assert said[-1] == "watchdog: training batches are arriving again"


def test_no_watchdog_with_a_stall_warning_of_zero(ray_cluster):
    with Watchdog(0, Plan(1, {}), print) as actor:
        assert actor is None
    Heartbeat(None)()  # a worker without a watchdog beats into nothing


def _beat_and_check(beat: Heartbeat, said: list[str]) -> bool:
    beat()
    return "watchdog: training batches are arriving again" in said


def _wait_until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.1)


def test_an_elastic_plan_must_place_its_fewest_workers_and_says_its_range():
    cfg = resolve("sample", workers=4, min_workers=1, cpus_per_worker=1.0, worker_resources="mock_gpu=1")
    plan = Plan.of(cfg)
    assert (plan.workers, plan.most) == (1, 4)
    assert plan.describe() == "1 to 4 train workers × {CPU: 1, mock_gpu: 1}"
    # A fixed cluster with room for one such worker and Ray Data beside it: an elastic run starts there.
    assert refusal(plan, fixed({"CPU": 2.0, "mock_gpu": 1.0})) is None
    assert refusal(Plan.of(resolve("sample", workers=4, cpus_per_worker=1.0, worker_resources="mock_gpu=1")),
                   fixed({"CPU": 2.0, "mock_gpu": 1.0})) is not None  # fmt: skip
