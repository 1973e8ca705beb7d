"""The online endpoint: jobs/serve.py as a user starts it (its own local Ray and Ray Serve), real JPEGs
over HTTPS with a token, the session's MLflow server and its two registered versions; the alias moved
under load."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import ray
from conftest import REGISTERED_MODEL, ROOT, call_job, free_port, job_env, load_job, run_job
from mlflow import MlflowClient
from PIL import Image

from pipeline.data.transforms import MAX_PIXELS
from pipeline.scoring import endpoint, inference, loading
from pipeline.storage import locate

TOKEN = "serve-token-do-not-log"
TOKEN_ENV = load_job("jobs/serve.py").TOKEN_ENV
MAX_FILE_MB = 0.25  # the endpoint's limit in these tests: a 300 KB body is over it


def _image(width: int, height: int, seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.BICUBIC).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


IMAGES = {
    "wide.jpg": _image(320, 200, 1),
    "tall.jpeg": _image(90, 150, 2),
    "gray.jpg": _image(120, 100, 3, mode="L"),
    "alpha.png": _image(100, 100, 4, "PNG", "RGBA"),
    "photo.webp": _image(150, 90, 5, "WEBP"),
}


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class Endpoint:
    """A running `python jobs/serve.py` and what it printed so far."""

    def __init__(self, process: subprocess.Popen, url: str, trust: ssl.SSLContext) -> None:
        self.process, self.url, self.trust, self.lines = process, url, trust, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> re.Match:
        """The first match of `pattern` in the output, once it holds `count` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.output()))
            if len(found) >= count:
                return found[0]
            assert self.process.poll() is None, f"serve.py exited {self.process.returncode}:\n{self.output()[-4000:]}"
            time.sleep(0.2)
        raise AssertionError(f"not {count} of {pattern!r} in {timeout:g} s:\n{self.output()[-4000:]}")

    def request(self, path: str, body: bytes | None = None, token: str | None = TOKEN, method: str | None = None):
        """(status, JSON answer) of one request."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.trust) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    def health(self) -> dict:
        status, answer = self.request("/healthz", token=None)
        assert status == 200, answer
        return answer


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """`python jobs/serve.py --model models:/NAME@champion` with its own local Ray (RAY_ADDRESS=local, as on a
    laptop): two replicas, a token, HTTPS, the alias read every second, small batches and a small body limit."""
    port, (cert, key) = free_port(), _certificate(tmp_path_factory.mktemp("tls"))
    env = {**job_env(tracking_uri=trained.tracking_uri), "RAY_ADDRESS": "local", TOKEN_ENV: TOKEN}
    env["RAY_DEDUP_LOGS"] = "0"  # each replica's lines as it prints them, not folded into "[repeated 2x]"
    command = [
        sys.executable, str(ROOT / "jobs/serve.py"), "--model", f"models:/{REGISTERED_MODEL}@champion",
        "--port", port, "--replicas", 2, "--follow-interval", 1, "--max-batch-size", 4, "--max-file-mb", MAX_FILE_MB,
        "--ssl-certfile", cert, "--ssl-keyfile", key,
    ]  # fmt: skip
    process = subprocess.Popen(
        [str(c) for c in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    running = Endpoint(process, f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=cert))
    try:
        running.wait_for(r"Ctrl-C or SIGTERM stops it", timeout=240)
        yield running
    finally:
        if process.poll() is None:
            process.kill()  # a test failed before the SIGTERM test: the Ray it started goes with the kill below
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):  # gone, or a zombie, meanwhile
                    if child.pid != process.pid and "ray" in " ".join(child.cmdline()).lower():
                        child.kill()
            process.wait(30)


@pytest.fixture(scope="module")
def champion(trained):
    client = MlflowClient(trained.tracking_uri, registry_uri=trained.tracking_uri)
    return client, str(client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version)


@pytest.mark.slow
def test_health_and_predict_name_the_version_of_the_alias(served, champion):
    _, version = champion
    assert f"endpoint: POST {served.url}/predict" in served.output()
    health = served.health()
    assert health["status"] == "ok" and health["error"] is None
    assert (health["model"], health["version"], health["following"]) == (
        REGISTERED_MODEL, version, f"models:/{REGISTERED_MODEL}@champion",
    )  # fmt: skip
    status, answer = served.request("/predict", IMAGES["wide.jpg"])
    assert status == 200, answer
    assert (answer["model"], answer["version"]) == (REGISTERED_MODEL, version)
    probs = [c["prob"] for c in answer["top5"]]
    assert len(answer["top5"]) == 4 and probs == sorted(probs, reverse=True)  # the session's model has 4 classes
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert TOKEN not in served.output()


@pytest.mark.slow
def test_the_endpoint_answers_the_probabilities_infer_py_writes_for_the_same_file_and_version(
    served, champion, tmp_path
):
    _, version = champion
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in IMAGES.items():
        (folder / name).write_bytes(data)
    done = call_job(
        "jobs/infer.py", "--model", f"models:/{REGISTERED_MODEL}/{version}", "--input", folder,
        "--output", tmp_path / "preds", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in inference.read_predictions(locate(str(tmp_path / "preds"))).to_pylist()}
    assert sorted(rows) == sorted(IMAGES)
    for name, data in IMAGES.items():
        status, answer = served.request("/predict", data)
        assert status == 200, (name, answer)
        assert answer["version"] == rows[name]["model_version"] == version
        assert [c["wnid"] for c in answer["top5"]] == rows[name]["top5_wnids"], name
        assert [c["name"] for c in answer["top5"]] == rows[name]["top5_names"], name
        np.testing.assert_allclose([c["prob"] for c in answer["top5"]], rows[name]["top5_probs"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_every_bad_request_is_a_4xx_with_its_reason_and_no_replica_is_lost(served):
    # A PNG whose header claims more pixels than the limit (its checksum fixed): refused from the header.
    small, side = _image(64, 64, 6, "PNG"), (int(MAX_PIXELS**0.5) + 100).to_bytes(4, "big")
    header = b"IHDR" + side + side + small[24:29]
    giant = small[:12] + header + zlib.crc32(header).to_bytes(4, "big") + small[33:]
    bad = {
        "empty": (b"", 400, "empty body"),
        "text": (b"this is text, not an image\n", 415, "not a JPEG, PNG or WebP image"),
        "gif": (_image(40, 40, 7, "GIF"), 415, "a GIF file, not a JPEG, PNG or WebP image"),
        "tiff": (_image(40, 40, 8, "TIFF"), 415, "a TIFF file"),
        "truncated": (IMAGES["wide.jpg"][: len(IMAGES["wide.jpg"]) // 2], 400, "cannot decode"),
        "too many bytes": (os.urandom(300_000), 413, "over the 0.25 MiB limit for one image"),
        "too many pixels": (giant, 413, "pixel limit"),
    }
    for what, (body, code, reason) in bad.items():
        status, answer = served.request("/predict", body)
        assert (status, reason in answer["error"]) == (code, True), (what, status, answer)
    assert served.request("/predict", IMAGES["wide.jpg"], token=None)[0] == 401
    assert served.request("/predict", IMAGES["wide.jpg"], token="wrong")[0] == 401
    assert served.request("/predict", token=None, method="GET")[0] == 405
    assert served.request("/nowhere", token=None)[0] == 404
    # Every replica is still the one that started, and answers.
    assert served.output().count("serving models:/") == 2, served.output()[-3000:]
    assert all(served.request("/predict", IMAGES["tall.jpeg"])[0] == 200 for _ in range(6))


def _load(served: Endpoint, stop: threading.Event, answers: list) -> None:
    """One client sending requests back to back: (status, version) of each, in order."""
    while not stop.is_set():
        try:
            status, answer = served.request("/predict", IMAGES["gray.jpg"])
        except Exception as exc:  # noqa: BLE001 -- a dropped connection is a failed request too
            answers.append((type(exc).__name__, None))
            continue
        answers.append((status, answer.get("version") if status == 200 else answer))


@pytest.mark.slow
def test_promoting_a_new_champion_under_load_switches_every_answer_with_no_failed_request(served, champion, trained):
    client, old = champion
    new = next(str(v) for v in (trained.first.model_version, trained.second.model_version) if str(v) != old)
    stop, clients = threading.Event(), [[] for _ in range(4)]
    threads = [threading.Thread(target=_load, args=(served, stop, answers)) for answers in clients]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        promoted = call_job(
            "jobs/registry.py", "promote", REGISTERED_MODEL, new, "--force", "--tracking-uri", trained.tracking_uri
        )
        assert promoted.returncode == 0, promoted.stderr
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(a and a[-1] == (200, new) for a in clients):
            time.sleep(0.5)
        time.sleep(2)  # and a little more traffic on the new version
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
        client.set_registered_model_alias(REGISTERED_MODEL, "champion", old)  # as the session's other tests expect
    answered = [a for answers in clients for a in answers]
    assert {status for status, _ in answered} == {200}, [a for a in answered if a[0] != 200][:5]
    assert {version for _, version in answered} == {old, new}
    for answers in clients:  # each client saw the old version first, and the new one at the end
        assert answers[0][1] == old and {version for _, version in answers[-3:]} == {new}, answers
    served.wait_for(rf"now serving version {new} of {REGISTERED_MODEL} \(was {old}\)", 10, count=2)  # each replica
    served.wait_for(rf"now serving version {old} of {REGISTERED_MODEL} \(was {new}\)", 30, count=2)  # and back


@pytest.mark.slow
def test_a_champion_that_fails_to_load_leaves_the_old_version_serving_and_says_why(served, champion, trained, tmp_path):
    """Running replicas keep the old version; a replica started meanwhile (here: one killed and replaced)
    serves the version the endpoint started with."""
    client, old = champion  # both replicas are back on it: the promotion test waits for that
    mlflow.set_tracking_uri(trained.tracking_uri)
    with mlflow.start_run(run_name="not-a-model") as run:
        (tmp_path / "readme.txt").write_text("no model here")
        mlflow.log_artifact(str(tmp_path / "readme.txt"), artifact_path="model")
    broken = client.create_model_version(REGISTERED_MODEL, f"{run.info.artifact_uri}/model", run.info.run_id)
    spec = f"models:/{REGISTERED_MODEL}@champion"
    try:
        client.set_registered_model_alias(REGISTERED_MODEL, "champion", broken.version)
        why = rf"models:/{REGISTERED_MODEL}/{broken.version} has no MLmodel file: it is not an MLflow model"
        failed = rf"version {broken.version} \({spec}\) failed to load, still serving version {old}: {why}"
        served.wait_for(failed, 60, count=2)  # each replica
        health = served.health()
        assert health["version"] == old and f"version {broken.version}" in health["error"]
        assert all(served.request("/predict", IMAGES["wide.jpg"])[1]["version"] == old for _ in range(4))
        replicas = [p for p in psutil.Process(served.process.pid).children(recursive=True)
                    if "ServeReplica" in " ".join(p.cmdline())]  # fmt: skip
        assert len(replicas) == 2, replicas
        replicas[0].kill()  # Serve starts another, which finds the alias on the broken version
        served.wait_for(rf"{spec} failed to load, serving models:/{REGISTERED_MODEL}/{old} \(the version the endpoint "
                        rf"started with\) until the alias moves: {spec} has no MLmodel file", 120)  # fmt: skip
        served.wait_for(rf"serving {spec}: version {old}", 30)
        answers = [served.request("/predict", IMAGES["wide.jpg"]) for _ in range(8)]
        assert {(status, answer["version"]) for status, answer in answers} == {(200, old)}, answers
    finally:
        client.set_registered_model_alias(REGISTERED_MODEL, "champion", old)
        client.delete_model_version(REGISTERED_MODEL, broken.version)


@pytest.mark.slow
def test_sigterm_deletes_the_application_and_stops_the_ray_it_started(served):
    ray_processes = [p for p in psutil.Process(served.process.pid).children(recursive=True)]
    assert ray_processes
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(90) == 0, served.output()[-3000:]
    served._reader.join(10)
    assert "stopping the endpoint" in served.output()
    assert "Deleting app ['alexnet']" in served.output()
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(served.url + "/healthz", timeout=5, context=served.trust)


@pytest.mark.slow
def test_on_a_cluster_a_submitted_endpoint_serves_a_second_of_its_name_is_refused_and_ray_job_stop_deletes_it(
    ray_cluster, trained
):
    """`ray job submit` onto the session's cluster (a joined cluster: Serve outlives the job there), and
    `ray job stop`, which kills the job 3 s after its SIGTERM (Ray's default): the application still goes."""
    from ray import serve
    from ray._private.worker import get_dashboard_url
    from ray.job_submission import JobStatus, JobSubmissionClient

    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    jobs = JobSubmissionClient(f"http://{get_dashboard_url()}", headers={"Authorization": f"Bearer {token}"})
    port, name = free_port(), endpoint.APP
    command = f"{sys.executable} {ROOT / 'jobs/serve.py'} --model models:/{REGISTERED_MODEL}@champion --port {port}"
    job = jobs.submit_job(entrypoint=command, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": trained.tracking_uri}})
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C or SIGTERM stops it" not in jobs.get_job_logs(job):
            assert jobs.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), jobs.get_job_logs(job)[-3000:]
            assert time.monotonic() < deadline, jobs.get_job_logs(job)[-3000:]
            time.sleep(1)
        assert "connected to the Ray cluster" in jobs.get_job_logs(job)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
            assert json.loads(answer.read())["model"] == REGISTERED_MODEL
        env = job_env(ray_cluster, trained.tracking_uri)
        spec = f"models:/{REGISTERED_MODEL}@champion"
        second = run_job("jobs/serve.py", "--model", spec, "--port", port, env=env, timeout=180)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"the Serve application {name!r} already answers at / on this cluster" in second.stderr
        elsewhere = run_job("jobs/serve.py", "--model", spec, "--port", free_port(), env=env, timeout=180)
        assert elsewhere.returncode == 2, elsewhere.stderr[-3000:]
        assert f"Ray Serve already runs on this cluster with port {port}" in elsewhere.stderr
        jobs.stop_job(job)
        deadline = time.monotonic() + 60
        while name in _applications(serve) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert name not in _applications(serve)
        while not jobs.get_job_status(job).is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert jobs.get_job_status(job) == JobStatus.STOPPED
    finally:
        if jobs.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING):
            jobs.stop_job(job)
        serve.shutdown()  # Serve's controller and proxy, if the job was killed before it stopped them


