"""A team MLflow tracking server: sqlite backend store, artifacts proxied to a directory or S3.

Clients (the driver, rank 0 on whichever node it lands) talk HTTP to the server only; the server
alone reads and writes the artifact store, so workers need no cloud credentials for MLflow.
`make mlflow` and the tests start it through `MlflowServer`, and stop it by its own handle.

With `auth`, MLflow's basic-auth app asks every request (but /health) for a user and password:
users live in root/auth.db; the admin is created on first start from MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, the variables every MLflow client logs in with.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import InputError
from pipeline.redaction import redact

AUTH_CONFIG = "basic_auth.ini"  # in root: MLflow's auth settings (no credentials in it)
AUTH_DB = "auth.db"  # in root: the users and their permissions
SECRET_KEY_FILE = "flask_secret_key"  # in root, owner-only: signs the UI's CSRF tokens, kept across restarts
# What the server keeps in its state folder (sqlite adds -journal, -wal and -shm files beside its databases).
STATE_FILES = ("mlflow.db", AUTH_DB, AUTH_CONFIG, SECRET_KEY_FILE, "artifacts", "server.log")


class ServerError(InputError):
    """The server did not come up, or refuses its own admin; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(url: str, timeout: float = 2.0) -> bool:
    """The server at `url` answers /health (which needs no login: a user:password@ in `url` is left out)."""
    try:
        return request_status(f"{redact(url).rstrip('/')}/health", timeout=timeout) == 200
    except OSError:  # nothing listens (URLError), or no answer in time
        return False


def request_status(url: str, user: str | None = None, password: str | None = None, timeout: float = 10.0) -> int:
    """The HTTP status of a GET, with basic-auth credentials when given."""
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class MlflowServer:
    """`mlflow server` as a child process.

    root holds mlflow.db (runs, metrics, the registry) and, unless `artifacts_destination` names
    another place (`s3://bucket/prefix` or a directory), the artifacts under root/artifacts.
    """

    def __init__(
        self,
        root: str | Path,
        port: int = 0,
        host: str = "127.0.0.1",
        artifacts_destination: str | None = None,
        allowed_hosts: str | None = None,
        workers: int = 1,
        auth: bool = False,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.host = host
        self.port = port or free_port(host)
        self.artifacts_destination = artifacts_destination or str(self.root / "artifacts")
        self.allowed_hosts = allowed_hosts
        self.workers = workers
        self.auth = auth
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def command(self) -> list[str]:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", self.artifacts_destination,
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip
        if self.allowed_hosts:
            command += ["--allowed-hosts", self.allowed_hosts]
        if self.auth:
            command += ["--app-name", "basic-auth"]
        return command

    def _auth_env(self) -> dict[str, str]:
        """The basic-auth app's settings: users in root/auth.db, the admin from the clients' variables.

        Read-only for users the admin creates (MLflow's default permission); each user manages what
        they create. The password never goes into a file: MLflow takes it from its own variable.
        """
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if not user or not password:
            raise ServerError(
                "--auth needs the admin's user name and password in MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (the variables every MLflow client logs in with); set both and start again"
            )
        config = self.root / AUTH_CONFIG
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.root / AUTH_DB}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = false\n"
            "auth_cache_ttl_seconds = 60\n"  # a password hash checked once a minute, not on every request
        )
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_USERNAME": user,
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or self._secret_key(),
        }

    def _secret_key(self) -> str:
        """A random key made on first start, readable by this user only (MLflow's CSRF protection)."""
        path = self.root / SECRET_KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return path.read_text().strip()

    def _check_admin(self) -> None:
        """The admin logs in: an auth.db made earlier keeps the admin and password it was created with."""
        user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        status = request_status(f"{self.url}/api/2.0/mlflow/experiments/search?max_results=1", user, password)
        if status != 200:
            raise ServerError(
                f"the server at {self.url} refuses MLFLOW_TRACKING_USERNAME={user} with this password (HTTP "
                f"{status}): {self.root / AUTH_DB} already holds its users, made when it was first started. Log in "
                "as its admin, or start with another --dir"
            )

    def start(self, timeout: float = 120.0) -> MlflowServer:
        """Start the server and wait until it answers. Whatever stops the wait (a failure, Ctrl-C, the
        SIGTERM a job turns into an exit) stops the server first: nothing is left running unowned."""
        self._own_state_dir()
        if not self.artifacts_destination.startswith(("s3://", "gs://", "wasbs://")):
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.auth:
            env.update(self._auth_env())
        # The server's job runner (GenAI scorers, trace archival: not used here) adds ~8 processes.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        if env.get("AWS_ENDPOINT_URL") and not env.get("MLFLOW_S3_ENDPOINT_URL"):
            env["MLFLOW_S3_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]  # MLflow's S3 store reads only its own
        with open(self.log_path, "ab") as log:
            # A session of its own: stop() signals the server and its web workers, nothing else.
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_until_up(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not healthy(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(
                    f"mlflow server on {self.url} did not start; the end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.3)
        if self.auth:
            self._check_admin()

    def _own_state_dir(self) -> None:
        """The state folder (runs, the registry, users' password hashes, the session key) readable by
        this user alone: made 0700, or an existing one of the server's files set so. A folder that
        holds other files is refused: its mode is not the server's to change."""
        if not self.root.exists():
            self.root.mkdir(parents=True, mode=0o700)
            return
        others = sorted(p.name for p in self.root.iterdir() if not p.name.startswith(STATE_FILES))
        if others:
            raise ServerError(
                f"--dir {self.root} holds files besides the server's ({', '.join(others[:3])}"
                f"{' ...' if len(others) > 3 else ''}): the server keeps runs, users' password hashes and its session "
                "key there, readable by this user alone. Give it a folder of its own"
            )
        if self.root.stat().st_uid == os.getuid():
            os.chmod(self.root, 0o700)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's own process group (the server and its web workers), then SIGKILL."""
        if self.process is None:
            return
        group, deadline = self.process.pid, time.monotonic() + timeout
        _signal_group(group, signal.SIGTERM)
        while _group_alive(group) and time.monotonic() < deadline:
            self.process.poll()  # reap the leader so the group can empty
            time.sleep(0.1)
        _signal_group(group, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
