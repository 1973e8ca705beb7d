"""The team server and its registry: a real `mlflow server`, two real training runs, the registry CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipeline import checkpoint, tracking
from pipeline.data.stats import PUBLISHED
from pipeline.data.transforms import eval_batch
from pipeline.mlflow_server import MlflowServer, free_port
from pipeline.model import ImageClassifier
from pipeline.registry import Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]
from conftest import REGISTERED_MODEL as MODEL
from conftest import SECRET


def registry_cli(uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs/registry.py"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def registry_json(uri: str, *args: str):
    proc = registry_cli(uri, *args, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_the_first_version_becomes_champion_and_the_second_follows_the_rule(two_runs):
    first, second, uri, _ = two_runs
    assert (first.model_version, first.alias, first.promotion) == ("1", "champion", "no champion yet")
    beats = second.best["val_top1_error"] < first.best["val_top1_error"]
    assert second.alias == ("champion" if beats else "challenger"), second.promotion
    aliases = Registry(uri).aliases(MODEL)
    assert aliases[second.alias] == "2"
    if not beats:
        assert aliases["champion"] == "1" and "does not beat champion v1" in second.promotion


def test_a_version_says_how_it_was_made(two_runs):
    first, _, uri, _ = two_runs
    client = MlflowClient(uri)
    version = client.get_model_version(MODEL, first.model_version)
    assert f"val top-1 error {first.best['val_top1_error']:.4f}" in version.description
    assert "4 classes" in version.description and "best epoch 1 of 1" in version.description
    tags = version.tags
    for key in ("dataset_hash", "num_classes", "git_commit", "ray_version", "torch_version", "mlflow_version",
                "run_id", "profile", "val_top1_error", "val_top5_error"):  # fmt: skip
        assert tags.get(key), key
    assert tags["run_id"] == first.run_id and tags["num_classes"] == "4" and tags["torch_version"] == torch.__version__
    assert "Input: uint8 RGB crops" in client.get_registered_model(MODEL).description

    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"classes.json", "config.json", "stats.json", tracking.CURVES_FILE} <= artifacts
    curves = Image.open(client.download_artifacts(first.run_id, tracking.CURVES_FILE))
    assert curves.format == "PNG" and curves.size[0] > 500
    stats = json.loads(Path(client.download_artifacts(first.run_id, "stats.json")).read_text())
    assert stats["eigenvalues"] == pytest.approx(PUBLISHED.eigenvalues)  # tiny_shards has no stats.json
    info = mlflow.models.get_model_info(f"models:/{MODEL}/{first.model_version}")
    assert info.signature is not None and info.saved_input_example_info is not None


def test_artifacts_go_through_the_server_into_its_own_store(two_runs, mlflow_server):
    first, _, uri, _ = two_runs
    run = MlflowClient(uri).get_run(first.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: clients never touch the store
    stored = list(Path(mlflow_server.artifacts_destination).rglob(tracking.CURVES_FILE))
    assert any(first.run_id in str(p) for p in stored)


def test_credentials_never_reach_params_tags_or_logs(two_runs):
    first, _, uri, lines = two_runs
    run = MlflowClient(uri).get_run(first.run_id)
    logged = json.dumps([run.data.params, run.data.tags, MlflowClient(uri).get_model_version(MODEL, "1").tags])
    assert SECRET not in logged and SECRET not in "\n".join(lines)
    assert "MLflow run" in "\n".join(lines)  # the log was captured


def test_system_metrics_are_logged_for_training_runs(two_runs):
    first, _, uri, _ = two_runs
    metrics = MlflowClient(uri).get_run(first.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_the_champion_loads_by_alias_for_any_batch_size_and_predicts_like_its_checkpoint(
    two_runs, tiny_shards, tmp_path
):
    first, second, uri, _ = two_runs
    champion = first if first.alias == "champion" and second.alias != "champion" else second
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"models:/{MODEL}@champion", dst_path=str(tmp_path))
    net, _ = checkpoint.load_model(champion.checkpoint)
    reference = ImageClassifier(net, PUBLISHED.mean, PUBLISHED.std).eval()
    rows = pq.read_table(tiny_shards / "val").to_pydict()
    for batch in (1, 5, 24):
        images = eval_batch(
            {"image": np.array(rows["image"][:batch], dtype=object), "label": np.array(rows["label"][:batch])}, 64
        )["image"]
        with torch.no_grad():
            expected = reference(torch.from_numpy(images))
        torch.testing.assert_close(loaded(torch.from_numpy(images)), expected, rtol=1e-4, atol=1e-4)


def test_list_show_and_diff_read_the_registry(two_runs):
    first, second, uri, _ = two_runs
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
    assert rows[("config", "epochs")]["differs"] is False
    assert rows[("provenance", "dataset_hash")]["differs"] is False

    table = registry_cli(uri, "diff", MODEL, "v1", "@" + second.alias)
    assert table.returncode == 0, table.stderr
    seed_line = next(line for line in table.stdout.splitlines() if " seed " in f" {line} ")
    assert seed_line.startswith("*") and "config" in seed_line
    listing = registry_cli(uri, "show", MODEL)
    assert listing.returncode == 0 and "top-1 err" in listing.stdout and f"@{second.alias}" in listing.stdout


def test_promote_and_rollback_move_the_champion(two_runs):
    _, _, uri, _ = two_runs
    before = Registry(uri).aliases(MODEL)["champion"]
    other = "1" if before == "2" else "2"
    promoted = registry_json(uri, "promote", MODEL, other)
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
def test_unknown_names_versions_and_aliases_are_clear_errors(two_runs, args, message):
    proc = registry_cli(two_runs[2], *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unreachable_server_is_named_by_the_registry_cli_and_refused_by_training(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    proc = registry_cli(dead, "list")
    assert proc.returncode == 2 and f"the MLflow tracking server at {dead} does not answer" in proc.stderr
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/train.py"), "--storage-path", str(tmp_path / "runs")],
        env={**env, "MLFLOW_TRACKING_URI": dead},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not answer" in proc.stderr and "--no-tracking" in proc.stderr
    assert "started a local Ray" not in proc.stdout and not (tmp_path / "runs").exists()  # no cluster work


@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_promotion_compares_val_error_only_on_the_same_dataset(store, request, tmp_path):
    """Versions registered directly, with the tags training gives them, on a server and on a sqlite store."""
    uri = request.getfixturevalue("mlflow_server").url if store == "server" else f"sqlite:///{tmp_path / 'm.db'}"
    client, registry, name = MlflowClient(uri), Registry(uri), f"alexnet-promotion-rule-{store}"
    experiment = client.create_experiment(f"promotion-{store}", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.create_registered_model(name)

    def register(error: float, dataset: str) -> str:
        tags = {"val_top1_error": str(error), "dataset_hash": dataset}
        return client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version

    decisions = []
    for error, dataset in ((0.5, "a"), (0.4, "a"), (0.45, "a"), (0.1, "b")):
        version = register(error, dataset)
        decision = registry.decide(name, version, "if-better")
        registry.promote(name, version, decision.alias, decision.reason)
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


def test_worker_env_carries_tracking_settings_but_not_what_the_job_already_sets(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"AWS_REGION": "x"}}}))
    env = tracking.worker_env("http://10.0.0.5:5000")
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000" and env["MLFLOW_TRACKING_TOKEN"] == "t0ken"
    assert "AWS_REGION" not in env  # Ray refuses a driver runtime env repeating a key of the job's
    assert tracking.redact("https://bob:pw@mlflow.example.com:443/x") == "https://mlflow.example.com:443/x"


def test_the_server_proxies_artifacts_to_s3_for_clients_without_credentials(s3_server, tmp_path):
    s3_server.create_dir("team-mlflow")
    with MlflowServer(tmp_path / "server", artifacts_destination="s3://team-mlflow/artifacts") as server:
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        client_env["MLFLOW_TRACKING_URI"] = server.url
        script = (
            "import mlflow\n"
            "with mlflow.start_run() as run:\n"
            "    mlflow.log_text('hello', 'notes/hello.txt')\n"
            "print(run.info.run_id)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], env=client_env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    from pyarrow.fs import FileSelector

    stored = [i.path for i in s3_server.get_file_info(FileSelector("team-mlflow/artifacts", recursive=True))]
    assert any(p.endswith("notes/hello.txt") for p in stored), stored


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _epoch_logged(client: MlflowClient, experiment: str, epoch: int):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    if runs and epoch in {m.step for m in client.get_metric_history(runs[0].info.run_id, "val_top1_error")}:
        return runs[0].info.run_id
    return None


def _checkpointed_epoch(run_dir: Path) -> int:
    epochs = [json.loads(p.read_text())["epoch"] for p in run_dir.glob("checkpoint_*/meta.json")]
    return max(epochs, default=0)


def test_a_server_outage_mid_run_loses_no_metrics(ray_cluster, tiny_shards, tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": server.url,
    }
    command = [
        sys.executable, str(ROOT / "jobs/train.py"), "--data", str(tiny_shards), "--epochs", "3", "--batch-size", "4",
        "--storage-path", str(runs), "--name", "outage", "--experiment", "outage", "--model-name", "alexnet-outage",
    ]  # fmt: skip
    log = tmp_path / "job.log"  # a file, not a pipe: nobody reads a pipe while the test waits
    job = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(server.url)
        run_id = _wait_for(lambda: _epoch_logged(client, "outage", 1), 240, "epoch 1 in MLflow")
        server.stop()  # the server goes away after epoch 1 ...
        _wait_for(lambda: _checkpointed_epoch(runs / "outage") >= 2, 240, "epoch 2's checkpoint")
        server = MlflowServer(tmp_path / "server", port=server.port).start()  # ... and comes back after epoch 2
        job.wait(timeout=400)
        output = log.read_text()
        assert job.returncode == 0, output[-3000:]
        assert "is unreachable" in output and "training goes on" in output
        assert "epoch(s) of metrics were sent late; none lost" in output
        for key in ("train_loss", "train_top1_error", "train_top5_error", "val_top1_error", "val_top5_error"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3], key
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_model_version_by_alias("alexnet-outage", "champion").run_id == run_id
    finally:
        job.kill()
        server.stop()
