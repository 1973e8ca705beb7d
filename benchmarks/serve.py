"""The online endpoint under load: jobs/serve.py (Ray Serve) vs a plain single-process HTTP server.

    python benchmarks/serve.py                       # concurrency 1, 8 and 32; 3 repetitions; 10 s each
    python benchmarks/serve.py --concurrency 8 --repeats 1 --seconds 5 --json out.json

Both servers answer POST /predict with the same code: the body → source_views (short side to the
model's image size, centre square, centre crop) → the same Predictor → top_k, as JSON. The
baseline is one Python process (http.server's ThreadingHTTPServer, a thread per connection, torch
on every core, no batching); the endpoint is `python jobs/serve.py` on a local Ray of this machine's CPUs
(--replicas replicas of --cpus-per-replica CPUs each, dynamic batches of --max-batch-size). Both run at once, each
idle while the other is measured; their start-up is not measured.

The model is an ImageNet-sized AlexNet (1,000 classes, 256-px squares, 224-px crops) with random
weights, saved as a checkpoint directory both servers load (--model takes another: models:/... or
a checkpoint). The requests are ImageNet-sized JPEGs (330-420 px short side), sent by --concurrency
clients back to back over keep-alive connections for --seconds after a --warmup; requests/s is
the answers per second, p50 and p99 the latency of each answer. Each level runs --repeats times
(the baseline beside it); the median and the spread (min-max) are reported, and the ratios of the
endpoint to the baseline measured in the same repetition.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import make_source, spread
from pipeline.tracking.server import free_port

ROOT = Path(__file__).resolve().parents[1]


def imagenet_checkpoint(directory: Path) -> str:
    """An ImageNet-sized AlexNet with random weights, as a checkpoint directory."""
    import torch

    from pipeline import config
    from pipeline.data.imagenet import ClassInfo
    from pipeline.model import AlexNet
    from pipeline.train import checkpoint
    from pipeline.train.spec import CheckpointMeta

    torch.manual_seed(0)
    cfg = config.resolve("imagenet")
    classes = tuple(ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(1000))
    net = AlexNet(1000)
    directory.mkdir(parents=True)
    meta = CheckpointMeta(cfg, classes, image_size=256)
    checkpoint.save(directory, net, torch.optim.SGD(net.parameters(), lr=0.01), meta)
    return str(directory)


# ---- the baseline: one process, one thread per connection, the same preprocessing and model ----
def baseline_server(port: int, model: str) -> None:
    from pipeline.scoring import endpoint, loading
    from pipeline.tracking import mlflow_client

    ref = loading.resolve(model, mlflow_client.resolve_tracking_uri())
    scorer = endpoint.Model.load(ref)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the endpoint's proxy
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms wait on the client's ACK

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("content-length", 0)))
            try:
                status, answer = 200, scorer.answers([endpoint.request_views(data, ref, ten=False)])[0]
            except endpoint.Refused as refused:
                status, answer = refused.status, {"error": refused.reason}
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


# ---- the load ----
def load(url: str, bodies: list[bytes], clients: int, seconds: float, warmup: float) -> dict[str, float]:
    """`clients` connections sending requests back to back; latencies of the answers after the warmup."""
    parts = urlsplit(url)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients

    def client(k: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        i = k
        while (now := time.perf_counter()) < stop_at:
            body = bodies[i % len(bodies)]
            i += clients
            try:
                connection.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
                answer = connection.getresponse()
                answer.read()
                ok = answer.status == 200
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
                ok = False
            done = time.perf_counter()
            if now >= measure_from and done <= stop_at:
                if ok:
                    latencies[k].append(done - now)
                else:
                    failures[k] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = sorted(x for per in latencies for x in per)
    if not every:
        return {"requests_per_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "failed": sum(failures)}
    return {
        "requests_per_s": len(every) / seconds,
        "p50_ms": 1000 * every[len(every) // 2],
        "p99_ms": 1000 * every[min(len(every) - 1, int(0.99 * len(every)))],
        "failed": sum(failures),
    }


def start(command: list[str], ready: str, env: dict[str, str], log: Path, timeout: float = 300) -> subprocess.Popen:
    out = log.open("w")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
    deadline = time.monotonic() + timeout
    while ready not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{command[1]} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="models:/... or a checkpoint (default: ImageNet-sized AlexNet)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each measurement")
    parser.add_argument("--replicas", default=str(os.cpu_count()), help="the endpoint's --replicas")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="the endpoint's --cpus-per-replica")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--images", type=int, default=64, help="distinct request bodies")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--baseline-server", nargs=2, metavar=("PORT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        baseline_server(int(args.baseline_server[0]), args.baseline_server[1])
        return 0

    results: dict[str, object] = {"cpus": os.cpu_count(), "repeats": args.repeats, "seconds": args.seconds}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = args.model or imagenet_checkpoint(tmp / "alexnet-imagenet")
        make_source(tmp / "src", args.images)
        bodies = [p.read_bytes() for p in sorted((tmp / "src").rglob("*.JPEG"))][: args.images]
        print(f"model {args.model or 'ImageNet-sized AlexNet (random weights)'}; {len(bodies)} JPEGs", flush=True)
        env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DEDUP_LOGS": "1"}
        base_port, serve_port = free_port(), free_port()
        servers = [
            start([sys.executable, __file__, "--baseline-server", str(base_port), model], "ready", env,
                  tmp / "baseline.log"),
            start([sys.executable, str(ROOT / "jobs/serve.py"), "--model", model, "--port", str(serve_port),
                   "--replicas", args.replicas, "--cpus-per-replica", str(args.cpus_per_replica), "--max-batch-size", str(args.max_batch_size),
                   "--batch-wait-ms", str(args.batch_wait_ms)],
                  "Ctrl-C or SIGTERM stops it", env, tmp / "serve.log"),
        ]  # fmt: skip
        urls = {"baseline": f"http://127.0.0.1:{base_port}", "serve": f"http://127.0.0.1:{serve_port}"}
        try:
            for clients in args.concurrency:
                runs = []
                for repeat in range(args.repeats):
                    run = {kind: load(url, bodies, clients, args.seconds, args.warmup) for kind, url in urls.items()}
                    run["ratio_rps"] = run["serve"]["requests_per_s"] / max(run["baseline"]["requests_per_s"], 1e-9)
                    run["ratio_p50"] = run["serve"]["p50_ms"] / run["baseline"]["p50_ms"]
                    run["ratio_p99"] = run["serve"]["p99_ms"] / run["baseline"]["p99_ms"]
                    print(f"  concurrency {clients}, repetition {repeat + 1}: {json.dumps(run)}", flush=True)
                    runs.append(run)
                results[str(clients)] = runs
                lines = [f"\nconcurrency {clients}, median (min-max) of {args.repeats}:"]
                for kind in urls:
                    column = {k: [r[kind][k] for r in runs] for k in runs[0][kind]}
                    lines.append(
                        f"  {kind:8s}  {spread(column['requests_per_s'], '.1f')} requests/s   "
                        f"p50 {spread(column['p50_ms'], '.0f')} ms   p99 {spread(column['p99_ms'], '.0f')} ms   "
                        f"failed {sum(column['failed']):.0f}"
                    )
                lines.append(
                    f"  endpoint / baseline: requests/s {spread([r['ratio_rps'] for r in runs], '.2f')}x, "
                    f"p50 {spread([r['ratio_p50'] for r in runs], '.2f')}x, "
                    f"p99 {spread([r['ratio_p99'] for r in runs], '.2f')}x"
                )
                print("\n".join(lines), flush=True)
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                try:
                    server.wait(90)
                except subprocess.TimeoutExpired:
                    server.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