def _applications(serve) -> set[str]:
    """The Serve applications on the session's cluster; none once the job has stopped Serve itself."""
    try:
        return set(serve.status().applications)
    except ray.exceptions.RayActorError:  # the controller this process knew is gone: Serve was shut down
        return set()


def test_an_open_host_without_a_token_is_refused_and_a_token_is_never_shown(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    refused = call_job("jobs/serve.py", "--model", "models:/x@champion", "--host", "0.0.0.0")
    assert refused.returncode == 2
    assert "error: --host 0.0.0.0 lets other machines reach the endpoint" in refused.stderr
    assert "ALEXNET_SERVE_TOKEN" in refused.stderr and "--insecure" in refused.stderr
    empty = call_job("jobs/serve.py", "--model", "models:/x@champion", "--token-file", os.devnull)
    assert empty.returncode == 2 and f"--token-file {os.devnull} is empty" in empty.stderr
    half = call_job("jobs/serve.py", "--model", "models:/x@champion", "--ssl-certfile", os.devnull)
    assert half.returncode == 2 and "--ssl-certfile and --ssl-keyfile go together" in half.stderr
    assert endpoint.is_alias("models:/alexnet@champion") and not endpoint.is_alias("/runs/a@b/checkpoint")


def test_request_bodies_are_refused_with_the_status_that_names_the_fault():
    ref = loading.ModelRef(uri="models:/m/1", crop=64, wnids=["a"], run_id=None, tracking_uri="", image_size=72)
    cases = {
        b"": 400,
        b"GIF89a....": 415,
        b"II*\x00....": 415,
        b"plain text": 415,
        IMAGES["wide.jpg"][: len(IMAGES["wide.jpg"]) // 2]: 400,
    }
    for body, status in cases.items():
        with pytest.raises(endpoint.Refused) as refused:
            endpoint.request_views(body, ref, ten=False)
        assert refused.value.status == status, (body[:8], refused.value.reason)
    assert endpoint.request_views(IMAGES["alpha.png"], ref, ten=True).shape == (10, 64, 64, 3)
    assert endpoint.request_views(IMAGES["wide.jpg"], ref, ten=False).shape == (1, 64, 64, 3)
