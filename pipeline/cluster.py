"""Joining a Ray cluster, or starting a local one, the same way for every job."""

from __future__ import annotations

import os
from typing import Callable

import ray


def connect(
    log: Callable[[str], None] = print, env: dict[str, str] | None = None, local_cpus: Callable[[], int] | None = None
) -> None:
    """Join the cluster in RAY_ADDRESS or one started with `ray start`; else start a local one.

    `env` reaches every worker, on every node, through the job's runtime env. `local_cpus` sizes a
    local Ray (and may refuse to start one); Ray's default is this machine's cores.
    """
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env} if env else None
    try:
        ray.init(address="auto", runtime_env=runtime_env)
        log(f"connected to the Ray cluster at {ray.get_runtime_context().gcs_address}")
    except ConnectionError:
        if os.environ.get("RAY_ADDRESS"):
            raise
        ray.init(num_cpus=local_cpus() if local_cpus else None, runtime_env=runtime_env)
        log(f"started a local Ray with {ray.cluster_resources().get('CPU', 0):.0f} logical CPUs")
