"""The team server and its registry: a real `mlflow server`, two real training runs, the registry CLI."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REGISTERED_MODEL as MODEL
from conftest import S3_ENV, S3_SECRET, SECRET, call_job, free_port, job_env, run_job
from mlflow import MlflowClient
from PIL import Image

from pipeline import config
from pipeline.cluster import connection
from pipeline.data.shards import open_dataset
from pipeline.data.stats import PUBLISHED
from pipeline.data.transforms import eval_batch
from pipeline.errors import InputError
from pipeline.model import AlexNet, ImageClassifier
from pipeline.scoring import loading
from pipeline.tracking import mlflow_client, registry
from pipeline.tracking.registry import Registry, RegistryError
from pipeline.tracking.run_logger import RunLogger
from pipeline.tracking.server import MlflowServer, request_status
from pipeline.train import checkpoint, curves, registration


def registry_cli(uri: str, *args: str) -> subprocess.CompletedProcess:
    """`python jobs/registry.py --tracking-uri URI ARGS...`, its main() run in this process."""
    return call_job("jobs/registry.py", "--tracking-uri", uri, *args)


def registry_json(uri: str, *args: str):
    proc = registry_cli(uri, *args, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _at_chance(summary) -> bool:
    return summary.best["val_top1_error"] >= 0.75 - 1e-9  # 4 classes


@pytest.mark.slow
def test_registration_follows_the_promotion_rule_and_never_promotes_a_model_at_chance(trained):
    first, second, uri = trained.first, trained.second, trained.tracking_uri
    assert first.model_version == "1" and second.model_version == "2"
    for summary in (first, second):
        if _at_chance(summary):
            assert summary.alias == "challenger", summary.promotion
            assert "is no better than chance (0.7500 for 4 classes): not promoted" in summary.promotion
    if not _at_chance(first):
        assert (first.alias, first.promotion) == ("champion", "no champion yet")
    if not _at_chance(second):
        beats = second.best["val_top1_error"] < first.best["val_top1_error"]
        assert second.alias == ("champion" if beats else "challenger"), second.promotion
    aliases = Registry(uri).aliases(MODEL)
    assert aliases[second.alias] == "2"
    if second.alias == "challenger":
        assert aliases["champion"] == "1"  # by the rule, or by hand (the fixture) when v1 is at chance too


@pytest.mark.slow
def test_a_version_says_how_it_was_made(trained):
    first, uri = trained.first, trained.tracking_uri
    client = MlflowClient(uri)
    version = client.get_model_version(MODEL, first.model_version)
    assert f"val top-1 error {first.best['val_top1_error']:.4f}" in version.description
    assert "4 classes" in version.description and f"best epoch {first.best['epoch']} of 2" in version.description
    tags = version.tags
    for key in ("dataset_hash", "num_classes", "git_commit", "ray_version", "torch_version", "mlflow_version",
                "run_id", "profile", "val_top1_error", "val_top5_error"):  # fmt: skip
        assert tags.get(key), key
    assert tags["run_id"] == first.run_id and tags["num_classes"] == "4" and tags["torch_version"] == torch.__version__
    assert "Input: uint8 RGB crops" in client.get_registered_model(MODEL).description

    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"classes.json", "config.json", "stats.json", curves.CURVES_FILE} <= artifacts
    logged = client.download_artifacts(first.run_id, curves.CURVES_FILE)
    picture = Image.open(logged)
    assert picture.format == "PNG" and picture.size[0] > 500
    # The same picture beside the checkpoints, named in the summary.
    assert first.curves.endswith(curves.CURVES_FILE) and Path(first.curves).read_bytes() == Path(logged).read_bytes()
    info = mlflow.models.get_model_info(f"models:/{MODEL}/{first.model_version}")
    assert info.signature is not None and info.saved_input_example_info is not None


@pytest.mark.slow
def test_artifacts_go_through_the_server_into_its_own_store(trained, mlflow_server):
    first, uri = trained.first, trained.tracking_uri
    run = MlflowClient(uri).get_run(first.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: clients never touch the store
    stored = list(Path(mlflow_server.artifacts_destination).rglob(curves.CURVES_FILE))
    assert any(first.run_id in str(p) for p in stored)


@pytest.mark.slow
def test_credentials_never_reach_params_tags_or_logs(trained):
    first, uri, lines = trained.first, trained.tracking_uri, trained.lines
    run = MlflowClient(uri).get_run(first.run_id)
    logged = json.dumps([run.data.params, run.data.tags, MlflowClient(uri).get_model_version(MODEL, "1").tags])
    assert SECRET not in logged and SECRET not in "\n".join(lines)
    assert "MLflow run" in "\n".join(lines)  # the log was captured


@pytest.mark.slow
def test_system_metrics_are_logged_for_training_runs(trained):
    first, uri = trained.first, trained.tracking_uri
    metrics = MlflowClient(uri).get_run(first.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


@pytest.mark.slow
def test_the_champion_loads_by_alias_for_any_batch_size_and_predicts_like_its_checkpoint(
    trained, measured_shards, tmp_path
):
    first, second = trained.first, trained.second
    champion = first if Registry(trained.tracking_uri).aliases(MODEL)["champion"] == first.model_version else second
    mlflow.set_tracking_uri(trained.tracking_uri)
    loaded = mlflow.pytorch.load_model(f"models:/{MODEL}@champion", dst_path=str(tmp_path))
    net, _ = checkpoint.load_model(champion.checkpoint)
    stats = json.loads((measured_shards / "stats.json").read_text())
    reference = ImageClassifier(net, stats["mean"], stats["std"]).eval()
    rows = pq.read_table(measured_shards / "val").to_pydict()
    for batch in (1, 5, 24):
        images = eval_batch(
            {"image": np.array(rows["image"][:batch], dtype=object), "label": np.array(rows["label"][:batch])}, 64
        )["image"]
        with torch.no_grad():
            expected = reference(torch.from_numpy(images))
        torch.testing.assert_close(loaded(torch.from_numpy(images)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_list_show_and_diff_read_the_registry(trained):
    first, second, uri = trained.first, trained.second, trained.tracking_uri
    models = {m["name"]: m for m in registry_json(uri, "list")}
    entry = models[MODEL]
    assert entry["latest"] == "2" and entry["versions"] == 2
    assert entry["champion"]["version"] == Registry(uri).aliases(MODEL)["champion"]

    shown = registry_json(uri, "show", MODEL)
    assert [v["version"] for v in shown["versions"]] == ["2", "1"]
    by_version = {v["version"]: v for v in shown["versions"]}
    assert by_version["2"]["aliases"] == [second.alias]  # aliases read from the model, not search_model_versions
    assert by_version["1"]["val_top1_error"] == pytest.approx(first.best["val_top1_error"], abs=1e-4)
    assert by_version["1"]["run_id"] == first.run_id and by_version["1"]["dataset_hash"]

    diff = registry_json(uri, "diff", MODEL, "1", "2")
    rows = {(r["section"], r["key"]): r for r in diff["rows"]}
    assert rows[("config", "seed")] == {"section": "config", "key": "seed", "a": "0", "b": "1", "differs": True}
    assert rows[("config", "workers")] == {"section": "config", "key": "workers", "a": "2", "b": "1", "differs": True}
    assert rows[("config", "batch_size")]["differs"] is False
    assert rows[("provenance", "dataset_hash")]["differs"] is False

    table = registry_cli(uri, "diff", MODEL, "v1", "@" + second.alias)
    assert table.returncode == 0, table.stderr
    seed_line = next(line for line in table.stdout.splitlines() if " seed " in f" {line} ")
    assert seed_line.startswith("*") and "config" in seed_line
    listing = run_job("jobs/registry.py", "show", MODEL, env=job_env(tracking_uri=uri))  # the server from the env
    assert listing.returncode == 0 and "top-1 err" in listing.stdout and f"@{second.alias}" in listing.stdout


@pytest.mark.slow
def test_promote_and_rollback_move_the_champion(trained):
    uri = trained.tracking_uri
    before = Registry(uri).aliases(MODEL)["champion"]
    other = "1" if before == "2" else "2"
    error = Registry(uri).version(MODEL, other).metric("val_top1_error")
    if error >= 0.75 - 1e-9:  # at chance: only someone who says so makes it the champion
        refused = registry_cli(uri, "promote", MODEL, other)
        assert (
            refused.returncode == 2
            and f"v{other}: val_top1_error {error:.4f} is no better than chance" in refused.stderr
        )
        assert "pass --force" in refused.stderr and Registry(uri).aliases(MODEL)["champion"] == before
    promoted = registry_json(uri, "promote", MODEL, other, "--force")
    assert promoted["aliases"] == ["champion"]  # a promoted challenger is no longer @challenger
    assert Registry(uri).aliases(MODEL)["champion"] == other
    rolled = registry_json(uri, "rollback", MODEL)
    assert (rolled["from"], rolled["to"]) == (other, before)
    assert Registry(uri).aliases(MODEL)["champion"] == before
    proc = registry_cli(uri, "promote", MODEL, other, "--alias", "staging")
    assert proc.returncode == 0 and f"v{other} is now @staging" in proc.stdout
    assert Registry(uri).aliases(MODEL)["staging"] == other


@pytest.mark.parametrize(
    "args, message",
    [
        (("show", "no-such-model"), "no registered model named 'no-such-model'"),
        (("diff", MODEL, "1", "99"), f"model '{MODEL}' has no version '99' (versions: "),
        (("diff", MODEL, "1", "@gold"), f"model '{MODEL}' has no alias @gold (@champion"),
        (("promote", MODEL, "42"), f"model '{MODEL}' has no version '42'"),
    ],
)
@pytest.mark.slow
def test_unknown_names_versions_and_aliases_are_clear_errors(trained, args, message):
    proc = registry_cli(trained.tracking_uri, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unreachable_server_is_named_by_the_registry_cli_and_refused_by_training(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    proc = registry_cli(dead, "list")
    assert proc.returncode == 2 and f"the MLflow tracking server at {dead} does not answer" in proc.stderr
    proc = run_job("jobs/train.py", "--storage-path", tmp_path / "runs", env=job_env(tracking_uri=dead), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not answer" in proc.stderr and "--no-tracking" in proc.stderr
    assert "started a local Ray" not in proc.stdout and not (tmp_path / "runs").exists()  # no cluster work


@pytest.mark.parametrize("store", [pytest.param("server", marks=pytest.mark.slow), "sqlite"])  # slow: a server
def test_promotion_compares_val_error_only_on_the_same_dataset(store, request, tmp_path):
    """Versions registered directly, with the tags training gives them, on a server and on a sqlite store."""
    uri = request.getfixturevalue("mlflow_server").url if store == "server" else f"sqlite:///{tmp_path / 'm.db'}"
    client, registry, name = MlflowClient(uri), Registry(uri, settle_s=0.05), f"alexnet-promotion-rule-{store}"
    experiment = client.create_experiment(f"promotion-{store}", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.create_registered_model(name)

    def register(error: float, dataset: str) -> str:
        tags = {"val_top1_error": str(error), "dataset_hash": dataset}
        return client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version

    decisions = []
    for error, dataset in ((0.5, "a"), (0.4, "a"), (0.45, "a"), (0.1, "b")):
        version = register(error, dataset)
        decision = registry.settle(name, version, "if-better")
        decisions.append((str(version), decision.alias))
    assert decisions == [("1", "champion"), ("2", "champion"), ("3", "challenger"), ("4", "challenger")]
    assert registry.aliases(name) == {"champion": "2", "challenger": "4"}
    assert registry.history(name) == ["1", "2"]
    assert registry.decide(name, register(0.9, "a"), "always").alias == "champion"
    assert registry.decide(name, register(0.0, "a"), "never").alias == "challenger"
    registry.promote(name, "4")  # the challenger, promoted by hand, is champion and no longer challenger
    assert registry.aliases(name) == {"champion": "4"} and registry.history(name) == ["1", "2", "4"]
    assert registry.rollback(name) == ("4", "2")
    assert registry.rollback(name) == ("2", "1")
    with pytest.raises(RegistryError, match="v1 is the first champion; nothing to roll back to"):
        registry.rollback(name)


@pytest.mark.parametrize("store", [pytest.param("server", marks=pytest.mark.slow), "sqlite"])  # slow: a server
def test_two_jobs_promoting_at_once_leave_the_better_champion_and_every_champion_in_the_history(
    store, request, tmp_path
):
    """Two registrations settle at the same moment, each through its own client, as two jobs would."""
    uri = request.getfixturevalue("mlflow_server").url if store == "server" else f"sqlite:///{tmp_path / 'm.db'}"
    client, name = MlflowClient(uri), f"alexnet-concurrent-{store}"
    run_id = client.create_run(client.create_experiment(f"concurrent-{store}")).info.run_id
    client.create_registered_model(name)

    def register(error: float) -> str:
        tags = {"val_top1_error": str(error), "dataset_hash": "a"}
        return str(client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version)

    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    Registry(uri).settle(name, register(0.6), "if-better")  # v1: the champion both jobs find
    for round_, errors in enumerate(((0.5, 0.4), (0.2, 0.3), (0.15, 0.1))):
        worse, better = sorted(errors, reverse=True)
        versions = {error: register(error) for error in errors}
        start, decisions = threading.Barrier(2), {}

        threads = [threading.Thread(target=_settle_at, args=(uri, name, versions, error, start, decisions))
                   for error in errors]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        registry = Registry(uri)
        assert registry.aliases(name)["champion"] == versions[better], (round_, decisions)
        assert decisions[better] == "champion"
        history = registry.history(name)
        # The worse one was champion only if it settled first; then the history has both, in that order.
        expected = [versions[worse], versions[better]] if decisions[worse] == "champion" else [versions[better]]
        assert history[-len(expected) :] == expected and len(history) == len(set(history)), (history, decisions)
        assert "promotion_lock" not in client.get_registered_model(name).tags
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == retries  # the lock's settings, not left behind


def _settle_at(uri: str, name: str, versions: dict, error: float, start: threading.Barrier, decisions: dict) -> None:
    """One job's registration end: its own client, released at the same moment as the other's."""
    registry = Registry(uri, settle_s=0.5)
    start.wait()
    decisions[error] = registry.settle(name, versions[error], "if-better").alias


def test_workers_get_where_mlflow_and_s3_are_and_credentials_only_where_named(monkeypatch):
    # The session's shell holds MLflow and AWS credentials (conftest), as a user's does.
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"AWS_REGION": "x"}}}))
    env = mlflow_client.worker_env("https://bob:pw@10.0.0.5:5000")
    assert env["MLFLOW_TRACKING_URI"] == "https://10.0.0.5:5000"  # a password in the URI is a credential too
    assert env["AWS_ENDPOINT_URL"] == S3_ENV["AWS_ENDPOINT_URL"]
    assert not set(env) & set(mlflow_client.CREDENTIALS_ENV), env
    assert SECRET not in json.dumps(env) and S3_SECRET not in json.dumps(env)
    assert "AWS_REGION" not in env  # Ray refuses a driver runtime env repeating a key of the job's
    note = mlflow_client.credentials_note()
    assert "MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in note
    assert SECRET not in note and "--forward-env" in note

    named = connection.env_names(" MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD ,")
    env = mlflow_client.worker_env("https://10.0.0.5:5000", named)
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("alice", SECRET)
    assert "AWS_SECRET_ACCESS_KEY" not in env and "MLFLOW_TRACKING_PASSWORD" not in mlflow_client.credentials_note(
        named
    )
    with pytest.raises(InputError, match="names NOT_SET_HERE, which this environment does not set"):
        mlflow_client.worker_env(None, ("NOT_SET_HERE",))
    with pytest.raises(InputError, match="'B=1' is not the name of an environment variable"):
        connection.env_names("A,B=1")
    assert mlflow_client.redact("https://bob:pw@mlflow.example.com:443/x") == "https://mlflow.example.com:443/x"


@pytest.mark.slow  # a server of its own
def test_the_server_proxies_artifacts_to_s3_for_clients_without_credentials(s3_server, tmp_path, monkeypatch):
    s3_server.create_dir("team-mlflow")
    with MlflowServer(tmp_path / "server", artifacts_destination="s3://team-mlflow/artifacts") as server:
        for key in [k for k in os.environ if k.startswith("AWS_")]:  # the server has them, this client not
            monkeypatch.delenv(key)
        client = MlflowClient(server.url)
        run_id = client.create_run(client.create_experiment("proxied")).info.run_id
        client.log_text(run_id, "hello", "notes/hello.txt")
    from pyarrow.fs import FileSelector

    stored = [i.path for i in s3_server.get_file_info(FileSelector("team-mlflow/artifacts", recursive=True))]
    assert any(p.endswith("notes/hello.txt") for p in stored), stored


@pytest.mark.slow
def test_the_papers_full_width_alexnet_registers_and_loads_for_any_batch_size(tiny_shards, tmp_path):
    """What training registers, at fc6/fc7 4096 (244 MB of weights), on a sqlite store: the light
    runs that the other tests share prove the plumbing, this one the paper's size."""
    uri, name = f"sqlite:///{tmp_path / 'm.db'}", "alexnet-full-width"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(name, str(tmp_path / "artifacts"))).info.run_id
    data = open_dataset(str(tiny_shards))
    torch.manual_seed(0)
    model = ImageClassifier(AlexNet(data.num_classes), PUBLISHED.mean, PUBLISHED.std).eval()
    rows = pq.read_table(tiny_shards / "val").slice(0, 5).to_pydict()
    images = eval_batch({"image": np.array(rows["image"], dtype=object), "label": np.array(rows["label"])}, 64)["image"]
    cfg = config.resolve("sample", model_name=name)
    global_uri, env_uri = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    best = {"epoch": 1, "val_top1_error": 0.5, "val_top5_error": 0.0}
    version = registration.log_and_register(uri, run_id, model, images[:2], cfg, data, best)
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == (global_uri, env_uri), "left as it was"
    loaded = loading.load(loading.resolve(f"models:/{name}/{version}", uri))
    assert loaded.state_dict()["net.classifier.1.weight"].shape == (4096, 9216)
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.from_numpy(images[:batch])
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_session_server_asks_every_request_to_log_in(trained, mlflow_server, monkeypatch):
    # Both training runs logged, registered and promoted through it with the session's login.
    url = mlflow_server.url
    assert MlflowClient(url).get_run(trained.first.run_id).info.status == "FINISHED"
    api = f"{url}/api/2.0/mlflow/registered-models/get?name={MODEL}"
    assert request_status(api) == 401
    assert request_status(api, "alice", "not-the-password") == 401
    assert request_status(api, "alice", SECRET) == 200
    assert request_status(f"{url}/health") == 200  # load balancers' checks need no login

    # A train worker whose node logs in with a password the server does not know: it says so and what
    # to do, keeps the epoch, and sends it once the login works.
    client = MlflowClient(url)
    run_id = client.create_run(client.create_experiment("refused-login")).info.run_id
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # what RunLogger sets in a train worker
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    said: list[str] = []
    logger = RunLogger(run_id, url, said.append)
    logger.log_epoch(1, {"val_top1_error": 0.5})
    assert len(said) == 1 and "refuses this node's login (HTTP 401)" in said[0], said
    assert "--forward-env MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD" in said[0]
    assert [item["step"] for item in logger.pending()] == [1]
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    assert logger.flush() == 0
    assert [m.step for m in client.get_metric_history(run_id, "val_top1_error")] == [1]

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    refused = registry_cli(url, "list")
    assert refused.returncode == 2 and "MLFLOW_TRACKING_PASSWORD" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr


