"""Self-describing checkpoint directories.

    model.pt       AlexNet state_dict (torchvision key names)
    optimizer.pt   SGD state (momentum buffers)
    meta.json      pipeline.train.spec.CheckpointMeta: progress (epoch, step in epoch, validation
                   history), the epoch's metrics, config, classes, colour statistics, MLflow run
                   id, dataset hash

Tensors load with ``weights_only=True``: a checkpoint cannot run code on the machine that reads it.
A checkpoint for another class count or architecture fails with a message saying what differs.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from pipeline.config import TrainConfig
from pipeline.errors import InputError
from pipeline.model import AlexNet, architecture
from pipeline.storage import Location
from pipeline.train.spec import CheckpointMeta

MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"
SCORE = "val_top1_error"  # what Ray Train keeps the best checkpoints by (lowest first)


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message says why."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not fit the model it is loaded into (another class count or architecture);
    the message says what differs. Not a damaged file: an earlier checkpoint of the run would not fit either."""


# What reading a damaged checkpoint raises: a missing file, a truncated file (torch's zip reader
# raises RuntimeError), JSON or pickle. Not the storage's own errors (a network outage): those fail
# the attempt, and Ray Train restarts it.
UNREADABLE = (CheckpointError, FileNotFoundError, RuntimeError, ValueError, EOFError, KeyError,
              pickle.UnpicklingError, zipfile.BadZipFile)  # fmt: skip


@contextmanager
def staging(key: str) -> Iterator[Path]:
    """A private, empty local directory to build a checkpoint in before Ray Train persists it; removed after.

    `<tmp>/alexnet-checkpoints-<uid>/<run>/<pid>-<random>`: the user's own folder (mode 0700, checked:
    theirs, not a link, not open to others, so nobody else can swap a checkpoint's files before Ray
    Train uploads them), and in it one directory per checkpoint: two jobs of one name on a node, or
    two workers, never share one. A worker killed while it holds one (preemption, a lost node,
    `ray job stop`) leaves it behind; the run's next checkpoint on that node removes the leftovers
    of its own processes that are gone, so kills do not pile models up in /tmp.
    """
    base = staging_root() / key
    base.mkdir(mode=0o700, exist_ok=True)
    _remove_leftovers(base)
    path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def staging_root() -> Path:
    """This user's checkpoint staging folder on this machine, made or checked (private_dir)."""
    return private_dir(Path(tempfile.gettempdir()) / f"alexnet-checkpoints-{os.getuid()}")


