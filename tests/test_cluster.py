"""The cluster files, the job package, and a real autoscaling cluster on this machine.

cluster/local.yaml's fake multi-node cluster runs here as the clouds' clusters would: a head with
no CPUs for tasks, CPU and mock-GPU worker types that start at zero. A training job submitted with
`ray job submit` can only run once the autoscaler has launched worker nodes; it trains, registers
its model, and the nodes go away again after the idle timeout. A job on a fixed cluster that could
never be fed is refused, or explained while it waits and stopped as `ray job stop` stops it (the
session's own Ray, joined through RAY_ADDRESS). `--resume`: tests/test_fault_tolerance.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import FC_WIDTH, job_env, run_job
from mlflow import MlflowClient

from pipeline.data.stats import compute_stats

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
GCS_PORT = 6379  # the fake multi-node provider joins new nodes to this port (DESIGN: fake multinode)


def _pinned(package: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(rf"^{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", line.strip())
        if match:
            return match.group(2)
    raise AssertionError(f"{package} is not pinned in requirements.txt")


# --- cluster launcher YAMLs ----------------------------------------------------------------------


def test_aws_yaml_validates_against_rays_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` does before it launches anything

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs no training or data tasks"
    assert any("--num-cpus=0" in command for command in raw["head_start_ray_commands"])
    workers = {name: spec for name, spec in types.items() if name != raw["head_node_type"]}
    gpu = [spec for spec in workers.values() if spec["resources"].get("GPU")]
    cpu = [spec for spec in workers.values() if not spec["resources"].get("GPU")]
    assert gpu and cpu and all(spec["min_workers"] == 0 and spec["max_workers"] > 0 for spec in workers.values())
    assert 0 < raw["idle_timeout_minutes"] <= 30

    # requirements.txt reaches every node and pins the Ray that the launcher and the nodes run
    assert raw["file_mounts"]["~/alexnet/requirements.txt"] == "requirements.txt"
    assert any("pip install" in c and "~/alexnet/requirements.txt" in c for c in raw["setup_commands"])
    commands = " ".join(raw["setup_commands"] + raw["head_setup_commands"] + raw["worker_setup_commands"])
    assert not re.search(r"pip install[^;&]*\bray\b", commands), "Ray comes from requirements.txt only"
    assert _pinned("ray") == __import__("ray").__version__, "the launcher's Ray is the cluster's"

    # S3 through an instance profile on every node; no keys, no dashboard open to the world
    text = (CLUSTER / "aws.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY\s*[:=]", text)
    assert all("IamInstanceProfile" in spec["node_config"] for spec in types.values())
    assert "dashboard-host=0.0.0.0" not in text and "8265" not in json.dumps(raw["provider"])
    # token authentication on every node
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    # every node in the one security group cluster/aws_security_group.py makes (not Ray's, SSH open to all)
    groups = [spec["node_config"]["SecurityGroupIds"] for spec in types.values()]
    assert len(groups[0]) == 1 and all(g == groups[0] for g in groups)
    assert "aws_security_group.py --ssh-cidr" in text


def test_the_aws_security_group_opens_ssh_to_the_given_network_only(s3_server):
    """cluster/aws_security_group.py against moto's EC2 (the session's S3 server serves every AWS API)."""
    import boto3

    made = run_job("cluster/aws_security_group.py", "--ssh-cidr", "203.0.113.7", "--region", "us-west-2", timeout=60)
    assert made.returncode == 0, made.stderr[-2000:]
    group_id = made.stdout.strip()
    ec2 = boto3.client("ec2", region_name="us-west-2")  # AWS_ENDPOINT_URL: the moto server
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    rules = group["IpPermissions"]
    opened = [r["CidrIp"] for rule in rules for r in rule.get("IpRanges", [])]
    assert opened == ["203.0.113.7/32"]
    (ssh,) = [rule for rule in rules if rule.get("IpRanges")]
    assert (ssh["IpProtocol"], ssh["FromPort"], ssh["ToPort"]) == ("tcp", 22, 22)
    assert any(pair["GroupId"] == group_id for rule in rules for pair in rule.get("UserIdGroupPairs", []))

    again = run_job("cluster/aws_security_group.py", "--ssh-cidr", "203.0.113.7/32", "--region", "us-west-2")
    assert again.returncode == 0 and again.stdout.strip() == group_id  # found, not made twice
    other = run_job("cluster/aws_security_group.py", "--ssh-cidr", "198.51.100.0/24", "--region", "us-west-2")
    assert other.returncode == 1 and "already exists with SSH from ['203.0.113.7/32']" in other.stderr
    world = run_job("cluster/aws_security_group.py", "--ssh-cidr", "0.0.0.0/0", "--region", "us-west-2")
    assert world.returncode == 2 and "the whole internet" in world.stderr


def test_local_yaml_is_what_the_autoscaler_accepts_with_the_same_node_layout():
    from ray.autoscaler._private.util import validate_config

    raw = yaml.safe_load((CLUSTER / "local.yaml").read_text())
    validate_config(raw)  # the autoscaler validates the file as is (fake_multinode has no defaults to merge)
    assert raw["provider"]["type"] == "fake_multinode"
    assert raw["head_node_type"] == "ray.head.default"  # the name the fake provider gives its head
    types = raw["available_node_types"]
    assert types["ray.head.default"]["resources"] == {"CPU": 0}
    assert types["cpu"]["min_workers"] == types["gpu"]["min_workers"] == 0
    assert types["gpu"]["resources"]["mock_gpu"] == 1 and "mock_gpu" not in types["cpu"]["resources"]


# --- KubeRay ---------------------------------------------------------------------------------------


def _manifests() -> dict[str, dict]:
    found = {}
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[doc["kind"]] = doc
    return found


def test_kuberay_manifests_are_a_raycluster_with_autoscaling_and_a_rayjob_on_it():
    docs = _manifests()
    cluster, job = docs["RayCluster"], docs["RayJob"]
    for doc in (cluster, job):
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]

    spec = cluster["spec"]
    assert spec["rayVersion"] == _pinned("ray")
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert group["minReplicas"] == 0 and group["maxReplicas"] > 0 and group["template"]["spec"]["containers"]
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    images = {c["image"] for g in [head, *groups.values()] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, "every pod runs the same image"
    # token authentication, and no secrets in the manifests
    assert spec["authOptions"]["mode"] == "token"
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key", json.dumps(docs))

    job_spec = job["spec"]
    assert "jobs/train.py" in job_spec["entrypoint"]
    assert job_spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job_spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")

    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(_pinned('ray'))}-py311", dockerfile, re.M)
    assert "requirements.txt" in dockerfile


# --- the package `ray job submit --working-dir .` uploads --------------------------------------


def _package(directory: Path, out: Path) -> zipfile.ZipFile:
    """Ray's own packaging of a working dir, with the options `ray job submit --working-dir` uses."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    excludes = ray_constants.get_runtime_env_default_excludes()  # .git and .venv, in Ray 2.60
    create_package(str(directory), out, include_gitignore=True, excludes=excludes)
    return zipfile.ZipFile(out)


