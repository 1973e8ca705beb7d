r"""Start the team's MLflow tracking server: sqlite store, artifacts proxied to a directory or S3.

    make mlflow                                           # http://127.0.0.1:5000, state in ./mlflow-server/
    python jobs/mlflow_server.py --dir /srv/mlflow --artifacts-destination s3://team-bucket/mlflow

    # reachable from other nodes: every request logs in (the admin from these two variables)
    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD='a long secret'
    python jobs/mlflow_server.py --auth --host 0.0.0.0 --allowed-hosts 10.0.0.5:5000

Then, in the shell that trains or browses (with the same two variables when the server has --auth):

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    python jobs/train.py ...          # runs, metrics, artifacts and the registry go to the server
    python jobs/registry.py list      # or the UI at the same URL

A --host other than a loopback address without --auth is refused (anyone who reaches the port could
move @champion or replace artifacts) unless --insecure says the network is trusted.

Artifacts travel through the server (`mlflow-artifacts:/`), so clients and Ray workers need no S3
credentials; only this process does (the usual AWS variables; `AWS_ENDPOINT_URL` for an
S3-compatible store). Runs in the foreground; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli
from pipeline.redaction import scrubbed_output
from pipeline.tracking.server import AUTH_DB, MlflowServer, ServerError, healthy


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--dir", default="mlflow-server", help="holds mlflow.db, the log and local artifacts")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for other nodes")
    parser.add_argument(
        "--artifacts-destination", default=None, help="where artifacts are stored: a directory or s3://bucket/prefix"
    )
    parser.add_argument(
        "--allowed-hosts", default=None, help="Host headers accepted besides localhost (host:port, comma-separated)"
    )
    parser.add_argument("--web-workers", type=int, default=2, help="web server worker processes")
    parser.add_argument(
        "--auth",
        action="store_true",
        help="every request logs in (MLflow's basic-auth app); the admin is MLFLOW_TRACKING_USERNAME with "
        "MLFLOW_TRACKING_PASSWORD, users in DIR/auth.db",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without --auth (a network you trust)"
    )
    parser.add_argument(
        "--local-artifacts",
        action="store_true",
        help="allow a non-loopback --host with artifacts on this machine's disk (one that outlives the cluster)",
    )
    cli.renamed(parser, "--workers", "--web-workers")
    return parser


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.auth and not args.insecure and not cli.loopback(args.host):
        print(
            f"error: --host {args.host} lets other machines reach the server, and without --auth anyone who "
            "reaches the port can move @champion or replace artifacts. Add --auth (set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD first), or --insecure on a network you trust",
            file=sys.stderr,
        )
        return 2
    if not cli.loopback(args.host) and not args.local_artifacts and "://" not in (args.artifacts_destination or ""):
        where = args.artifacts_destination or f"{args.dir}/artifacts"
        print(
            f"error: --host {args.host} serves other machines, but the model files would go to {where} on this "
            "machine's disk, which a cluster's head loses with `ray down`. Pass --artifacts-destination "
            "s3://BUCKET/PREFIX, or --local-artifacts if this disk outlives the cluster",
            file=sys.stderr,
        )
        return 2
    server = MlflowServer(
        args.dir, args.port, args.host, args.artifacts_destination, args.allowed_hosts, args.web_workers, args.auth
    )
    if args.port and healthy(server.url, timeout=1):
        print(f"error: something already answers on {server.url}; stop it or pass --port", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too, not only Ctrl-C
    try:
        server.start()  # stopped again if Ctrl-C or SIGTERM comes while it starts
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    users = f"  users      {server.root / AUTH_DB} (admin: $MLFLOW_TRACKING_USERNAME)\n" if args.auth else ""
    credentials = "  and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of a user it knows\n" if args.auth else ""
    print(
        f"MLflow server at {server.url}\n"
        f"  store      {server.backend_store_uri}\n"
        f"{users}"
        f"  artifacts  {server.artifacts_destination}\n"
        f"  log        {server.log_path}\n"
        f"point jobs at it with:\n  export MLFLOW_TRACKING_URI={server.url}\n{credentials}"
        "Ctrl-C stops it.",
        flush=True,
    )
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
