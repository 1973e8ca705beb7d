r"""Serve a registered model online: a Ray Serve endpoint that follows an alias as it moves.

    python jobs/serve.py --model models:/alexnet@champion                      # http://127.0.0.1:8000
    curl --data-binary @photo.jpg http://127.0.0.1:8000/predict
    python jobs/serve.py --model models:/alexnet@champion --host 0.0.0.0 --token-file ~/serve-token \
        --ssl-certfile cert.pem --ssl-keyfile key.pem
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/serve.py --model models:/alexnet@champion --replicas 1:4

POST /predict takes an image file's bytes (JPEG, PNG or WebP, at most --max-file-mb) as the body
and answers {"model", "version", "top5": [{"wnid", "name", "prob"}, ...]}; a body it cannot score
gets a 4xx and {"error": why}. GET /healthz answers 200 with the version loaded. Preprocessing and
the model are batch inference's (jobs/infer.py gives the same probabilities for the same file).

With models:/NAME@ALIAS every replica reads the alias's version every --follow-interval seconds and,
when it moved, loads the new version beside the old one and switches: no request fails, each answer
names the version that scored it, and a version that fails to load leaves the old one serving.

Requests are scored in batches (--max-batch-size, --batch-wait-ms) by --replicas replicas (N,
MIN:MAX to autoscale on requests in flight, or auto: 1 up to the cluster's GPUs, else its CPUs),
on GPUs where the cluster has or can add them (--gpus-per-replica). It runs in the foreground on
a local Ray or the cluster it joins until Ctrl-C or SIGTERM, then deletes its application (and
stops a Ray it started). It binds to 127.0.0.1; another --host needs a bearer token in
ALEXNET_SERVE_TOKEN (or --token-file) that /predict then asks for, or --insecure; --ssl-certfile
and --ssl-keyfile serve HTTPS.
MLflow: --tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli
from pipeline.config import FORWARD_ENV_HELP, non_negative, positive, positive_int
from pipeline.errors import InputError
from pipeline.redaction import scrubbed_output

TOKEN_ENV = "ALEXNET_SERVE_TOKEN"  # the bearer token POST /predict asks for, when set
STOP_TIMEOUT_S = 60.0  # how long a stop waits for Serve to delete the application


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", help="models:/NAME@ALIAS (followed), models:/NAME/VERSION or a checkpoint dir")
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds; 0.0.0.0 for other machines")
    parser.add_argument("--port", type=positive_int, default=8000, help="the HTTP proxy's port")
    parser.add_argument(
        "--token-file", default=None, help=f"a file holding the bearer token /predict asks for (else ${TOKEN_ENV})"
    )
    parser.add_argument(
        "--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM; with --ssl-keyfile)"
    )
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    parser.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without a token (a network you trust)"
    )
    parser.add_argument(
        "--follow-interval",
        type=non_negative,
        default=30.0,
        help="seconds between reads of the alias's version (0: serve the version it names at start)",
    )
    parser.add_argument("--ten-crop", action="store_true", help="the paper's ten views per image, softmax averaged")
    parser.add_argument("--max-batch-size", type=positive_int, default=16, help="requests scored in one forward pass")
    parser.add_argument(
        "--batch-wait-ms", type=non_negative, default=5.0, help="how long a batch waits to fill before it is scored"
    )
    cli.add_replicas(parser)
    parser.add_argument(
        "--cpus-per-replica", type=positive, default=1.0, help="CPUs per replica (its decoding and, on CPUs, the model)"
    )
    parser.add_argument("--max-file-mb", type=positive, default=64.0, help="a larger body (MiB) is refused with 413")
    cli.add_tracking(parser)
    parser.add_argument("--forward-env", default="", metavar="NAME,...", help=FORWARD_ENV_HELP)
    return parser


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's first line, else $ALEXNET_SERVE_TOKEN, else None."""
    if args.token_file:
        try:
            token = Path(args.token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise InputError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise InputError(f"--token-file {args.token_file} is empty: write the token in it")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()  # before Ray, MLflow and torch make their loggers: no secret reaches the job's logs
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.require(parser, args, "--model")
    cli.use_tracking_uri(args)
    try:
        token = read_token(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("error: --ssl-certfile and --ssl-keyfile go together: pass both, or neither", file=sys.stderr)
        return 2
    for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if path and not Path(path).expanduser().is_file():
            print(f"error: {flag} {path} is not a file", file=sys.stderr)
            return 2
    if token is None and not args.insecure and not cli.loopback(args.host):
        print(
            f"error: --host {args.host} lets other machines reach the endpoint, and without a token anyone who "
            f"reaches the port can use it. Set {TOKEN_ENV} (or --token-file) to a secret that clients send as "
            "`Authorization: Bearer TOKEN`, or pass --insecure on a network you trust",
            file=sys.stderr,
        )
        return 2
    if token and not args.ssl_certfile and not cli.loopback(args.host):
        print(
            f"note: the token travels in plain HTTP to {args.host}: pass --ssl-certfile and --ssl-keyfile, or keep "
            "the port inside a network you trust, or put a proxy that ends TLS in front",
            file=sys.stderr,
        )
    # Once the flags are good: --help and a mistyped flag answer at once.
    from ray import serve

    from pipeline.cluster import connection
    from pipeline.cluster.resources import GpuCapacity, cpus_now_or_addable
    from pipeline.scoring import endpoint, loading, pool
    from pipeline.tracking import mlflow_client

    connection.stop_on_sigterm()  # `ray job stop`, a scheduler: stop as Ctrl-C does
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a bar per replica start fills the log
    http = {"host": args.host, "port": args.port, "ssl_certfile": None, "ssl_keyfile": None}
    if args.ssl_certfile:  # the paths as the head sees them: the proxy runs there
        http |= {"ssl_certfile": str(Path(args.ssl_certfile).expanduser().resolve()),
                 "ssl_keyfile": str(Path(args.ssl_keyfile).expanduser().resolve())}  # fmt: skip
    joined, deploying = None, False
    try:
        try:  # everything that can be wrong is found here, before any cluster work
            tracking_uri = mlflow_client.resolve_tracking_uri()
            if args.model.startswith("models:/"):
                mlflow_client.check_server(tracking_uri)
            ref = loading.resolve(args.model, tracking_uri)  # the checked load each replica repeats
            options = endpoint.EndpointOptions(
                ten_crop_views=args.ten_crop,
                max_bytes=int(args.max_file_mb * 2**20),
                max_batch_size=args.max_batch_size,
                batch_wait_s=args.batch_wait_ms / 1000,
                follow_interval_s=args.follow_interval if endpoint.is_alias(args.model) else 0.0,
                token_sha256=endpoint.token_digest(token) if token else None,
            )
            views = "ten crops" if args.ten_crop else "centre crop"
            print(
                f"model {ref.uri} (version {ref.version or '-'}): {ref.image_size}-px squares, {ref.crop}-px {views}",
                flush=True,
            )
            forward = connection.env_names(args.forward_env)
            joined = connection.connect(
                env=mlflow_client.worker_env(tracking_uri, forward), joined_note=mlflow_client.credentials_note(forward)
            )
            endpoint.check_cluster(http)
            cpus = cpus_now_or_addable()
            replicas = pool.plan(args.replicas, args.gpus_per_replica, GpuCapacity.read(), cpus / args.cpus_per_replica)
            print(replicas.describe(), flush=True)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        deploying = True  # from here a stop deletes what this job may have started
        endpoint.start(http)
        app = endpoint.application(args.model, ref, tracking_uri, options, replicas, args.cpus_per_replica)
        serve.run(app, name=endpoint.APP, route_prefix="/")
        following = (
            f"following {args.model} (read every {args.follow_interval:g} s)"
            if options.follow_interval_s
            else f"serving {ref.version_uri} until stopped"
        )
        url = _url(args.host, args.port, bool(args.ssl_certfile))
        print(
            f"endpoint: POST {url}/predict (an image as the body), GET {url}/healthz\n{following}\n"
            + ("clients send `Authorization: Bearer TOKEN`\n" if token else "")
            + "Ctrl-C or SIGTERM stops it",
            flush=True,
        )
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("\nstopping the endpoint", file=sys.stderr, flush=True)
        return 0
    finally:
        # A second Ctrl-C or SIGTERM must not leave replicas behind, nor end the job in a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if deploying and not endpoint.stop(STOP_TIMEOUT_S):
            print(f"warning: the cluster did not confirm in {STOP_TIMEOUT_S:g} s that the endpoint was deleted",
                  file=sys.stderr)  # fmt: skip
        if joined is False:  # the local Ray this job started
            import ray

            ray.shutdown()


def _url(host: str, port: int, https: bool) -> str:
    """Where a client on this machine reaches the endpoint."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{'https' if https else 'http'}://{f'[{shown}]' if ':' in shown else shown}:{port}"


if __name__ == "__main__":
    sys.exit(main())
