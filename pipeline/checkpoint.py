"""Self-describing checkpoint directories.

    model.pt       AlexNet state_dict (torchvision key names)
    optimizer.pt   SGD state (momentum buffers)
    meta.json      pipeline.spec.CheckpointMeta: progress (epoch, step in epoch, validation
                   history), the epoch's metrics, config, classes, colour statistics, MLflow run
                   id, dataset hash

Tensors load with ``weights_only=True``: a checkpoint cannot run code on the machine that reads it.
A checkpoint for another class count or architecture fails with a message saying what differs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from pipeline.config import TrainConfig
from pipeline.errors import InputError
from pipeline.model import AlexNet, architecture
from pipeline.spec import CheckpointMeta
from pipeline.storage import Location

MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"
SCORE = "val_top1_error"  # what Ray Train keeps the best checkpoints by (lowest first)


class CheckpointError(InputError):
    """A checkpoint that does not fit the model it is loaded into; the message says what differs."""


@contextmanager
def staging(key: str) -> Iterator[Path]:
    """A private, empty local directory to build a checkpoint in before Ray Train persists it; removed after.

    `<tmp>/alexnet-checkpoints/<run>/<pid>-<random>`, mode 0700: two jobs of one name on a node, or
    two workers, never share one. A worker killed while it holds one (preemption, a lost node,
    `ray job stop`) leaves it behind; the run's next checkpoint on that node removes the leftovers
    of its own processes that are gone, so kills do not pile models up in /tmp.
    """
    base = Path(tempfile.gettempdir()) / "alexnet-checkpoints" / key
    base.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(base)
    path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
        raise CheckpointError(f"checkpoint {directory} does not fit this model: {'; '.join(differences)}")
    _load_checked(model, load_state(directory), directory)
    return meta


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
        raise CheckpointError(
            f"checkpoint {directory} holds another architecture: missing {missing[:4]}, unexpected {extra[:4]}, "
            f"shapes (checkpoint vs model) {shapes[:4]}"
        )
    model.load_state_dict(state)
