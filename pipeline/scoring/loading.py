"""A trained model as evaluation and inference name it: which one, resolved and checked once, on the driver.

    resolve(spec)   driver, once    → ModelRef: a registered version (an alias is resolved here to its
                                      version, so every actor of a job loads the same one), its files
                                      downloaded once and checked (pipeline.scoring.model_files), or a
                                      checkpoint directory, with what serving needs to know of it
    alias_version   endpoint replica → the version models:/NAME@ALIAS names now (one registry read)

What the model actors run (ship, load, Predictor) is in pipeline.scoring.predictor, which imports
no MLflow; it is re-exported here.

Evaluation keeps hits at top-1 and top-5 per protocol; inference keeps each file's top five.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.data.stats import normalization
from pipeline.redaction import redact, scrub
from pipeline.scoring import model_files
from pipeline.scoring.model_files import ModelError
from pipeline.scoring.predictor import ModelRef, Predictor, load, ship  # noqa: F401 (the actors' side)
from pipeline.train import checkpoint

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


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


def alias_version(spec: str, tracking_uri: str) -> str:
    """The version `spec` (models:/NAME@ALIAS) names now: one read of the registry, nothing downloaded."""
    match = MODEL_URI.match(spec)
    if not match or not match["alias"]:
        raise ModelError(f"{spec!r} is not models:/NAME@ALIAS")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        return str(client.get_model_version_by_alias(match["name"], match["alias"]).version)
    except MlflowException as exc:
        raise ModelError(f"cannot read {spec} from {redact(tracking_uri)}: {scrub(exc.message)}") from exc


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
