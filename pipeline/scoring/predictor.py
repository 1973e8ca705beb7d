"""A trained model in a model actor: loaded once from the bytes the driver checked, probabilities out.

    ModelRef        what a job scores with: the version and its classes, crop and image size, and
                    the checked program's bytes (pipeline.scoring.loading.resolve makes one)
    ship(ref)       driver, once    → the checked program's bytes in Ray's object store: actors need
                                      no MLflow login and load exactly the bytes that were checked
    Predictor(ref)  model actor     → softmax probabilities (n, views, classes) of each batch of test
                                      views, handed to a function that says what to keep of them
    top_k(probs)    model actor     → each image's five likeliest classes (the views averaged): what
                                      batch inference's rows and the endpoint's answers hold

No MLflow here: a model actor imports torch and the project's model code only, which is most of
what it costs to start one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from pipeline.model import ImageClassifier
from pipeline.redaction import scrubbed_output
from pipeline.scoring import model_files
from pipeline.step import predict
from pipeline.train import checkpoint


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


def top_k(probs: torch.Tensor, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (n, views, classes) → each image's k likeliest classes of the views' average:
    probabilities (n, k) and class indices (n, k), likeliest first, and whether every probability of
    the image is finite (NaN weights still rank classes: a row without it is the model's error)."""
    top_p, top_i = probs.mean(dim=1).topk(min(k, probs.shape[2]), dim=1)
    finite = torch.isfinite(probs).flatten(1).all(dim=1)
    return top_p.cpu().numpy(), top_i.cpu().numpy(), finite.cpu().numpy()
