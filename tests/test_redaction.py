"""Secrets never printed: the scrub every job's output goes through, and logins written into tracking URIs."""

from __future__ import annotations

import base64
import io
import os

import pytest
from conftest import S3_SECRET, SECRET, free_port, job_env, run_job

from pipeline.redaction import ScrubbedStream, redact, scrub
from pipeline.tracking import mlflow_client
from pipeline.tracking.server import healthy


def test_the_scrub_masks_logins_in_uris_headers_secret_values_and_key_value_secrets(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-0123456789")
    basic = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    text = "\n".join([
        f"API request to http://alice:{SECRET}@127.0.0.1:5000/api/2.0/mlflow/runs/get failed",
        "cannot load from https://bob:pa%40ss@mlflow.example.com:443/x",
        f"headers {{'Authorization': 'Basic {basic}', 'Host': 'x'}}",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig",
        f"aws_secret_access_key = {S3_SECRET}",
        "https://bucket.s3.amazonaws.com/k?X-Amz-Credential=AKIA/x&X-Amz-Signature=deadbeef01&X-Amz-Expires=60",
        "password=hunter3 token: abc.def",
        "RAY_AUTH_TOKEN=ray-token-0123456789",
        f"the password is {SECRET}, the session's",
    ])  # fmt: skip
    scrubbed = scrub(text)
    for secret in (SECRET, "pa%40ss", basic, "eyJhbGciOiJIUzI1NiJ9", S3_SECRET, "deadbeef01", "hunter3", "abc.def",
                   "ray-token-0123456789"):  # fmt: skip
        assert secret not in scrubbed, (secret, scrubbed)
    assert "http://***@127.0.0.1:5000/api/2.0/mlflow/runs/get" in scrubbed  # where it failed stays readable
    assert "X-Amz-Expires=60" in scrubbed and "'Host': 'x'" in scrubbed
    # What is not a secret stays: modes and flags that name variables, ordinary URIs.
    plain = "RAY_AUTH_MODE=token ray job submit; --forward-env MLFLOW_TRACKING_PASSWORD; http://127.0.0.1:5000"
    assert scrub(plain) == plain


def test_a_jobs_output_is_scrubbed_even_when_a_secret_is_split_across_writes():
    out = io.StringIO()
    stream = ScrubbedStream(out)
    stream.write(f"connecting to http://alice:{SECRET[:5]}")
    stream.write(f"{SECRET[5:]}@host:5000 ...\nnext line without a newline")
    assert SECRET not in out.getvalue() and "http://***@host:5000 ..." in out.getvalue()
    stream.flush()
    assert out.getvalue().endswith("next line without a newline")


def test_a_login_in_the_tracking_uri_is_honoured_and_never_shown(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@127.0.0.1:5000")
    assert mlflow_client.resolve_tracking_uri(os.environ["MLFLOW_TRACKING_URI"]) == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", SECRET)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"  # what a local Ray's workers inherit
    # Two different logins, or a user without a password, are refused with where to put the login instead.
    with pytest.raises(mlflow_client.TrackingError, match="carries a login and MLFLOW_TRACKING_PASSWORD says another"):
        mlflow_client.resolve_tracking_uri("http://alice:other@127.0.0.1:5000")
    with pytest.raises(mlflow_client.TrackingError, match="names a user but no password; put the login in"):
        mlflow_client.resolve_tracking_uri("http://alice@127.0.0.1:5000")
    assert redact("http://u:p@[::1]:5000/x") == "http://[::1]:5000/x"


@pytest.mark.slow  # the session's server
def test_a_login_in_the_tracking_uri_works_for_the_jobs_against_a_live_server(trained, mlflow_server):
    host = mlflow_server.url.removeprefix("http://")
    assert healthy(f"http://alice:{SECRET}@{host}")
    env = job_env(tracking_uri=f"http://alice:{SECRET}@{host}")
    del env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]  # the URI's login is the only one
    proc = run_job("jobs/registry.py", "show", "alexnet-test", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "@champion" in proc.stdout and SECRET not in proc.stdout + proc.stderr
    proc = run_job("jobs/registry.py", "show", "no-such-model", env=env, timeout=120)
    assert proc.returncode == 2 and f"no registered model named 'no-such-model' at {mlflow_server.url}" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.slow  # the session's model, cluster and server
def test_infer_and_evaluate_log_in_through_the_uri_and_print_no_password(
    trained, ray_cluster, measured_shards, mlflow_server, tiny_raw, tmp_path
):
    host = mlflow_server.url.removeprefix("http://")
    env = job_env(ray_cluster, tracking_uri=f"http://alice:{SECRET}@{host}")
    del env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]  # the URI's login is the only one
    model = "models:/alexnet-test@champion"
    inferred = run_job("jobs/infer.py", "--model", model, "--input", tiny_raw / "val", "--output", tmp_path / "preds",
                       env=env)  # fmt: skip
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    evaluated = run_job("jobs/evaluate.py", "--model", model, "--data", measured_shards, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    runs = (trained.first.run_id, trained.second.run_id)
    assert any(f"logged to MLflow run {run} at {mlflow_server.url}" in evaluated.stdout for run in runs)
    for proc in (inferred, evaluated):
        assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "job, args",
    [
        ("jobs/registry.py", ["list"]),
        ("jobs/infer.py", ["--model", "models:/alexnet@champion", "--input", ".", "--output", "/tmp/never-written"]),
        ("jobs/evaluate.py", ["--model", "models:/alexnet@champion", "--data", "."]),
        ("jobs/train.py", ["--storage-path", "/tmp/never-written"]),
    ],
)
def test_a_password_in_the_tracking_uri_is_in_no_output_of_a_job_against_a_dead_server(job, args):
    dead = f"127.0.0.1:{free_port()}"
    env = job_env(tracking_uri=f"http://alice:{SECRET}@{dead}")
    proc = run_job(job, *args, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the MLflow tracking server at http://{dead} does not answer" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