def test_the_server_job_refuses_an_open_host_without_auth_and_auth_without_a_login(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    opened = run_job("jobs/mlflow_server.py", "--host", "0.0.0.0", "--dir", tmp_path / "open", env=env, timeout=60)
    assert opened.returncode == 2 and "without --auth anyone who reaches the port" in opened.stderr, opened.stderr
    assert "--insecure" in opened.stderr and not (tmp_path / "open").exists()
    # Served to other nodes, the model files must not live on a disk `ray down` destroys.
    on_head = run_job("jobs/mlflow_server.py", "--host", "0.0.0.0", "--auth", "--dir", tmp_path / "head", env=env)
    assert on_head.returncode == 2 and "loses with `ray down`" in on_head.stderr, on_head.stderr
    assert "--artifacts-destination s3://BUCKET/PREFIX" in on_head.stderr and not (tmp_path / "head").exists()
    nobody = run_job("jobs/mlflow_server.py", "--auth", "--port", "0", "--dir", tmp_path / "auth", env=env, timeout=60)
    assert nobody.returncode == 2 and "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in nobody.stderr
    assert "Traceback" not in nobody.stderr + opened.stderr
    # A --dir of other files: the server's state (password hashes among it) needs a folder of its own.
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    shared = run_job("jobs/mlflow_server.py", "--port", "0", "--dir", tmp_path / "home", env=env, timeout=60)
    assert shared.returncode == 2 and "holds files besides the server's (notes.txt)" in shared.stderr, shared.stderr
    assert oct((tmp_path / "home").stat().st_mode & 0o777) == "0o755"  # its mode left as it was


class _FailingWrites:
    """A real HTTP server in front of an MLflow server: every request passes through but the writes of
    registered models' tags, which answer 503 (a server in trouble). A context manager giving its URL."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import urllib.error
        import urllib.request

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                if "registered-models/set-tag" in self.path or "registered-models/delete-tag" in self.path:
                    self._answer(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "writes are off"}')
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                request = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=10) as reply:
                        status, body = reply.status, reply.read()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read()
                self._answer(status, body)

            do_POST = do_PATCH = do_DELETE = do_GET

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow  # the session's server
def test_the_promotion_lock_gives_up_by_its_deadline_when_the_server_fails_its_writes(trained, mlflow_server):
    with _FailingWrites(mlflow_server.url) as url:
        started = time.monotonic()
        with pytest.raises(RegistryError, match=f"model '{MODEL}': could not take the promotion lock in 4s") as stuck:
            with Registry(url).promotion_lock(MODEL, timeout=4):
                pass
        elapsed = time.monotonic() - started
        message = str(stuck.value)
        assert "503" in message and f"`python jobs/registry.py unlock {MODEL}`" in message
        # The CLI's promote, with its own deadline: exit 2 with the same message, no hang, no traceback.
        started = time.monotonic()
        proc = run_job("jobs/registry.py", "--tracking-uri", url, "promote", MODEL, "1", "--wait", "3", "--force",
                       timeout=120)  # fmt: skip
        cli_elapsed = time.monotonic() - started
    bound = registry.LOCK_SETTLE_S + 2 * registry.LOCK_REQUEST_TIMEOUT_S + 2  # the last try's requests, the sleep
    assert elapsed < 4 + bound, elapsed
    assert proc.returncode == 2 and "could not take the promotion lock in 3s" in proc.stderr, proc.stderr[-2000:]
    assert cli_elapsed < 3 + bound + 10  # + the job's start-up
    assert registry.LOCK_TAG not in MlflowClient(mlflow_server.url).get_registered_model(MODEL).tags


@pytest.mark.slow  # the session's server
def test_a_login_that_may_not_edit_the_model_is_refused_at_once_not_waited_on(trained, mlflow_server, monkeypatch):
    url = mlflow_server.url
    login = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    create = urllib.request.Request(
        f"{url}/api/2.0/mlflow/users/create", data=json.dumps({"username": "reader", "password": "r3ader-password"}).encode(),
        headers={"Authorization": f"Basic {login}", "Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    with urllib.request.urlopen(create, timeout=30) as created:  # MLflow's default permission for new users: READ
        assert created.status == 200
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "r3ader-password")
    started = time.monotonic()
    with pytest.raises(RegistryError, match=f"refuses user 'reader' a change to model '{MODEL}' \\(HTTP 403\\)"):
        Registry(url).promote(MODEL, "1", force=True)
    assert time.monotonic() - started < 10


def test_a_lock_another_job_holds_is_waited_for_until_the_deadline_and_the_cli_clears_a_stale_one(tmp_path):
    uri, name = f"sqlite:///{tmp_path / 'm.db'}", "alexnet-held"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("held")).info.run_id
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version
    client.set_registered_model_tag(name, registry.LOCK_TAG, f"0123abcd {time.time():.3f}")  # a live holder
    with pytest.raises(RegistryError, match="another promotion has held the lock for over 1s") as held:
        Registry(uri, settle_s=0.05).promote(name, version, lock_timeout=1)
    assert f"`python jobs/registry.py unlock {name}` clears it" in str(held.value)
    cleared = registry_cli(uri, "unlock", name)
    assert cleared.returncode == 0 and f"{name}: promotion lock cleared (it held '0123abcd" in cleared.stdout
    assert Registry(uri, settle_s=0.05).promote(name, version).aliases == ["champion"]
    assert registry_cli(uri, "unlock", name).stdout.strip() == f"{name}: no promotion lock"


@pytest.mark.slow  # starts servers of its own
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_the_server_job_stopped_while_it_starts_leaves_no_server_behind(tmp_path, stop):
    import psutil

    state = tmp_path / "state"
    job = subprocess.Popen([sys.executable, "jobs/mlflow_server.py", "--port", "0", "--dir", str(state)],
                           cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline, children = time.monotonic() + 60, []
    while not children and time.monotonic() < deadline:  # the server process exists; it does not answer yet
        children = psutil.Process(job.pid).children(recursive=True)
        time.sleep(0.05)
    assert children and not (state / "server.log").read_text().count("Listening at"), "started too late to test"
    job.send_signal(stop)
    job.wait(60)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive
    assert oct(state.stat().st_mode & 0o777) == "0o700"  # users' password hashes and the runs: this user's alone
