"""A trained model as evaluation and inference serve it: which one, loaded once per actor, probabilities out.

    resolve(spec)   driver, once    → ModelRef: a registered version (an alias is resolved here to its
                                      version, so every actor of a job loads the same one) or a
                                      checkpoint directory, with what serving needs to know of it
    Predictor(ref)  model actor     → softmax probabilities (n, views, classes) of each batch of test
                                      views, handed to a function that says what to keep of them

Evaluation keeps hits at top-1 and top-5 per protocol; inference keeps each file's top five.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pytorch
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from pipeline import checkpoint
from pipeline.data.stats import normalization
from pipeline.errors import InputError
from pipeline.model import ImageClassifier

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class ModelError(InputError):
    """A model that cannot be found or used; the message says what is wrong."""


@dataclass(frozen=True)
class ModelRef:
    uri: str  # as given: models:/NAME/VERSION, models:/NAME@ALIAS, or a checkpoint directory (absolute)
    crop: int
    wnids: list[str]
    run_id: str | None  # the MLflow run the model came from
    tracking_uri: str
    normalization: tuple[np.ndarray, np.ndarray] | None = None  # a checkpoint's (mean, std), read by the driver
    names: tuple[str, ...] = ()  # class names, in the model's output order
    name: str | None = None  # the registered model's name
    version: str | None = None  # the registered version the URI resolved to
    image_size: int = 0  # the short side images were resized to before cropping (the stored squares' side)
    artifacts: str | None = None  # where that version's files are: what model actors download

    @property
    def version_uri(self) -> str:
        """models:/NAME/VERSION for a registered model, whatever alias named it; else the checkpoint."""
        return f"models:/{self.name}/{self.version}" if self.version else self.uri


def resolve(spec: str, tracking_uri: str) -> ModelRef:
    """Check the model exists and read what serving needs of it, before any cluster work."""
    if spec.startswith("models:/"):
        return _resolve_registered(spec, tracking_uri)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(f"model {spec!r} is neither a models:/ URI nor a checkpoint directory")
    meta = checkpoint.read_meta(path)
    crop = meta.config.crop
    return ModelRef(
        uri=str(path.resolve()),
        crop=crop,
        wnids=[c.wnid for c in meta.classes],
        run_id=meta.run_id,
        tracking_uri=tracking_uri,
        normalization=normalization(dataclasses.asdict(meta.colour), meta.config.normalize, crop),
        names=tuple(c.name for c in meta.classes),
        image_size=meta.image_size or _default_size(crop),
    )


def _resolve_registered(spec: str, tracking_uri: str) -> ModelRef:
    match = MODEL_URI.match(spec)
    if not match:
        raise ModelError(f"{spec!r}: write models:/NAME/VERSION or models:/NAME@ALIAS")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)  # the registry of the same server
    try:
        if match["version"]:
            version = client.get_model_version(match["name"], match["version"])
        else:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        # The version's own files, by location: MLflow 3.17 resolves models:/ URIs against its
        # global registry URI only, whatever tracking_uri a call is given.
        artifacts = client.get_model_version_download_uri(match["name"], version.version)
        with tempfile.TemporaryDirectory() as tmp:
            signature = Model.load(_download(f"{artifacts.rstrip('/')}/MLmodel", tracking_uri, tmp)).signature
            classes = _download(f"runs:/{version.run_id}/classes.json", tracking_uri, tmp)
            index = json.loads(Path(classes).read_text())
        params = client.get_run(version.run_id).data.params
    except MlflowException as exc:
        raise ModelError(f"cannot load {spec} from {tracking_uri}: {exc.message}") from exc
    crop = int(signature.inputs.inputs[0].shape[1])
    return ModelRef(
        uri=spec,
        crop=crop,
        wnids=[c["wnid"] for c in index],
        run_id=version.run_id,
        tracking_uri=tracking_uri,
        names=tuple(c.get("name", c["wnid"]) for c in index),
        name=match["name"],
        version=str(version.version),
        image_size=int(params.get("image_size") or _default_size(crop)),
        artifacts=artifacts,
    )


def _download(uri: str, tracking_uri: str, directory: str) -> str:
    """An artifact (runs:/… or a storage location) into `directory`, from the given tracking server."""
    return mlflow.artifacts.download_artifacts(uri, dst_path=directory, tracking_uri=tracking_uri)


def _default_size(crop: int) -> int:
    """The paper's ratio (256 for 224) when a model does not say what its images were resized to."""
    return round(crop * 256 / 224)


def load(ref: ModelRef) -> torch.nn.Module:
    """uint8 NHWC crops → logits: the registered program, or a checkpoint wrapped as it would be registered."""
    if ref.version:
        # Into a directory of our own, deleted after loading: MLflow's default is a fresh temporary
        # directory it never deletes (the model's size in /tmp, per actor, per job).
        with tempfile.TemporaryDirectory() as tmp:
            return mlflow.pytorch.load_model(_download(ref.artifacts, ref.tracking_uri, tmp))
    net, _ = checkpoint.load_model(ref.uri)
    mean, std = ref.normalization
    return ImageClassifier(net, mean, std).eval()


class Predictor:
    """A model actor: loads the model once; each batch's test views → probabilities → `keep`.

    Batches hold ``image``: (n, views, crop, crop, 3) uint8 and whatever else the pipeline carries;
    ``keep(probs, batch)`` gets the softmax probabilities (n, views, classes) and returns the rows.
    """

    def __init__(self, ref: ModelRef, keep: Callable[[torch.Tensor, dict[str, np.ndarray]], Any]) -> None:
        self.model = load(ref)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.model.to(self.device)
        self.keep = keep

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        views = torch.from_numpy(_writable(batch["image"])).to(self.device)
        n, v = views.shape[:2]
        logits = self.model(views.reshape(n * v, *views.shape[2:]))
        return self.keep(torch.softmax(logits.float(), dim=1).reshape(n, v, -1), batch)


def _writable(array: np.ndarray) -> np.ndarray:
    """Arrays from the object store are read-only views; torch wants memory it may write."""
    return array if array.flags.writeable else array.copy()
