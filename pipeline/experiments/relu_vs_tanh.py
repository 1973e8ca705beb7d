"""The paper's Figure 1: a four-layer CNN with ReLUs reaches 25% training error on CIFAR-10 about
six times faster than the same network with tanh units.

Both arms are the same network (three 5×5 convolutions with 3×3/2 max pooling, one linear layer;
no dropout, no weight decay, no normalisation layers), from the same initial weights (the seed),
trained on the same batches in the same order (the seed and the epoch), as two Ray Train runs at
the same time. After every epoch each arm measures its training error on the whole training set
in eval mode; the epoch at which it first reaches the target is interpolated linearly between
the epoch before and the epoch after (epoch 0 is the untrained network).

Data: CIFAR-10 in its python-pickle format (data_batch_1..5: ``data`` N×3072 uint8 in
channel-major rows, ``labels``), or any prepared shards (the bundled sample) resized to 32×32.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import DataError
from pipeline.storage import locate

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
SIZE = 32  # CIFAR-10's images; the sample is resized to it


class FourLayerNet(nn.Module):
    """conv 5×5 (32) → pool → conv 5×5 (32) → pool → conv 5×5 (64) → pool → linear (classes)."""

    def __init__(self, activation: str, num_classes: int = 10) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2), act(), nn.MaxPool2d(3, 2, ceil_mode=True),  # 32 → 16
            nn.Conv2d(32, 32, 5, padding=2), act(), nn.MaxPool2d(3, 2, ceil_mode=True),  # 16 → 8
            nn.Conv2d(32, 64, 5, padding=2), act(), nn.MaxPool2d(3, 2, ceil_mode=True),  # 8 → 4
        )  # fmt: skip
        self.classifier = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# --- data ---------------------------------------------------------------------------------------


class ArraysOnly(pickle.Unpickler):
    """An unpickler for CIFAR-10's batches: dicts, lists, bytes and numpy arrays, nothing else.

    A pickle names the functions it calls to rebuild its objects; a crafted one names os.system.
    CIFAR's need numpy's array reconstructors alone: any other name is refused before it is looked up.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def load_cifar10(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's training set from its python pickles: images (N, 32, 32, 3) uint8, labels (N,) int64.

    Read with ArraysOnly: a file in the folder that is not what CIFAR-10 ships runs nothing."""
    root = Path(root)
    batches = sorted(root.glob("data_batch_*"))
    if not batches:
        raise DataError(
            f"no CIFAR-10 training batches (data_batch_1 … data_batch_5) in {root}: pass the folder "
            "'cifar-10-batches-py' of the python version of CIFAR-10"
        )
    images, labels = [], []
    for path in batches:
        try:
            with path.open("rb") as f:
                batch = ArraysOnly(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as exc:
            raise DataError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    return np.concatenate(images), np.concatenate(labels)


def load_shards(shard_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The training split of prepared shards, each stored square resized to 32×32 (antialiased)."""
    train = locate(str(shard_dir)).join("train")
    files = (
        sorted((e for e in train.listdir() if e.base_name.endswith(".parquet")), key=lambda e: e.path)
        if train.is_dir()
        else []
    )
    if not files:
        raise DataError(f"no training shards in {train.uri}: prepare them with jobs/prepare.py --output {shard_dir}")
    images, labels = [], []
    for entry in files:
        with train.fs.open_input_file(entry.path) as f:
            table = pq.read_table(f, columns=["image", "label"])
        for data in table["image"].to_pylist():
            with Image.open(io.BytesIO(data)) as image:
                small = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0)
            images.append(np.asarray(small))
        labels.append(table["label"].to_numpy().astype(np.int64))
    return np.stack(images), np.concatenate(labels)


# --- one arm, on a Ray Train worker -------------------------------------------------------------


def train_arm(loop_config: dict[str, Any]) -> list[float]:
    """Train one activation; return the training error after every epoch (index 0: untrained)."""
    import ray

    torch.set_num_threads(1)
    images_np, labels_np = ray.get(loop_config["data"][0])
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).float().div_(255)
    mean, std = images.mean(dim=(0, 2, 3), keepdim=True), images.std(dim=(0, 2, 3), keepdim=True)
    images = (images - mean) / std
    labels = torch.from_numpy(labels_np)
    torch.manual_seed(loop_config["seed"])  # the same initial weights in both arms
    model = FourLayerNet(loop_config["activation"], int(labels.max()) + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=loop_config["lr"], momentum=0.9)
    batch = loop_config["batch_size"]
    errors = [_training_error(model, images, labels)]
    for epoch in range(1, loop_config["epochs"] + 1):
        model.train()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(loop_config["seed"] * 1000 + epoch))
        for start in range(0, len(order) - batch + 1, batch):  # the same batches, in the same order, in both arms
            idx = order[start : start + batch]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        errors.append(_training_error(model, images, labels))
        print(f"{loop_config['activation']:>4}  epoch {epoch:>3}/{loop_config['epochs']}  training error {errors[-1]:.3f}",
              flush=True)  # fmt: skip
    return errors


@torch.no_grad()
def _training_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    wrong = sum(
        int((model(images[i : i + 1024]).argmax(1) != labels[i : i + 1024]).sum()) for i in range(0, len(labels), 1024)
    )
    return wrong / len(labels)


# --- the experiment -----------------------------------------------------------------------------


@dataclass
class Arm:
    activation: str
    lr: float
    training_error: list[float] = field(default_factory=list)
    epochs_to_target: float | None = None


def epochs_to_target(errors: list[float], target: float) -> float | None:
    """The (linearly interpolated) epoch at which the training error first reaches `target`."""
    for epoch in range(1, len(errors)):
        if errors[epoch] <= target:
            before, after = errors[epoch - 1], errors[epoch]
            return epoch - 1 + (before - target) / (before - after) if before > after else float(epoch)
    return None


