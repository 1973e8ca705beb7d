"""A trained model as evaluation and inference serve it: which one, loaded once per actor, probabilities out.

    resolve(spec)   driver, once    → ModelRef: a registered version (an alias is resolved here to its
                                      version, so every actor of a job loads the same one), its files
                                      downloaded once and checked (pipeline.scoring.model_files), or a
                                      checkpoint directory, with what serving needs to know of it
    ship(ref)       driver, once    → the checked program's bytes in Ray's object store: actors need
                                      no MLflow login and load exactly the bytes that were checked
    Predictor(ref)  model actor     → softmax probabilities (n, views, classes) of each batch of test
                                      views, handed to a function that says what to keep of them

Evaluation keeps hits at top-1 and top-5 per protocol; inference keeps each file's top five.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow.artifacts
import numpy as np
import ray
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.data.stats import normalization
from pipeline.model import ImageClassifier
from pipeline.redaction import redact, scrub, scrubbed_output
from pipeline.scoring import model_files
from pipeline.scoring.model_files import ModelError
from pipeline.step import predict
from pipeline.train import checkpoint

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


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
    # The registered torch.export archive as checked: its bytes, after ship() an object ref to them.
    program: Any = field(default=None, repr=False, compare=False)
    digest: str = ""  # the archive's SHA-256, checked again where it is loaded

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
        image_size=meta.image_size,
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
        # global registry URI only, whatever tracking_uri a call is given. Downloaded once; what
        # is checked here is what the model actors load (model_files).
        artifacts = client.get_model_version_download_uri(match["name"], version.version)
        with tempfile.TemporaryDirectory() as tmp:
            program = model_files.check(Path(_download(artifacts, tracking_uri, tmp)), spec)
    except MlflowException as exc:
        raise ModelError(f"cannot load {spec} from {redact(tracking_uri)}: {scrub(exc.message)}") from exc
    return ModelRef(
        uri=spec,
        crop=program.crop,
        wnids=[c["wnid"] for c in program.classes],
        run_id=version.run_id,
        tracking_uri=tracking_uri,
        names=tuple(c["name"] for c in program.classes),
        name=match["name"],
        version=str(version.version),
        image_size=program.image_size,
        program=program.data,
        digest=program.digest,
    )


def _download(uri: str, tracking_uri: str, directory: str) -> str:
    """An artifact (runs:/… or a storage location) into `directory`, from the given tracking server."""
    return mlflow.artifacts.download_artifacts(uri, dst_path=directory, tracking_uri=tracking_uri)


def ship(ref: ModelRef) -> ModelRef:
    """`ref` with its registered program's bytes in Ray's object store (a checkpoint is read where it is):
    actors need no MLflow login, and the server sends the model once per job, not once per actor."""
    if not ref.version or not isinstance(ref.program, bytes):
        return ref
    return dataclasses.replace(ref, program=ray.put(ref.program))


def load(ref: ModelRef) -> torch.nn.Module:
    """uint8 NHWC crops → logits: the registered program the driver checked (its bytes, their digest
    checked again), or a checkpoint wrapped as it would be registered."""
    if ref.version:
        data = ref.program if isinstance(ref.program, bytes) else ray.get(ref.program)
        return model_files.load_program(data, ref.digest)
    net, _ = checkpoint.load_model(ref.uri)
    mean, std = ref.normalization
    return ImageClassifier(net, mean, std).eval()


class Predictor:
    """A model actor: loads the model once; each batch's test views → probabilities → `keep`.

    Batches hold ``image``: (n, views, crop, crop, 3) uint8 and whatever else the pipeline carries;
    ``keep(probs, batch)`` gets the softmax probabilities (n, views, classes) and returns the rows.
    """

    def __init__(self, ref: ModelRef, keep: Callable[[torch.Tensor, dict[str, np.ndarray]], Any]) -> None:
        scrubbed_output()  # what this actor prints reaches Ray's log files and `ray job logs`
        self.model = load(ref)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.model.to(self.device)
        self.keep = keep

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        return self.keep(predict(self.model, batch["image"], self.device), batch)