def test_the_job_package_leaves_out_data_venvs_stores_checkpoints_and_git(tmp_path):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    # This checkout, as it is (in CI: a fresh clone with its multi-GB .venv).
    real = tmp_path / "real.zip"
    names = _package(ROOT, real).namelist()
    assert real.stat().st_size < 5 * 2**20 < GCS_STORAGE_MAX_SIZE, f"{real.stat().st_size / 2**20:.1f} MiB"
    assert {"jobs/train.py", "pipeline/data/transforms.py", "requirements.txt"} <= set(names)

    # A copy with everything a working tree accumulates, at the places the project puts it.
    copy_dir = tmp_path / "checkout"
    top_level = {".venv", ".git", "data", "runs", "mlruns", "mlflow.db", "mlflow-server", "preds"}
    shutil.copytree(ROOT, copy_dir, ignore=lambda d, names: top_level & set(names) if Path(d) == ROOT else set())
    junk = [
        ".git/objects/pack/pack-1.pack", ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
        "venv/bin/python", "data/sample/shards/train/train-00000.parquet", "runs/alexnet-x/checkpoint_0/model.pt",
        "mlruns/1/abc/artifacts/model/data.pt", "mlflow.db", "mlflow-server/artifacts/1/model.pt2",
        "preds/run1/part-0.parquet", ".env", "pipeline/__pycache__/config.cpython-311.pyc",
    ]  # fmt: skip
    for name in junk:
        (copy_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (copy_dir / name).write_bytes(os.urandom(256 * 1024))
    names = set(_package(copy_dir, tmp_path / "copy.zip").namelist())
    assert not names & set(junk)
    assert not [n for n in names if n.startswith((".git/", ".venv/", "data/", "runs/", "mlruns/"))]
    assert {"pipeline/data/imagenet.py", "cluster/local.yaml", "jobs/train.py"} <= names


# --- a cluster that is not there ----------------------------------------------------------------


@pytest.fixture
def dead_record():
    """An environment whose Ray temp dir records a cluster nobody answers for (a killed `ray start`).

    The temp dir is short: a local Ray started under it puts its sockets there (107 bytes at most).
    """
    temp = Path(tempfile.mkdtemp(prefix="rdr", dir="/tmp"))
    address = f"127.0.0.1:{_free_port()}"  # bound once and released: nothing listens there
    record = temp / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text(address)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    yield {**env, "RAY_TMPDIR": str(temp)}, address, record
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("job", ["train", "prepare"])
def test_a_dead_recorded_cluster_is_named_in_seconds_not_waited_for(job, dead_record, tiny_raw, tmp_path):
    env, address, record = dead_record
    args = {
        "train": ["jobs/train.py", "--no-tracking", "--storage-path", tmp_path / "runs"],
        "prepare": ["jobs/prepare.py", "--source", tiny_raw, "--out", tmp_path / "shards"],
    }[job]
    started = time.monotonic()
    done = run_job(*args, env=env, timeout=120)
    assert done.returncode == 2 and time.monotonic() - started < 60, done.stderr[-3000:]
    assert f"error: the Ray cluster at {address} (from {record}) does not answer within 5s" in done.stderr
    assert f"rm {record}" in done.stderr and "RAY_ADDRESS=local" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_dead_ray_address_is_named_too(monkeypatch):
    from pipeline.cluster import ClusterUnreachable, check_answers

    address = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ClusterUnreachable, match=f"the Ray cluster at {address} \\(from RAY_ADDRESS\\)"):
        check_answers(timeout=2)


