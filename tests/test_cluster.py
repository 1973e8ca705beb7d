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
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from cluster_harness import CLUSTER, ROOT, FakeMetadataService, LocalCluster, epochs_printed, wait_for
from conftest import FC_WIDTH, assert_registered, free_port, job_env, run_job
from mlflow import MlflowClient

from pipeline.data.stats import compute_stats


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
    # Spot GPUs beside on-demand ones, the same machine: an elastic run (--workers MIN:MAX) uses both.
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in types["gpu"]["node_config"]
    spot = {k: v for k, v in types["gpu_spot"]["node_config"].items() if k != "InstanceMarketOptions"}
    assert spot == types["gpu"]["node_config"] and types["gpu_spot"]["resources"] == types["gpu"]["resources"]

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


def test_kuberay_has_the_mlflow_server_the_raycluster_logs_to_with_logins_model_files_in_s3_and_a_volume():
    from test_cli import job_parser

    docs = {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "mlflow.yaml").read_text())}
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    uri = next(e["value"] for e in head["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    service = docs["Service"]
    assert uri == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:5000"
    assert service["spec"]["ports"][0]["port"] == 5000 and service["spec"]["type"] == "ClusterIP"
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["template"]["metadata"]["labels"] == {"app": "mlflow"}  # networkpolicy.yaml's
    args = job_parser("mlflow_server").parse_args(container["command"][2:])  # flags the job has
    assert args.auth and args.artifacts_destination.startswith("s3://") and args.host == "0.0.0.0"
    assert uri.removeprefix("http://") in args.allowed_hosts.split(",")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/state"])
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert args.dir.startswith("/state/"), "a folder of its own on the volume"
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "@sha256:" in container["image"] and pod["automountServiceAccountToken"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


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
    assert set(groups) == {"cpu", "gpu", "gpu-spot"}
    for group in groups.values():
        assert group["minReplicas"] == 0 and group["maxReplicas"] > 0 and group["template"]["spec"]["containers"]
    for name in ("gpu", "gpu-spot"):
        assert groups[name]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "spot" in json.dumps(groups["gpu-spot"]["template"]["spec"]["nodeSelector"]).lower()
    # The job's --workers MIN:MAX: at least the on-demand GPUs, at most every GPU the groups may have.
    low, high = map(int, re.search(r"--workers (\d+):(\d+)", job["spec"]["entrypoint"]).groups())
    assert (
        low <= groups["gpu"]["maxReplicas"] and high == groups["gpu"]["maxReplicas"] + groups["gpu-spot"]["maxReplicas"]
    )
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

    _assert_locked_down(cluster)

    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(_pinned('ray'))}-py311", dockerfile, re.M)
    assert "requirements.txt" in dockerfile


def _assert_locked_down(cluster: dict) -> None:
    """The RayCluster's pods: the autoscaler's rights on the head's account alone, no token in worker
    pods, non-root without privileges, images pinned, Ray's ports closed to all but the cluster."""
    docs = [
        doc for path in sorted((CLUSTER / "kuberay").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
    ]
    accounts = {doc["metadata"]["name"]: doc for doc in docs if doc and doc["kind"] == "ServiceAccount"}
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    workers = [group["template"]["spec"] for group in spec["workerGroupSpecs"]]
    assert head["serviceAccountName"] == "alexnet-ray-head" and head["serviceAccountName"] in accounts
    for pod in workers:
        assert pod["serviceAccountName"] == "alexnet-ray-worker" and pod["automountServiceAccountToken"] is False
    assert accounts["alexnet-ray-worker"]["automountServiceAccountToken"] is False
    for pod in [head, *workers]:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
            assert "@sha256:" in container["image"] and not container["image"].endswith(":latest")
    (ray_policy,) = [d for d in docs if d and d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "alexnet-ray"]
    assert ray_policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": "alexnet"}
    inside, submitter = ray_policy["spec"]["ingress"]
    assert inside == {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": "alexnet"}}}]}
    assert {p["port"] for p in submitter["ports"]} == {8265, 10001}  # not the GCS, not the object managers
    assert any(d and d["kind"] == "NetworkPolicy" and d["metadata"].get("namespace") == "mlflow" for d in docs)
    assert re.search(r"^FROM \S+:\d[\w.-]*(@sha256:\w+)?$", (CLUSTER / "kuberay" / "Dockerfile").read_text(), re.M)


def test_aws_nodes_require_imdsv2_encrypt_their_volumes_and_the_heads_rights_are_scoped():
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    images = {node["node_config"]["ImageId"] for node in raw["available_node_types"].values()}
    assert len(images) == 1 and "latest_dlami" not in images, "one image, not Ray's Ubuntu 18.04 with CUDA 11.2"
    for name, node in raw["available_node_types"].items():
        config = node["node_config"]
        assert config["MetadataOptions"]["HttpTokens"] == "required", name
        assert all(device["Ebs"]["Encrypted"] is True for device in config["BlockDeviceMappings"]), name
    # The head's MLflow server: a restarted service, logins required, model files in S3 (the flag
    # the job refuses to run without beyond loopback), its secrets from a file, not a command line.
    head_starts = " ".join(raw["head_start_ray_commands"])
    server = next(c for c in raw["head_start_ray_commands"] if "mlflow_server.py" in c)
    assert "systemd-run --unit=alexnet-mlflow" in server and "Restart=on-failure" in server
    assert "--auth" in server and '--artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"' in server
    assert "EnvironmentFile=$HOME/.mlflow/server.env" in server and "PASSWORD" not in server
    assert raw["file_mounts"]["~/.mlflow/server.env"] == "~/.mlflow/server.env"
    assert raw["file_mounts"]["~/alexnet/jobs"] == "jobs" and raw["file_mounts"]["~/alexnet/pipeline"] == "pipeline"
    every_start = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert all("MLFLOW_TRACKING_URI=http://" in c and ":5000" in c for c in every_start), head_starts
    spot = " ".join(raw["available_node_types"]["gpu_spot"]["worker_setup_commands"])
    assert "systemd-run --unit=alexnet-spot-notice" in spot and "Restart=on-failure" in spot and "nohup" not in spot
    head = json.loads((CLUSTER / "iam" / "head-policy.json").read_text())
    statements = {s["Sid"]: s for s in head["Statement"]}
    launch = statements["LaunchOnlyThisClustersInstances"]
    assert launch["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"] == raw["cluster_name"]
    end = statements["RetagAndEndOnlyThisClustersInstances"]
    assert "ec2:TerminateInstances" in end["Action"]
    assert end["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == raw["cluster_name"]
    passed = [s for s in head["Statement"] if "iam:PassRole" in s["Action"]]
    assert all(
        r.endswith(("role/alexnet-ray-worker", "instance-profile/alexnet-ray-worker"))
        for s in passed
        for r in s["Resource"]
    )
    every = [s for s in head["Statement"] if s["Resource"] == "*"]
    assert all(a.startswith("ec2:Describe") for s in every for a in s["Action"]), "only lookups on every resource"
    worker = json.loads((CLUSTER / "iam" / "worker-policy.json").read_text())
    assert all(a.startswith("s3:") for s in worker["Statement"] for a in s["Action"])


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
    address = f"127.0.0.1:{free_port()}"  # bound once and released: nothing listens there
    record = temp / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text(address)
    env = job_env()
    yield {**env, "RAY_TMPDIR": str(temp)}, address, record
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("job", ["train", "prepare"])
def test_a_dead_recorded_cluster_is_named_in_seconds_not_waited_for(job, dead_record, tiny_raw, tmp_path):
    env, address, record = dead_record
    args = {
        "train": ["jobs/train.py", "--no-tracking", "--storage-path", tmp_path / "runs"],
        "prepare": ["jobs/prepare.py", "--input", tiny_raw, "--output", tmp_path / "shards"],
    }[job]
    started = time.monotonic()
    done = run_job(*args, env=env, timeout=120)
    assert done.returncode == 2 and time.monotonic() - started < 60, done.stderr[-3000:]
    assert f"error: the Ray cluster at {address} (from {record}) does not answer within 5s" in done.stderr
    assert f"rm {record}" in done.stderr and "RAY_ADDRESS=local" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_dead_ray_address_is_named_too(monkeypatch):
    from pipeline.cluster.connection import ClusterUnreachable, check_answers

    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ClusterUnreachable, match=f"the Ray cluster at {address} \\(from RAY_ADDRESS\\)"):
        check_answers(timeout=2)


@pytest.mark.slow  # a Ray of its own
def test_ray_address_local_starts_a_local_ray_whatever_is_recorded(dead_record):
    env, _, _ = dead_record
    joined = subprocess.run(
        [sys.executable, "-c", "from pipeline.cluster import connection; connection.connect(local_cpus=lambda: 1)"],
        env={**env, "RAY_ADDRESS": "local"}, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "started a local Ray with 1 logical CPUs" in joined.stdout


# --- a real autoscaling cluster on this machine -------------------------------------------------


def test_spot_notice_reads_ec2s_interruption_notice_and_the_seconds_left():
    sys.path.insert(0, str(CLUSTER))
    try:
        import spot_notice
    finally:
        sys.path.remove(str(CLUSTER))
    with FakeMetadataService() as imds:
        assert spot_notice.spot_notice(imds.url) is None  # nothing scheduled: 404
        imds.announce("terminate", seconds=120)
        assert spot_notice.spot_notice(imds.url)["action"] == "terminate"
    import datetime

    now = datetime.datetime(2026, 11, 30, 12, 0, 0, tzinfo=datetime.UTC)
    assert spot_notice.seconds_left("2026-11-30T12:02:00Z", now) == 120
    assert spot_notice.seconds_left("2026-11-30T11:59:00Z", now) == 0


def test_spot_notice_survives_malformed_notices_and_retries_the_drain_until_the_deadline():
    sys.path.insert(0, str(CLUSTER))
    try:
        import spot_notice
    finally:
        sys.path.remove(str(CLUSTER))
    import datetime

    now = datetime.datetime(2026, 11, 30, 12, 0, 0, tzinfo=datetime.UTC)
    assert spot_notice.seconds_left("2026-11-30T12:02:00.500Z", now) == 120  # fractions of a second
    assert spot_notice.seconds_left("2026-11-30T13:02:00+01:00", now) == 120
    assert spot_notice.deadline_of({"action": "stop"}) == (120, "stop")  # no time: EC2's two minutes
    assert spot_notice.deadline_of({"action": "terminate", "time": "soon"}) == (120, "terminate")
    with FakeMetadataService() as imds:
        imds.action = "not a JSON object"  # a body that is no notice EC2 documents: still one
        assert spot_notice.spot_notice(imds.url) == {"action": "unknown", "raw": '"not a JSON object"'}

        # Ray does not answer (a GCS gone, a network split): each try times out, the next follows, and
        # at the deadline it gives up saying so, instead of dying at the first failure or waiting forever.
        imds.announce("terminate", seconds=8)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(CLUSTER / "spot_notice.py"), "--metadata-url", imds.url, "--address",
             f"127.0.0.1:{free_port()}", "--node-id", "ab" * 28, "--interval", "0.2", "--drain-timeout", "3"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "EC2 will terminate this node in" in out and f"draining node {'ab' * 28}" in out
    assert "drain try 1 failed (no answer in 3 s)" in out and "gave up: node" in out, out
    assert time.monotonic() - started < 30


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
        wait_for(lambda: out.read_text().count("Ray Data has no free CPU") >= 2 or job.poll() is not None,
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
    wait_for(lambda: ray_cluster.available_resources().get("CPU", 0) == cpus, "the stopped job's CPUs", 60)


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):  # a second Ray cluster: only slow tests use it
    cluster = LocalCluster(tmp_path_factory.mktemp("fake-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _mid_epoch_checkpoint(run_dir: Path) -> bool:
    """A complete checkpoint taken inside an epoch (the preemption's) is on storage."""
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        files = {p.name for p in meta.parent.iterdir()}
        try:
            inside = json.loads(meta.read_text())["progress"].get("step_in_epoch")
        except (OSError, ValueError, KeyError):
            continue  # being written
        if inside and {"model.pt", "optimizer.pt"} <= files:
            return True
    return False


class ElasticJob:
    """The scenario's job on the fake cluster, phase by phase: an elastic training run (1 to 2 train
    workers, one per mock-GPU node, batch 4 each: a global batch of 8 whatever the world size, 12
    steps per epoch) submitted with `ray job submit`, and what it is expected to do and leave behind."""

    ID = "train-1"

    def __init__(self, cluster: LocalCluster, data: Path, storage: Path, tracking_uri: str) -> None:
        self.cluster, self.storage, self.seen = cluster, storage, {}
        runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
        # A node that dies before its announced deadline is a failure to Ray 2.60 (its workers stop
        # answering before the death is recorded as a preemption): one allowed.
        self.train = [
            "python", "jobs/train.py", "--data", str(data), "--epochs", "12", "--batch-size", "4", "--fc-width",
            str(FC_WIDTH), "--workers", "1:2", "--cpus-per-worker", "1", "--worker-resources", "mock_gpu=1",
            "--data-cpu-limit", "2", "--normalize", "mean-image", "--stall-warning", "10", "--resize-interval", "5",
            "--preemption-check-steps", "1", "--max-failures", "1", "--storage-path", str(storage),
            "--experiment", "cluster", "--model-name", "alexnet-cluster",
        ]  # fmt: skip
        self.submit = ["job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
                       "--runtime-env-json", runtime_env]  # fmt: skip

    def refused_without_shared_storage(self) -> None:
        """The head trains nothing, so local paths are refused in seconds, before any node is bought;
        this cluster's "nodes" share this machine's disk, which --shared-storage then says."""
        refused = self.cluster.ray(*self.submit, "--submission-id", "refused", "--", *self.train, "--name", "refused")
        assert self.cluster.job_status("refused") == "FAILED", refused.stdout[-3000:] + refused.stderr[-3000:]
        assert "is a local path" in refused.stdout and "pass --shared-storage" in refused.stdout, refused.stdout[-3000:]
        assert self.cluster.worker_nodes() == {}
        self.train.append("--shared-storage")

    def scales_up_and_trains_on_two(self) -> None:
        """Submitted: the head has no CPUs, so nothing runs until the autoscaler launches nodes:
        mock-GPU nodes for the train workers (it starts with the first, grows to two), a CPU node for
        Ray Data; then an epoch on two workers."""
        first = self.cluster.ray(*self.submit, "--submission-id", self.ID, "--no-wait", "--", *self.train,
                                 "--name", "on-cluster")  # fmt: skip
        assert first.returncode == 0, first.stderr

        def training_on_two() -> bool:
            logs = self.cluster.job_logs(self.ID)
            two = logs.find("2 train worker(s) of 1..2")
            return self.ended_or_logged() or (two >= 0 and re.search(r"epoch +\d+/12 +lr", logs[two:]) is not None)

        wait_for(training_on_two, "an epoch on two train workers", 300, self.cluster, self.ID)
        assert self.cluster.job_status(self.ID) == "RUNNING", self.cluster.job_logs(self.ID)[-4000:]

    def loses_a_spot_node(self) -> None:
        """EC2's metadata service (a stand-in on 127.0.0.1) announces the reclaim of a train worker's
        node 30 s ahead; cluster/spot_notice.py, as aws.yaml runs it on spot nodes, drains the node
        (reason preemption); the run checkpoints at once; the node dies as soon as that checkpoint is
        on storage, while the run has epochs left to train on the worker that remains."""
        node = self.cluster.train_worker_nodes()[-1]
        with FakeMetadataService() as imds:
            notice = subprocess.Popen(
                [sys.executable, str(CLUSTER / "spot_notice.py"), "--metadata-url", imds.url, "--address",
                 self.cluster.gcs_address, "--node-id", node, "--interval", "1"],
                env=self.cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            try:
                deadline = imds.announce("terminate", seconds=30)
                out, _ = notice.communicate(timeout=60)
            finally:
                notice.kill()
        assert notice.returncode == 0 and "EC2 will terminate this node in" in out, out
        # The workers see the notice at their next step (not while they wait for data or validate).
        wait_for(lambda: self.ended_or_logged("announced its preemption"), "the preemption checkpoint", 30,
                 self.cluster, self.ID)  # fmt: skip
        assert time.time() < deadline and self.cluster.job_status(self.ID) == "RUNNING"
        wait_for(lambda: self.ended_or_logged() or _mid_epoch_checkpoint(self.storage / "on-cluster"),
                 "the preemption checkpoint on storage", 30, self.cluster, self.ID)  # fmt: skip
        time.sleep(1)
        self.cluster.kill_node(node)

    def finishes(self) -> str:
        """The job ends, SUCCEEDED; its log."""
        wait_for(self.ended_or_logged, "the job to finish", 600, self.cluster, self.ID)
        logs = self.cluster.job_logs(self.ID)
        assert self.cluster.job_status(self.ID) == "SUCCEEDED", logs[-4000:]
        return logs

    def ended_or_logged(self, text: str | None = None) -> bool:
        """The job ended, or its log holds `text`; counts the nodes seen of each type on the way."""
        for kind, count in (self.cluster.worker_nodes() or {}).items():
            self.seen[kind] = max(self.seen.get(kind, 0), count)
        if self.cluster.job_status(self.ID) in ("SUCCEEDED", "FAILED", "STOPPED"):
            return True
        return text is not None and text in self.cluster.job_logs(self.ID)


def _assert_the_log_tells_the_story(logs: str) -> None:
    """Every epoch once; the watchdog's reports while the nodes started (which, depends on the moment:
    tests/test_resources.py checks each), then that batches arrived; the restart on one worker at the
    same global batch, from the checkpoint taken on the notice (or a later one)."""
    assert epochs_printed(logs) == set(range(1, 13)), logs[-4000:]
    assert "watchdog: no training batch yet" in logs and "in use (reserved): CPU" in logs, logs[-3000:]
    assert "training batches are arriving again" in logs, logs[-3000:]
    assert "1 train worker(s) of 1..2: global batch 8 (1 × 4 × 2 micro-batch(es) per step)" in logs, logs[-4000:]
    assert "resumed from epoch" in logs, logs[-4000:]
    assert re.search(r"train workers     .*; global batch 8 throughout", logs), logs[-3000:]


def _assert_one_registered_mlflow_run(tracking_uri: str) -> None:
    """One MLflow run, finished, registered: every epoch once, at the same global batch; the job's
    server came from the runtime env. world_size is the epoch's world at its end (the metric's
    definition): whether an epoch ends while the run is on one worker depends on how soon the
    autoscaler brings a node back and Ray Train grows the run again, a race on this machine; the
    restart on one worker is in the log."""
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    assert run.info.status == "FINISHED" and "MLFLOW_TRACKING_URI" not in json.dumps(run.data.params)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1_error")] == list(range(1, 13))
    assert {m.value for m in client.get_metric_history(run.info.run_id, "global_batch")} == {8}
    history = sorted(client.get_metric_history(run.info.run_id, "world_size"), key=lambda m: m.step)
    worlds = [int(m.value) for m in history]
    assert 2 in worlds and set(worlds) <= {1, 2}, worlds
    assert int(run.data.tags["restarts"]) >= 1
    assert_registered(client, "alexnet-cluster", run.info.run_id)


@pytest.mark.slow
def test_a_submitted_elastic_job_scales_up_survives_a_spot_preemption_registers_and_the_nodes_go_away(
    fake_cluster, tiny_shards, mlflow_server, tmp_path
):
    assert fake_cluster.worker_nodes() == {}, "every worker type starts at zero"
    data = shutil.copytree(tiny_shards, tmp_path / "shards")
    compute_stats(str(data))  # the paper's normalisation (the dataset's mean image), which every node must find
    job = ElasticJob(fake_cluster, data, tmp_path / "runs", mlflow_server.url)
    job.refused_without_shared_storage()
    job.scales_up_and_trains_on_two()
    job.loses_a_spot_node()
    logs = job.finishes()
    (tmp_path / "train-1.log").write_text(logs)
    assert job.seen.get("gpu", 0) >= 2 and job.seen.get("cpu", 0) >= 1, job.seen
    _assert_the_log_tells_the_story(logs)
    _assert_one_registered_mlflow_run(mlflow_server.url)
    # Idle: the autoscaler removes every worker node after the idle timeout (0.1 min).
    wait_for(lambda: fake_cluster.worker_nodes() == {}, "the idle worker nodes to be removed", 120, fake_cluster)
