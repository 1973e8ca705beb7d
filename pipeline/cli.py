"""What every job's command line shares: the same flag for the same concept, help that shows
defaults and choices, and the old spelling of a renamed flag, still accepted with a note.

    --input        raw images a job reads (prepare, infer)      --data   prepared shards
    --output       what a job writes (train writes under --storage-path)
    --tracking-uri the MLflow server (default: MLFLOW_TRACKING_URI, else ./mlflow.db)
    --no-tracking  a job that may skip MLflow logs nothing
    --no-progress  no progress bars or in-epoch lines (log files of batch jobs)
    --replicas     N, MIN:MAX or auto, and --gpus-per-replica N or auto (evaluate, infer)

Argparse and the standard library only: every job answers --help before Ray, torch or MLflow load.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from pipeline.config import non_negative

AUTO = "auto"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The job's docstring as written; each option's default, where it has one its help does not say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0  # --x / --no-x: the flag is the choice
        shown = action.option_strings and not flag and action.default not in (None, "", argparse.SUPPRESS)
        if shown and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


class _Renamed(argparse.Action):
    """A flag's old name: sets the new flag's value and says, on stderr, which name to use."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string} is renamed {self.new}; the old name will go in a later release", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def renamed(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept `old` for the flag `new` (already added), hidden from --help."""
    target = parser._option_string_actions[new]
    parser.add_argument(
        old,
        action=_Renamed,
        new=new,
        dest=target.dest,
        nargs=0 if target.nargs == 0 else None,
        const=target.const,
        type=target.type,
        choices=target.choices,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, *flags: str) -> None:
    """Flags that must be given (by either name: argparse's `required` knows only one)."""
    missing = [flag for flag in flags if getattr(args, parser._option_string_actions[flag].dest) in (None, "")]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")


def add_tracking(parser: argparse.ArgumentParser, skip: str | None = None) -> None:
    """--tracking-uri; with `skip` (what --no-tracking leaves out), --no-tracking."""
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow server, e.g. http://HEAD:5000 (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    if skip:
        parser.add_argument("--no-tracking", dest="tracking", action="store_false", help=skip)


def use_tracking_uri(args: argparse.Namespace, environ: Any = os.environ) -> None:
    """--tracking-uri becomes this process's MLFLOW_TRACKING_URI: every MLflow client of the job
    (and a local Ray's workers) uses it, and a login in it is moved out as MLFLOW_TRACKING_URI's is."""
    if getattr(args, "tracking_uri", None):
        environ["MLFLOW_TRACKING_URI"] = args.tracking_uri


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars or lines (log files)"
    )


def add_replicas(parser: argparse.ArgumentParser) -> None:
    """The model actors of evaluate and infer."""
    parser.add_argument(
        "--replicas",
        default=AUTO,
        type=replicas,
        metavar="N|MIN:MAX|auto",
        help="model actors: N, MIN:MAX to autoscale, or auto (the cluster's GPUs, or CPUs without GPUs)",
    )
    parser.add_argument(
        "--gpus-per-replica",
        default=AUTO,
        type=gpus,
        metavar="N|auto",
        help="GPUs per model actor; auto: 1 where the cluster has or can add GPU nodes, else 0",
    )


def replica_counts(text: str) -> tuple[int, int] | None:
    """`4` → (4, 4), `1:8` → (1, 8), `auto` → None; anything else, a ValueError saying what is allowed."""
    if text == AUTO:
        return None
    low, sep, high = text.partition(":")
    try:
        counts = (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        counts = (0, 0)
    if not 1 <= counts[0] <= counts[1]:
        raise ValueError(f"{text!r} is not N, MIN:MAX (1 <= MIN <= MAX) or auto")
    return counts


def replicas(text: str) -> str:
    """An argparse type: `auto`, N >= 1, or MIN:MAX with 1 <= MIN <= MAX (as written)."""
    try:
        replica_counts(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def gpus(text: str) -> str | float:
    """An argparse type: `auto` or a number of GPUs of at least 0."""
    return AUTO if text == AUTO else non_negative(text)


def loopback(host: str) -> bool:
    """Whether a server bound to `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