@dataclass(frozen=True)
class Recipe:
    """How both arms train: the same data, epochs, batch and seed; a learning rate each."""

    epochs: int
    target: float  # the training error whose epoch count is compared
    lrs: dict[str, float]  # per activation
    batch_size: int = 128
    seed: int = 0


def run(
    images: np.ndarray,
    labels: np.ndarray,
    recipe: Recipe,
    cpus_per_arm: float = 1.0,
    log: Callable[[str], None] = print,
) -> dict[str, Arm]:
    """Both arms as two Ray Train runs at once (one worker each); their training-error curves."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = ray.put((images, labels))
    arms = {name: Arm(name, recipe.lrs[name]) for name in ACTIVATIONS}
    failures: dict[str, BaseException] = {}
    storage = Path(tempfile.mkdtemp(prefix="relu-vs-tanh-"))  # Ray Train's run folders; nothing kept

    def fit(arm: Arm) -> None:
        trainer = TorchTrainer(
            train_arm,
            train_loop_config={
                "data": [data],
                "activation": arm.activation,
                "lr": arm.lr,
                "epochs": recipe.epochs,
                "batch_size": recipe.batch_size,
                "seed": recipe.seed,
            },  # fmt: skip
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus_per_arm}),
            run_config=RunConfig(name=f"relu-vs-tanh-{arm.activation}", storage_path=str(storage)),
        )
        try:
            arm.training_error = trainer.fit().return_value
        except BaseException as exc:  # noqa: BLE001 (re-raised after both threads end)
            failures[arm.activation] = exc

    log(
        f"training both arms at once: {len(labels)} images, {recipe.epochs} epochs, batch {recipe.batch_size}, "
        f"seed {recipe.seed}"
    )
    threads = [threading.Thread(target=fit, args=(arm,), name=name) for name, arm in arms.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shutil.rmtree(storage, ignore_errors=True)
    if failures:
        name, exc = next(iter(failures.items()))
        raise RuntimeError(f"the {name} arm failed: {exc}") from exc
    for arm in arms.values():
        arm.epochs_to_target = epochs_to_target(arm.training_error, recipe.target)
    return arms


def summary(arms: dict[str, Arm], target: float, data: str) -> dict[str, Any]:
    relu, tanh = arms["relu"].epochs_to_target, arms["tanh"].epochs_to_target
    ratio = tanh / relu if relu and tanh else None
    return {
        "target_error": target,
        "data": data,
        "epochs": len(arms["relu"].training_error) - 1,
        "arms": {name: asdict(arm) for name, arm in arms.items()},
        "epochs_to_target": {"relu": relu, "tanh": tanh},
        "ratio": ratio,  # tanh ÷ ReLU; null when an arm never reached the target
        # when only ReLU got there, tanh needs more than all the epochs run: the ratio is at least this
        "ratio_at_least": None if ratio or not relu else (len(arms["tanh"].training_error) - 1) / relu,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = {"relu": ("-", "tab:blue", "ReLU"), "tanh": ("--", "tab:orange", "tanh")}
    for name, arm in result["arms"].items():
        line, colour, label = styles[name]
        reached = arm["epochs_to_target"]
        suffix = f" (target at epoch {reached:.1f})" if reached else " (target not reached)"
        ax.plot(range(len(arm["training_error"])), arm["training_error"], line, color=colour, label=label + suffix)
    ax.axhline(
        result["target_error"], color="grey", linewidth=0.8, linestyle=":", label=f"{result['target_error']:.0%} target"
    )
    if result["ratio"]:
        title = (
            f"tanh needs {result['ratio']:.1f}× the epochs of ReLU to reach {result['target_error']:.0%} training error"
        )
    elif result["ratio_at_least"]:
        title = f"tanh needs > {result['ratio_at_least']:.1f}× the epochs of ReLU (it never reached the target)"
    else:
        title = "neither arm reached the target: run more epochs"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epochs")
    ax.set_ylabel("training error rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / "relu_vs_tanh.png", out / "relu_vs_tanh.json"
    plot(result, png)
    js.write_text(json.dumps(result, indent=1) + "\n")
    return png, js


def log_to_mlflow(
    tracking_uri: str, result: dict[str, Any], files: tuple[Path, Path], experiment: str, batch_size: int, seed: int
) -> tuple[str, dict[str, str]]:
    """One parent run (the figure, the JSON, the ratio) with one child run per arm (its curve).

    Returns the parent's run id and each arm's child run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)

    def new_run(name: str, params: dict[str, Any], parent: str | None = None) -> str:
        tags = {"mlflow.parentRunId": parent} if parent else None
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run_id

    now = int(time.time() * 1000)
    parent = new_run("relu-vs-tanh", {"target_error": result["target_error"], "epochs": result["epochs"],
                                      "data": result["data"], "batch_size": batch_size, "seed": seed})  # fmt: skip
    children = {}
    for name, arm in result["arms"].items():
        child = new_run(name, {"activation": name, "lr": arm["lr"], "batch_size": batch_size, "seed": seed}, parent)
        metrics = [Metric("training_error", error, now, epoch) for epoch, error in enumerate(arm["training_error"])]
        if arm["epochs_to_target"] is not None:
            metrics.append(Metric("epochs_to_target", arm["epochs_to_target"], now, 0))
        client.log_batch(child, metrics=metrics)
        client.set_terminated(child)
        children[name] = child
    if result["ratio"] is not None:
        client.log_metric(parent, "ratio_tanh_to_relu", result["ratio"])
    for path in files:
        client.log_artifact(parent, str(path))
    client.set_terminated(parent)
    return parent, children
