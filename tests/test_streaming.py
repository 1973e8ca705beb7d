"""Training's input pipeline streams: a dataset several times the object store flows through it."""

import json

import pytest
from conftest import job_env, run_job


@pytest.mark.slow
def test_a_dataset_larger_than_the_object_store_streams_without_spilling(tmp_path):
    # Its own Ray (a 150 MiB object store), started and stopped by the benchmark process itself.
    out = tmp_path / "memory.json"
    args = ["--images", "3000", "--object-store-mb", "150", "--epochs", "2", "--cpus", "4", "--json", out]
    proc = run_job("benchmarks/memory.py", *args, env=job_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [e["rows"] for e in result["epochs"]] == [3000, 3000]
    assert result["decoded_per_epoch_mib"] > 2.5 * result["object_store_mib"]
    assert result["dataset_on_disk_mib"] > result["object_store_mib"]
    # Materialising the stream would spill hundreds of MiB here (at least 1.5× the store per epoch:
    # the epoch is 2.5× the store). Streaming runs the store near full, and on a loaded 2-core
    # machine a few decoded blocks (9 MiB each) can go to disk at its edge: 0 to 28 MiB seen.
    assert result["spilled_mib"] < 0.25 * result["object_store_mib"] and result["fallback_mib"] == 0
    assert result["peak_object_store_mib"] < result["object_store_mib"]
