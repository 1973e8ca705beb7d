"""A trained model as evaluation and inference serve it: which one, loaded once per actor, probabilities out.

    resolve(spec)   driver, once    → ModelRef: a registered version (an alias is resolved here to its
                                      version, so every actor of a job loads the same one) or a
                                      checkpoint directory, with what serving needs to know of it
    ship(ref)       driver, once    → the version's files downloaded here and put in Ray's object
                                      store: actors need no MLflow login, and the server sends the
                                      model once per job, not once per actor
    Predictor(ref)  model actor     → softmax probabilities (n, views, classes) of each batch of test
                                      views, handed to a function that says what to keep of them

Evaluation keeps hits at top-1 and top-5 per protocol; inference keeps each file's top five.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pytorch
import numpy as np
import ray
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from pipeline import checkpoint
from pipeline.data.stats import normalization
from pipeline.errors import InputError
from pipeline.model import ImageClassifier
from pipeline.step import predict

PT2_FILE = "model.pt2"  # what mlflow.pytorch writes for serialization_format="pt2"
NO_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
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
    artifacts: str | None = None  # where that version's files are in MLflow
    files: Any = None  # after ship(): an object ref to {relative path: bytes} of those files

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
            description = Model.load(_download(f"{artifacts.rstrip('/')}/MLmodel", tracking_uri, tmp))
            _check_format(spec, description, artifacts, tracking_uri)
            signature = description.signature
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


def _check_format(spec: str, description: Model, artifacts: str, tracking_uri: str) -> None:
    """A version this project registered: a torch.export program (data/model.pt2), no code of its own.

    Anything else is refused before any cluster work. A pickle-format version (data/model.pth)
    runs whatever its pickle says when loaded, and a version with a code/ folder puts that folder
    on sys.path; anyone who can register a version could make one.
    """
    flavor = description.flavors.get("pytorch")
    if flavor is None:
        raise ModelError(f"{spec} is not a PyTorch model (flavors: {', '.join(description.flavors)}); "
                         "these jobs load only versions jobs/train.py registered")  # fmt: skip
    if flavor.get("code"):
        raise ModelError(f"{spec} carries code of its own ({flavor['code']}/); these jobs load only models "
                         "without code: torch.export programs as jobs/train.py registers them")  # fmt: skip
    data = f"{artifacts.rstrip('/')}/{flavor.get('model_data', 'data')}"
    files = {posixpath.basename(f.path) for f in mlflow.artifacts.list_artifacts(artifact_uri=data, tracking_uri=tracking_uri)}  # fmt: skip
    if PT2_FILE not in files:
        found = ", ".join(sorted(files)) or "nothing"
        kind = "pickle format, whose loading runs code from the file" if "model.pth" in files else "not a pt2 program"
        raise ModelError(
            f"{spec} is saved in {kind} ({found} in {flavor.get('model_data', 'data')}/); these jobs load only "
            f"torch.export programs ({PT2_FILE}), as jobs/train.py registers them: register the model again with it"
        )


@contextmanager
def _no_pickle() -> Iterator[None]:
    """MLflow's pickle deserialisation off while a model loads (it defaults to on): a pt2 archive is
    checked to hold only tensors and plain data before torch.export.load reads it."""
    previous = os.environ.get(NO_PICKLE_ENV)
    os.environ[NO_PICKLE_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(NO_PICKLE_ENV, None)
        else:
            os.environ[NO_PICKLE_ENV] = previous


def _download(uri: str, tracking_uri: str, directory: str) -> str:
    """An artifact (runs:/… or a storage location) into `directory`, from the given tracking server."""
    return mlflow.artifacts.download_artifacts(uri, dst_path=directory, tracking_uri=tracking_uri)


def _default_size(crop: int) -> int:
    """The paper's ratio (256 for 224) when a model does not say what its images were resized to."""
    return round(crop * 256 / 224)


def ship(ref: ModelRef) -> ModelRef:
    """`ref` with its registered version's files in Ray's object store (a checkpoint is read where it is)."""
    if not ref.version:
        return ref
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(_download(ref.artifacts, ref.tracking_uri, tmp))
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return dataclasses.replace(ref, files=ray.put(files))


def load(ref: ModelRef) -> torch.nn.Module:
    """uint8 NHWC crops → logits: the registered program, or a checkpoint wrapped as it would be registered."""
    if ref.version:
        # Into a directory of our own, deleted after loading: MLflow's default is a fresh temporary
        # directory it never deletes (the model's size in /tmp, per actor, per job).
        with tempfile.TemporaryDirectory() as tmp, _no_pickle():
            if ref.files is None:
                return mlflow.pytorch.load_model(_download(ref.artifacts, ref.tracking_uri, tmp))
            for rel, data in ray.get(ref.files).items():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / rel).write_bytes(data)
            return mlflow.pytorch.load_model(tmp)
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

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        return self.keep(predict(self.model, batch["image"], self.device), batch)
