"""Turn an EC2 spot interruption notice into a Ray node drain, so that training checkpoints at once.

Runs on every spot node (cluster/aws.yaml starts it after `ray start` on `gpu_spot` nodes). Every 5
s it asks the instance metadata service (IMDSv2) for `spot/instance-action`; when EC2 schedules the
node's reclaim (about two minutes ahead) it asks Ray to drain this node, reason PREEMPTION, with
the notice's deadline, then exits. Ray Train sees the drain (`ray.train.get_preemption_info`): the
training job checkpoints at once, mid-epoch, and when the node goes it carries on from that
checkpoint with the workers left, without counting it as one of `--max-failures`.

    python cluster/spot_notice.py                 # on the node, beside its raylet
    python cluster/spot_notice.py --metadata-url http://127.0.0.1:PORT --node-id HEX --address HOST:PORT

Without a notice (on-demand nodes, other clouds) it only polls. Standard library and the `ray` CLI only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

IMDS = "http://169.254.169.254"


def spot_notice(metadata_url: str, timeout: float = 2.0) -> dict | None:
    """EC2's scheduled action for this spot instance ({"action": "terminate", "time": "...Z"}), or None."""
    token_request = urllib.request.Request(
        f"{metadata_url}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    with urllib.request.urlopen(token_request, timeout=timeout) as reply:
        token = reply.read().decode()
    request = urllib.request.Request(
        f"{metadata_url}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # nothing scheduled
            return None
        raise


def seconds_left(when: str, now: datetime.datetime | None = None) -> int:
    """Whole seconds until the notice's time ("2026-11-30T12:00:00Z"), at least 0."""
    deadline = datetime.datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    now = now or datetime.datetime.now(datetime.UTC)
    return max(0, int((deadline - now).total_seconds()))


def drain(address: str, node_id: str | None, seconds: int, action: str) -> None:
    """`ray drain-node`: this node (or `node_id`) is going away in `seconds`, by preemption."""
    command = [
        str(Path(sys.executable).parent / "ray"), "drain-node", "--address", address,
        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", f"EC2 spot interruption ({action})",
        "--deadline-remaining-seconds", str(seconds),
    ]  # fmt: skip
    if node_id:
        command += ["--node-id", node_id]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metadata-url", default=IMDS, help=f"the instance metadata service (default: {IMDS})")
    parser.add_argument("--address", default="auto", help="the Ray cluster's GCS (default: this node's cluster)")
    parser.add_argument("--node-id", default=None, help="the Ray node to drain (default: the one on this machine)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls (AWS suggests 5)")
    args = parser.parse_args(argv)
    failing = False
    while True:
        try:
            notice = spot_notice(args.metadata_url)
            failing = False
        except (OSError, ValueError) as exc:  # the metadata service is away for a moment: say it once
            if not failing:
                print(f"spot_notice: cannot read {args.metadata_url}: {exc}; polling on", file=sys.stderr, flush=True)
            failing, notice = True, None
        if notice:
            seconds = seconds_left(notice["time"])
            print(f"spot_notice: EC2 will {notice['action']} this node in {seconds} s: draining it", flush=True)
            drain(args.address, args.node_id, seconds, notice["action"])
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
