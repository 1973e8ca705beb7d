"""`make gpu-check` (benchmarks/gpu_check.py) runs where Ray and MLflow are not installed: a bare GPU
machine's PyTorch image. Here, without a GPU, it says so; with `--device cpu` every part runs and
checks itself on the CPU, so the script cannot rot between GPU runs."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

# What a stock PyTorch image lacks fails to import in these interpreters, as on that machine: Ray,
# MLflow and what they bring (the image has torch, torchvision, numpy, pillow and pyarrow).
MISSING = ("ray", "mlflow", "scipy", "boto3", "psutil", "fsspec", "s3fs", "moto", "requests")
BARE = f"import sys; sys.modules.update(dict.fromkeys({MISSING!r}))\n"
AS_MAKE_RUNS_IT = (
    BARE + 'import runpy; sys.argv[0] = "benchmarks/gpu_check.py"; runpy.run_path(sys.argv[0], run_name="__main__")'
)
WITH_AN_IMPOSSIBLE_CHECK = BARE + (
    "import benchmarks.gpu_check as gpu_check\n"
    "gpu_check.PROBS_ATOL = -1.0  # no probabilities are that close: the model actor's check must fail\n"
    "sys.exit(gpu_check.main(sys.argv[1:]))"
)
TINY = ["--device", "cpu", "--crop", "64", "--image-size", "72", "--batch-size", "4", "--images", "8",
        "--seconds", "0.2", "--fc-width", "64", "--classes", "10", "--no-compile"]  # fmt: skip


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", script, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `make gpu-check` measures it")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    proc = run(AS_MAKE_RUNS_IT, "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU on this machine" in proc.stdout and "nothing to check" in proc.stdout


def test_every_part_runs_and_checks_itself_on_the_cpu_without_ray_or_mlflow(tmp_path):
    proc = run(AS_MAKE_RUNS_IT, *TINY, "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and not report["skipped"]
    assert {row["part"] for row in report["rows"]} == {"train_step", "decode", "cpu_decode", "predict"}
    assert all(row["ok"] and (row["images_per_s"] is None or row["images_per_s"] > 0) for row in report["rows"])
    variants = {row["variant"] for row in report["rows"] if row["part"] == "train_step"}
    assert {"fp32", "fp32 channels_last", "bf16", "bf16 channels_last", "fp32 step = CPU's step"} == variants
    decode = next(row for row in report["rows"] if row["part"] == "decode" and row["images_per_s"])
    assert "mean |Δ| 0.00 levels" in decode["check"]  # the CPU against itself: the same pixels
    assert [line.split(":")[0] for line in report["advice"]] == ["--decode-on data", "--decode-on train"]
    assert "| train_step | fp32 step = CPU's step | - | ok: loss " in proc.stdout


def test_a_check_that_fails_fails_the_command(tmp_path):
    proc = run(WITH_AN_IMPOSSIBLE_CHECK, *TINY, "--only", "predict", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "A CHECK FAILED" in proc.stdout and "| predict | fp32 (what the model actor runs) | " in proc.stdout
    assert not json.loads((tmp_path / "r.json").read_text())["ok"]
