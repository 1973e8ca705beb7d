"""Training's input pipeline streams: a dataset several times the object store flows through it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_dataset_larger_than_the_object_store_streams_without_spilling(tmp_path):
    # Its own Ray (a 300 MiB object store), started and stopped by the benchmark process itself.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "memory.json"
    args = ["--images", "6000", "--object-store-mb", "300", "--epochs", "2", "--cpus", "4", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/memory.py"), *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [e["rows"] for e in result["epochs"]] == [6000, 6000]
    assert result["decoded_per_epoch_mib"] > 2.5 * result["object_store_mib"]
    assert result["dataset_on_disk_mib"] > result["object_store_mib"]
    assert result["spilled_mib"] == 0 and result["fallback_mib"] == 0
    assert result["peak_object_store_mib"] < result["object_store_mib"]
