"""A real autoscaling Ray cluster on this machine, and a stand-in for EC2's metadata service: what
tests/test_cluster.py's scenarios run on.

    LocalCluster         cluster/local.yaml's fake multi-node cluster with its autoscaler, started with
                         `ray start --head --block` in a session of its own and stopped by its handle
    FakeMetadataService  EC2's instance metadata service (IMDSv2) on 127.0.0.1, as spot_notice.py reads it
    wait_for             poll until a condition holds; on a timeout, what it waited for and the job's log
"""

from __future__ import annotations

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
from pathlib import Path

import pytest
from conftest import free_port, job_env

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
GCS_PORT = 6379  # the fake multi-node provider joins new nodes to this port (DESIGN: fake multinode)


class FakeMetadataService:
    """EC2's instance metadata service (IMDSv2) as spot_notice.py reads it, on 127.0.0.1: a session
    token, then `spot/instance-action` (404 until `announce` schedules the reclaim)."""

    def __init__(self) -> None:
        import http.server
        import threading

        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._reply(200, b"a-session-token")
                return self._reply(400, b"")

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != "a-session-token":
                    return self._reply(401, b"")
                if self.path == "/latest/meta-data/spot/instance-action" and service.action:
                    return self._reply(200, json.dumps(service.action).encode())
                return self._reply(404, b"")

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.action: dict | None = None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def announce(self, action: str, seconds: int) -> float:
        """EC2 schedules this instance's `action` in `seconds`; returns that moment (time.time())."""
        when = time.time() + seconds
        self.action = {"action": action, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))}
        return when

    def __enter__(self) -> FakeMetadataService:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class LocalCluster:
    """cluster/local.yaml's fake multi-node cluster with its autoscaler: `ray start --head --block`
    in a session of its own, as docs/clusters.md#on-one-machine starts it.

    Its own temp dir (so it never becomes the machine's "current" cluster that `address="auto"`
    finds) and dashboard port; the worker "nodes" the autoscaler launches are processes in the
    same process group, all stopped through it.
    """

    def __init__(self, workdir: Path) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rfk", dir="/tmp"))  # short: Ray's socket paths
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.gcs_address = f"127.0.0.1:{GCS_PORT}"
        venv_bin = str(Path(sys.executable).parent)
        self.env = job_env()
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
            "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(self.temp_dir),
        ]  # fmt: skip
        # A stopped job gets 30 s to abort its run and withdraw its node request (docs/clusters.md#submitting-jobs).
        command += ["--autoscaling-config", str(CLUSTER / "local.yaml")]
        env = {
            **self.env,
            # Ray Train watches for node drains (preemption notices) here, every second; a node
            # that dies is known to be gone within about a second (the default takes ~15 s).
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_failure_threshold": "2",
            "RAY_JOB_STOP_WAIT_TIME_S": "30",
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: self._get("/api/version") is not None, "the head's job server", 90, self)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # Job drivers run in sessions of their own: a job still running (a failed test) is stopped
            # through the job server before the head goes, or its driver would outlive the cluster.
            running = [
                j["submission_id"] for j in self._get("/api/jobs/") or [] if j.get("status") in ("PENDING", "RUNNING")
            ]
            for job_id in running:
                self._get(f"/api/jobs/{job_id}/stop", method="POST")
            deadline = time.monotonic() + 40
            while (
                running
                and time.monotonic() < deadline
                and any(self.job_status(j) in ("PENDING", "RUNNING") for j in running)
            ):
                time.sleep(1)
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

    def _get(self, path: str, method: str = "GET"):
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        request = urllib.request.Request(self.dashboard + path, headers=headers, method=method)
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

    def job_logs(self, job_id: str) -> str:
        return (self._get(f"/api/jobs/{job_id}/logs") or {}).get("logs", "")

    def train_worker_nodes(self) -> list[str]:
        """The ids of the nodes that hold a live Ray Train worker, sorted."""
        reply = self._get("/api/v0/actors?limit=1000&detail=1") or {"data": {"result": {"result": []}}}
        return sorted(
            {
                a["node_id"]
                for a in reply["data"]["result"]["result"]
                if a["state"] == "ALIVE" and a["class_name"] == "RayTrainWorker"
            }
        )

    def kill_node(self, node_id: str) -> None:
        """What a reclaimed spot instance does: every process of that fake node (raylet, workers) dies."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in environ:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

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


def epochs_printed(log: str) -> set[int]:
    return {int(n) for n in re.findall(r"epoch +(\d+)/\d+ +lr", log)}


def wait_for(predicate, what: str, timeout: float, cluster: LocalCluster | None = None, job: str = "") -> None:
    """Until `predicate()`; on a timeout the failure says what it waited for (and `job`'s log so far)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if cluster is not None and not cluster.alive():
            pytest.fail(f"the fake cluster's head exited:\n{cluster.log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            lines = cluster.job_logs(job).splitlines() if cluster is not None and job else []
            log = "\n".join(line for line in lines if "row/s]" not in line and "Dataset" not in line)[-8000:]
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what}" + (f"; {job}'s log:\n{log}" if job else "")
            )
        time.sleep(1)