@pytest.mark.slow  # a Ray of its own
def test_ray_address_local_starts_a_local_ray_whatever_is_recorded(dead_record):
    env, _, _ = dead_record
    joined = subprocess.run(
        [sys.executable, "-c", "from pipeline import cluster; cluster.connect(local_cpus=lambda: 1)"],
        env={**env, "RAY_ADDRESS": "local"}, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "started a local Ray with 1 logical CPUs" in joined.stdout


# --- a real autoscaling cluster on this machine -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """cluster/local.yaml's fake multi-node cluster with its autoscaler: `ray start --head --block`
    in a session of its own, as cluster/README.md starts it.

    Its own temp dir (so it never becomes the machine's "current" cluster that `address="auto"`
    finds) and dashboard port; the worker "nodes" the autoscaler launches are processes in the
    same process group, all stopped through it.
    """

    def __init__(self, workdir: Path) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rfk", dir="/tmp"))  # short: Ray's socket paths
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        self.gcs_address = f"127.0.0.1:{GCS_PORT}"
        venv_bin = str(Path(sys.executable).parent)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_JOB"))}
        # The job CLI sends the token only with RAY_AUTH_MODE=token; `python` in entrypoints is this venv's.
        self.env.update(RAY_AUTH_MODE="token", PATH=f"{venv_bin}:{os.environ.get('PATH', '')}")
        self.log_path = workdir / "head.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalCluster:
        port = self.gcs_address.rsplit(":", 1)[1]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", int(port))) == 0:
                pytest.fail(f"port {port} is taken: the fake multi-node cluster needs it for its GCS")
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "0",
            "--port", port, "--dashboard-port", self.dashboard.rsplit(":", 1)[1],
            # the session's own Ray holds the default agent port (52365): the job agent needs another
            "--dashboard-agent-listen-port", str(_free_port()), "--temp-dir", str(self.temp_dir),
        ]  # fmt: skip
        # A stopped job gets 30 s to abort its run and withdraw its node request (cluster/README.md).
        command += ["--autoscaling-config", str(CLUSTER / "local.yaml")]
        env = {
            **self.env,
            "RAY_JOB_STOP_WAIT_TIME_S": "30",
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        _wait_for(lambda: self._get("/api/version") is not None, "the head's job server", 90, self)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # worker "nodes" the head did not take down
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _get(self, path: str):
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def worker_nodes(self) -> dict[str, int] | None:
        """Alive worker nodes by type, told apart by their resources (Ray's state API, as `ray list nodes`);
        None when the head did not answer."""
        reply = self._get("/api/v0/nodes?limit=100&detail=1")
        if reply is None:
            return None
        counts: dict[str, int] = {}
        for node in reply["data"]["result"]["result"]:
            if node["state"] == "ALIVE" and not node["is_head_node"]:
                kind = "gpu" if node["resources_total"].get("mock_gpu") else "cpu"
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def job_status(self, job_id: str) -> str:
        return (self._get(f"/api/jobs/{job_id}") or {}).get("status", "UNKNOWN")

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `ray` CLI against this cluster's job server, as a user types it.

        Right after start the head's job agent may not be registered yet ("No available agent to
        submit job, please try again later"): that one answer is retried, as the message says.
        """
        command = [str(Path(sys.executable).parent / "ray"), *args]
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(
                command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
            )
            if "No available agent" not in done.stderr or time.monotonic() > deadline:
                return done
            time.sleep(2)


def _epochs_printed(log: str) -> set[int]:
    return {int(n) for n in re.findall(r"epoch +(\d+)/\d+ +lr", log)}


def _wait_for(predicate, what: str, timeout: float, cluster: LocalCluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if cluster is not None and not cluster.alive():
            pytest.fail(f"the fake cluster's head exited:\n{cluster.log_path.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(1)


@pytest.mark.slow
def test_train_workers_that_leave_ray_data_no_cpu_are_refused_in_seconds_or_explained_while_they_wait(
    ray_cluster, tiny_shards, mlflow_server, tmp_path
):
    # The session's Ray is a fixed cluster (6 logical CPUs, no autoscaler) that a job joins through
    # RAY_ADDRESS, as it joins a `ray start` cluster; a train worker with every CPU leaves Ray Data none.
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    env = job_env(ray_cluster, mlflow_server.url)
    train = [
        "--data", tiny_shards, "--workers", "1", "--cpus-per-worker", str(cpus), "--epochs", "1",
        "--fc-width", FC_WIDTH, "--storage-path", tmp_path / "runs", "--experiment", "waiting", "--name", "waiting",
    ]  # fmt: skip
    started = time.monotonic()
    refused = run_job("jobs/train.py", *train, env=env, timeout=120)
    assert refused.returncode == 2 and time.monotonic() - started < 60, refused.stderr[-3000:]
    assert (
        f"error: 1 train worker × {cpus} CPUs = {cpus} of this cluster's {cpus} CPUs, which leaves 0 for Ray Data"
        in refused.stderr
    ), refused.stderr[-3000:]
    assert f"--cpus-per-worker {cpus - 1}" in refused.stderr and "--skip-resource-check" in refused.stderr
    assert "no autoscaler" in refused.stderr
    assert not (tmp_path / "runs").exists(), "refused before anything was written"

    # Told to start all the same, it waits; the watchdog says why, and says it again. Stopped the
    # way `ray job stop` stops a job (SIGTERM), it says how to continue, and its MLflow run is KILLED.
    out, err = tmp_path / "waiting.out", tmp_path / "waiting.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        job = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "train.py"), *map(str, train),
             "--skip-resource-check", "--stall-warning", "3"],
            env=env, stdout=stdout, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(lambda: out.read_text().count("Ray Data has no free CPU") >= 2 or job.poll() is not None,
                  "two watchdog reports", 180)  # fmt: skip
    finally:
        job.send_signal(signal.SIGTERM)
        try:
            job.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
    said = out.read_text()
    assert said.count("Ray Data has no free CPU") >= 2, said[-3000:] + err.read_text()[-3000:]
    assert "watchdog: no training batch yet" in said and f"in use (reserved): CPU {cpus}/{cpus} over 1 node(s)" in said
    assert re.search(r"waiting for resources \(tasks and actors, e\.g\. Ray Data's reads\): \d+ × \{CPU: 1\}", said)
    assert job.returncode != 0 and "continue it with: python jobs/train.py --resume waiting" in said, said[-3000:]
    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("waiting").experiment_id])
    assert run.info.status == "KILLED" and "MLFLOW_TRACKING_URI" not in json.dumps(run.data.params)
    # The stopped job's workers and Ray Data's tasks leave the session's cluster to the tests after it.
    _wait_for(lambda: ray_cluster.available_resources().get("CPU", 0) == cpus, "the stopped job's CPUs", 60)


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):  # a second Ray cluster: only slow tests use it
    cluster = LocalCluster(tmp_path_factory.mktemp("fake-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_submitted_job_scales_the_cluster_up_trains_registers_and_the_nodes_go_away(
    fake_cluster, tiny_shards, mlflow_server, tmp_path
):
    cluster = fake_cluster
    assert cluster.worker_nodes() == {}, "every worker type starts at zero"
    # The paper's normalisation (the dataset's mean image), which every node must find.
    data = shutil.copytree(tiny_shards, tmp_path / "shards")
    compute_stats(str(data))
    storage = tmp_path / "runs"
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.url}})
    train = [
        "python", "jobs/train.py", "--data", str(data), "--epochs", "1", "--batch-size", "4", "--fc-width", str(FC_WIDTH),
        "--cpus-per-worker", "1", "--worker-resources", "mock_gpu=1", "--data-cpu-limit", "2",
        "--normalize", "mean-image", "--stall-warning", "10",
        "--storage-path", str(storage), "--experiment", "cluster", "--model-name", "alexnet-cluster",
    ]  # fmt: skip
    submit = ["job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--runtime-env-json", runtime_env]

    # 0. The head trains nothing, so local paths are refused in seconds, before any node is bought;
    # this cluster's "nodes" share this machine's disk, which --shared-storage says.
    refused = cluster.ray(*submit, "--submission-id", "refused", "--", *train, "--name", "refused")
    assert cluster.job_status("refused") == "FAILED", refused.stdout[-3000:]
    assert "is a local path" in refused.stdout and "pass --shared-storage" in refused.stdout, refused.stdout[-3000:]
    assert cluster.worker_nodes() == {}
    train.append("--shared-storage")

    # 1. Submitted: the head has no CPUs, so nothing runs until the autoscaler launches nodes: a
    # mock-GPU node for the train worker, then a CPU node for the Ray Data tasks it has no room for.
    first = cluster.ray(*submit, "--submission-id", "train-1", "--no-wait", "--", *train, "--name", "on-cluster")
    assert first.returncode == 0, first.stderr
    seen: dict[str, int] = {}

    def finished() -> bool:
        for kind, count in (cluster.worker_nodes() or {}).items():
            seen[kind] = max(seen.get(kind, 0), count)
        return cluster.job_status("train-1") in ("SUCCEEDED", "FAILED", "STOPPED")

    _wait_for(finished, "the job to finish", 420, cluster)
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard, "train-1").stdout
    (tmp_path / "train-1.log").write_text(logs)
    assert cluster.job_status("train-1") == "SUCCEEDED", logs[-3000:]
    assert seen.get("gpu", 0) >= 1 and seen.get("cpu", 0) >= 1, seen
    assert _epochs_printed(logs) == {1}, logs[-3000:]
    # While the nodes started, the watchdog said every 10 s (--stall-warning) what the run had and
    # waited for (which, depends on the moment: tests/test_resources.py checks each report), then that
    # batches arrived.
    assert "watchdog: no training batch yet" in logs and "in use (reserved): CPU" in logs, logs[-3000:]
    assert "training batches are arriving again" in logs, logs[-3000:]

    # 2. One MLflow run, finished, registered: the job's server came from the runtime env, not a param.
    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    assert run.info.status == "FINISHED" and "MLFLOW_TRACKING_URI" not in json.dumps(run.data.params)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1_error")] == [1]
    assert client.get_model_version_by_alias("alexnet-cluster", "champion").run_id == run.info.run_id

    # 3. Idle: the autoscaler removes every worker node after the idle timeout (0.1 min).
    _wait_for(lambda: cluster.worker_nodes() == {}, "the idle worker nodes to be removed", 120, cluster)
