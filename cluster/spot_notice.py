"""Turn an EC2 spot interruption notice into a Ray node drain, so that training checkpoints at once.

Runs on every spot node, supervised: cluster/aws.yaml starts it as a systemd service on `gpu_spot`
nodes, restarted if it dies. It finds this node's Ray node id once the node's raylet is up (or takes
--node-id). Every 5 s it asks the instance metadata service (IMDSv2) for `spot/instance-action`;
when EC2 schedules the node's reclaim (about two minutes ahead) it asks Ray to drain this node,
reason PREEMPTION, with the notice's deadline, retrying (each try with its own timeout) until the
drain is accepted or the deadline has passed, and says what it did. Ray Train sees the drain
(`ray.train.get_preemption_info`): the training job checkpoints at once, mid-epoch, and when the
node goes it carries on from that checkpoint with the workers left, without counting it as one of
`--max-failures`.

    python cluster/spot_notice.py                 # on the node, beside its raylet
    python cluster/spot_notice.py --metadata-url http://127.0.0.1:PORT --node-id HEX --address HOST:PORT

A notice it cannot read (no time, a time in another format) still drains the node, with the two
minutes EC2 gives. Without a notice (on-demand nodes, other clouds) it only polls. Exit status: 0
once the node is drained, 1 if the drain could not be made before the deadline. Standard library
and the `ray` CLI only.
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
NOTICE_LEAD_S = 120  # what EC2 gives between a spot interruption notice and the reclaim
RETRY_S = 3.0  # between drain tries


def say(message: str) -> None:
    print(f"spot_notice: {message}", flush=True)


def spot_notice(metadata_url: str, timeout: float = 2.0) -> dict | None:
    """EC2's scheduled action for this spot instance ({"action": "terminate", "time": "...Z"}), or None.

    A body that is not a JSON object is still a notice: {"action": "unknown", "raw": <the text>}."""
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
            text = reply.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # nothing scheduled
            return None
        raise
    try:
        notice = json.loads(text)
    except ValueError:
        notice = None
    return notice if isinstance(notice, dict) else {"action": "unknown", "raw": text[:200]}


def seconds_left(when: str, now: datetime.datetime | None = None) -> int:
    """Whole seconds until the notice's time ("2026-11-30T12:00:00Z", with or without fractions of a
    second or an offset), at least 0; ValueError for a time it cannot read."""
    deadline = datetime.datetime.fromisoformat(when.strip().replace("Z", "+00:00"))
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=datetime.UTC)
    now = now or datetime.datetime.now(datetime.UTC)
    return max(0, int((deadline - now).total_seconds()))


def deadline_of(notice: dict) -> tuple[int, str]:
    """(seconds left, action) of a notice; one whose time cannot be read gets EC2's two minutes."""
    action = str(notice.get("action") or "unknown")
    try:
        return seconds_left(str(notice["time"])), action
    except (KeyError, ValueError, TypeError):
        say(f"the notice's time cannot be read ({json.dumps(notice)[:200]}): taking EC2's {NOTICE_LEAD_S} s")
        return NOTICE_LEAD_S, action


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def local_node_id(address: str, timeout: float = 60.0) -> str | None:
    """This machine's Ray node id, from a short-lived driver attached to its raylet; None until Ray runs here."""
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
        "print(ray.get_runtime_context().get_node_id())"
    )
    try:
        found = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout, check=True
        )
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError, OSError):
        return None
    lines = found.stdout.strip().splitlines()
    return lines[-1] if lines else None


def drain(address: str, node_id: str, seconds: int, action: str, timeout: float) -> None:
    """`ray drain-node` for `node_id`: going away in `seconds`, by preemption. Raises on failure or timeout."""
    command = [
        ray_cli(), "drain-node", "--address", address, "--node-id", node_id,
        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", f"EC2 spot interruption ({action})",
        "--deadline-remaining-seconds", str(seconds),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)


def drain_until(address: str, node_id: str, seconds: int, action: str, attempt_timeout: float) -> bool:
    """Drain the node, trying again (each try at most `attempt_timeout`) until it works or the deadline passes."""
    deadline = time.monotonic() + seconds
    attempt = 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        try:
            drain(address, node_id, max(0, int(left)), action, timeout=max(1.0, min(attempt_timeout, left)))
        except subprocess.TimeoutExpired:
            why = f"no answer in {max(1.0, min(attempt_timeout, left)):.0f} s"
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or exc.stdout or "").strip().splitlines()
            why = f"exit status {exc.returncode}" + (f": {tail[-1]}" if tail else "")
        except OSError as exc:
            why = f"cannot run {ray_cli()}: {exc}"
        else:
            say(f"drained node {node_id} (reason preemption, {max(0, int(left))} s left), try {attempt}")
            return True
        left = deadline - time.monotonic()
        say(f"drain try {attempt} failed ({why}); {max(0, left):.0f} s left")
        if left <= RETRY_S:
            say(
                f"gave up: node {node_id} was not drained before EC2's deadline; the run restarts from its last checkpoint"
            )
            return False
        time.sleep(RETRY_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metadata-url", default=IMDS, help=f"the instance metadata service (default: {IMDS})")
    parser.add_argument("--address", default="auto", help="the Ray cluster's GCS (default: this node's cluster)")
    parser.add_argument("--node-id", default=None, help="the Ray node to drain (default: the one on this machine)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls (AWS suggests 5)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds one drain try may take")
    args = parser.parse_args(argv)
    node_id, failing = args.node_id, False
    if node_id:
        say(f"watching {args.metadata_url} for node {node_id}")
    while True:
        if node_id is None:
            node_id = local_node_id(args.address)
            if node_id:
                say(f"watching {args.metadata_url} for node {node_id}")
        try:
            notice = spot_notice(args.metadata_url)
            failing = False
        except (OSError, ValueError) as exc:  # the metadata service is away for a moment: say it once
            if not failing:
                say(f"cannot read {args.metadata_url}: {exc}; polling on")
            failing, notice = True, None
        if notice:
            seconds, action = deadline_of(notice)
            node_id = node_id or local_node_id(args.address, timeout=max(1.0, seconds / 2))
            if node_id is None:
                say(f"EC2 will {action} this node in {seconds} s, but Ray's node id here is unknown: nothing drained")
                return 1
            say(f"EC2 will {action} this node in {seconds} s: draining node {node_id}")
            return 0 if drain_until(args.address, node_id, seconds, action, args.drain_timeout) else 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