def private_dir(path: Path) -> Path:
    """`path` as a directory of this user's alone: created 0700, or refused if it exists as anything else
    (a link, another user's, open to others): in a shared /tmp anyone may have made it first."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    problem = (
        "is a link" if stat.S_ISLNK(info.st_mode) else
        "is not a directory" if not stat.S_ISDIR(info.st_mode) else
        f"belongs to user id {info.st_uid}, not {os.getuid()}" if info.st_uid != os.getuid() else
        f"is open to other users (mode {stat.S_IMODE(info.st_mode):o})" if info.st_mode & 0o077 else None
    )  # fmt: skip
    if problem:
        raise CheckpointError(
            f"{path} {problem}: checkpoints are staged in a folder of this user's alone. Remove it (someone may have "
            "made it to read or swap checkpoints), or set TMPDIR to a directory of your own"
        )
    return path


def _remove_leftovers(base: Path) -> None:
    """Staging folders under `base` of processes that no longer run (this user's, named by staging())."""
    for entry in base.iterdir():
        match = re.fullmatch(r"(\d+)-[a-z0-9_]+", entry.name)
        if match and entry.is_dir() and entry.stat().st_uid == os.getuid() and not _running(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def save(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: CheckpointMeta) -> None:
    directory = Path(directory)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / META_FILE).write_text(meta.to_json())


@contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """A checkpoint directory, local or in S3, as a local directory for the duration."""
    if location.is_local:
        yield Path(location.path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(location.path, tmp, location.fs, pafs.LocalFileSystem())
        yield Path(tmp)


def complete(run_dir: Location) -> list[Location]:
    """The run's checkpoint directories that hold every file of a checkpoint, oldest first.

    Ray Train names them checkpoint_<timestamp>; one a job was killed while writing (or uploading)
    lacks files and is left out. Other entries (checkpoint_manager_snapshot.json) are not checkpoints.
    """
    found = []
    for entry in run_dir.listdir():
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
            directory = run_dir.join(entry.base_name)
            names = {e.base_name for e in directory.listdir() if e.type == pafs.FileType.File}
            if {MODEL_FILE, OPTIMIZER_FILE, META_FILE} <= names:
                found.append(directory)
    return sorted(found, key=lambda location: location.name())


def read_meta(directory: str | Path) -> CheckpointMeta:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint of this project (no {META_FILE})")
    return CheckpointMeta.from_json(path.read_text())


def load_state(directory: str | Path, name: str = MODEL_FILE) -> dict[str, Any]:
    return torch.load(Path(directory) / name, map_location="cpu", weights_only=True)


def load_model(directory: str | Path) -> tuple[AlexNet, CheckpointMeta]:
    """The checkpoint's AlexNet (eval mode) and its meta."""
    meta = read_meta(directory)
    model = AlexNet.from_config(len(meta.classes), meta.config.to_dict())
    _load_checked(model, load_state(directory), directory)
    return model.eval(), meta


def restore(directory: str | Path, model: AlexNet, cfg: TrainConfig, num_classes: int) -> CheckpointMeta:
    """Load the checkpoint's weights into `model` (built from `cfg` for `num_classes`) and return its meta.

    A checkpoint for another class count or architecture fails with what differs.
    """
    meta = read_meta(directory)
    differences = []
    if len(meta.classes) != num_classes:
        differences.append(f"{len(meta.classes)} classes in the checkpoint, {num_classes} here")
    theirs, ours = architecture(meta.config.to_dict()), architecture(cfg.to_dict())
    differences += [f"{k}={theirs[k]} in the checkpoint, {k}={ours[k]} here" for k in ours if theirs[k] != ours[k]]
    if differences:
        raise CheckpointMismatch(f"checkpoint {directory} does not fit this model: {'; '.join(differences)}")
    _load_checked(model, load_state(directory), directory)
    return meta


def restore_latest(
    latest: Location, run_dir: Location, model: AlexNet, cfg: TrainConfig, num_classes: int, say
) -> tuple[CheckpointMeta, dict[str, Any], Location]:
    """Weights (into `model`) and optimizer state from `latest`, the checkpoint Ray Train hands a
    restarted or resumed run; if it cannot be read (a file damaged or missing), from the newest
    earlier complete checkpoint of the run that can, saying which and why. Returns (meta, optimizer
    state, the checkpoint used). A checkpoint that does not fit the model is not skipped: none would.
    """
    earlier = [c for c in reversed(complete(run_dir)) if c.name() < latest.name()]
    problems: list[str] = []
    for place in [latest, *earlier]:
        try:
            with local_copy(place) as directory:
                meta = restore(directory, model, cfg, num_classes)
                optimizer_state = load_state(directory, OPTIMIZER_FILE)
        except CheckpointMismatch:
            raise
        except UNREADABLE as exc:
            text = str(exc).strip().splitlines()
            problems.append(f"{place.uri} ({type(exc).__name__}: {text[0] if text else ''})")
            continue
        if problems:
            say(f"checkpoint {problems[0]} cannot be read; resuming from the previous one, {place.uri}", flush=True)
        return meta, optimizer_state, place
    raise CheckpointError(
        f"no checkpoint of {run_dir.uri} can be read: {'; '.join(problems)}. Start the run again under a new --name"
    )


def _load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: str | Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        shapes = [
            f"{k}: {found[k]} vs {expected[k]}"
            for k in sorted(expected.keys() & found.keys())
            if found[k] != expected[k]
        ]
        raise CheckpointMismatch(
            f"checkpoint {directory} holds another architecture: missing {missing[:4]}, unexpected {extra[:4]}, "
            f"shapes (checkpoint vs model) {shapes[:4]}"
        )
    model.load_state_dict(state)
