"""Self-describing checkpoint directories.

    model.pt       AlexNet state_dict (torchvision key names)
    optimizer.pt   SGD state (momentum buffers)
    meta.json      epoch, metrics, config, classes, MLflow run id, dataset hash

Tensors load with ``weights_only=True``: a checkpoint cannot run code on the machine that reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.model import AlexNet

MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"


def save(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    directory = Path(directory)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))


def read_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def load_state(directory: str | Path, name: str = MODEL_FILE) -> dict[str, Any]:
    return torch.load(Path(directory) / name, map_location="cpu", weights_only=True)


def load_model(directory: str | Path) -> tuple[AlexNet, dict[str, Any]]:
    """The checkpoint's AlexNet (eval mode) and its meta."""
    meta = read_meta(directory)
    cfg = meta["config"]
    model = AlexNet(len(meta["classes"]), lrn=cfg["lrn"], dropout=cfg["dropout"])
    model.load_state_dict(load_state(directory))
    return model.eval(), meta
