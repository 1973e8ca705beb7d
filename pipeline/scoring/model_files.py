"""A registered version's files as this project loads them: downloaded once, checked, digested, and
the very bytes that were checked loaded by torch.export alone.

    check(root, spec)           driver: the version's downloaded folder → Program (the torch.export
                                archive's bytes, their SHA-256, the class index and preprocessing
                                that travel with it), or ModelError naming what is wrong
    load_program(data, digest)  model actor: those bytes, their digest checked again → the module

Why not `mlflow.pytorch.load_model`: it puts a version's `code/` folder first on sys.path and,
when `data/model.pth` exists, imports the module named in `data/pickle_module_info.txt` before it
honours MLFLOW_ALLOW_PICKLE_DESERIALIZATION. Anyone who can write a version's artifacts would get
an import in every evaluation and inference actor. Here a version is used only if its folder holds
exactly what jobs/train.py registers: MLflow's metadata, `data/model.pt2` alone, and the class
index and preprocessing as extra files. The archive is checked with MLflow's own pickle-free check
(pickle deserialisation off): every record is plain metadata, raw tensor bytes, or a tensor
`torch.load(weights_only=True)` accepts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

PT2_FILE = "data/model.pt2"  # what mlflow.pytorch writes for serialization_format="pt2"
CLASSES_FILE, PREPROCESSING_FILE = "extra_files/classes.json", "extra_files/preprocessing.json"
# Every file a version jobs/train.py registered may hold (MLflow 3's metadata around the program).
EXPECTED = frozenset({
    "MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "constraints.txt", "input_example.json",
    "serving_input_example.json", "registered_model_meta", PT2_FILE, CLASSES_FILE, PREPROCESSING_FILE,
})  # fmt: skip
PICKLE_FILES = ("data/model.pth", "data/pickle_module_info.txt")  # MLflow's pickle format: code runs on load
NO_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


class ModelError(InputError):
    """A model that cannot be found or used; the message says what is wrong."""


@dataclass(frozen=True)
class Program:
    data: bytes  # the torch.export archive, as checked
    digest: str  # its SHA-256: what a model actor checks before loading
    crop: int  # the input's side (from the signature)
    classes: list[dict[str, Any]]  # classes.json as registered with the program: index, wnid, name
    image_size: int  # the short side images were resized to (preprocessing.json)


def check(root: Path, spec: str) -> Program:
    """The version's folder `root` (downloaded once) as a Program, or ModelError saying what is wrong."""
    files = _files(root, spec)
    description = _description(root, spec)
    flavor = description.flavors.get("pytorch")
    if flavor is None:
        raise ModelError(f"{spec} is not a PyTorch model (flavors: {', '.join(description.flavors)}); "
                         "these jobs load only versions jobs/train.py registered")  # fmt: skip
    code = flavor.get("code") or next((f.split("/")[0] for f in files if f.startswith("code/")), None)
    if code:
        raise ModelError(f"{spec} carries code of its own ({code}/); these jobs load only models "
                         "without code: torch.export programs as jobs/train.py registers them")  # fmt: skip
    data = sorted(f for f in files if f.startswith("data/"))
    if flavor.get("model_data", "data") != "data" or data != [PT2_FILE]:
        _refuse_data(spec, data)
    unexpected = sorted(files - EXPECTED)
    if unexpected:
        raise ModelError(
            f"{spec} holds files a version jobs/train.py registers does not ({', '.join(unexpected[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''}); refused: register the model again with jobs/train.py"
        )
    program = (root / PT2_FILE).read_bytes()  # read once: these bytes are checked, digested and shipped
    _check_pickle_free(program, spec)
    signature = description.signature
    if signature is None or not signature.inputs.inputs:
        raise ModelError(f"{spec} has no input signature: it was not registered by jobs/train.py")
    classes, preprocessing = _json(root, CLASSES_FILE), _json(root, PREPROCESSING_FILE)
    if classes is None or not (preprocessing or {}).get("resize_short_side"):
        raise ModelError(f"{spec} lacks the class index or preprocessing jobs/train.py registers with the program")
    return Program(
        data=program,
        digest=hashlib.sha256(program).hexdigest(),
        crop=int(signature.inputs.inputs[0].shape[1]),
        classes=classes,
        image_size=int(preprocessing["resize_short_side"]),
    )


def load_program(data: bytes, digest: str):
    """The checked archive's module: uint8 NHWC crops → logits. Bytes that are not the ones checked
    (their SHA-256 differs) are refused before torch reads them."""
    found = hashlib.sha256(data).hexdigest()
    if found != digest:
        raise ModelError(f"the model's bytes are not the ones checked (SHA-256 {found[:12]}, expected {digest[:12]})")
    import torch

    return torch.export.load(io.BytesIO(data)).module()


def _files(root: Path, spec: str) -> set[str]:
    """Every file under `root`, relative; a link or anything not a regular file is refused."""
    files = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise ModelError(f"{spec}: {rel} is not a regular file; refused")
        if path.is_file():
            files.add(rel)
    return files


def _description(root: Path, spec: str):
    from mlflow.models import Model

    if not (root / "MLmodel").is_file():
        raise ModelError(f"{spec} has no MLmodel file: it is not an MLflow model")
    return Model.load(str(root / "MLmodel"))


def _refuse_data(spec: str, data: list[str]) -> None:
    found = ", ".join(data) or "nothing"
    if any(f in data for f in PICKLE_FILES) and PT2_FILE not in data:
        raise ModelError(
            f"{spec} is saved in pickle format, whose loading runs code from the file ({found}); these jobs load "
            "only torch.export programs (model.pt2), as jobs/train.py registers them: register the model again with it"
        )
    if PT2_FILE in data:
        raise ModelError(
            f"{spec} holds {', '.join(f for f in data if f != PT2_FILE)} beside its torch.export program: "
            "MLflow's loader would import the module a pickle_module_info.txt names, or read a model.pth, before "
            "anything else. These jobs load only a data/ folder holding model.pt2 alone; refused"
        )
    raise ModelError(
        f"{spec} is not a pt2 program ({found} in data/); these jobs load only torch.export programs "
        "(model.pt2), as jobs/train.py registers them: register the model again with it"
    )


@contextmanager
def _no_pickle() -> Iterator[None]:
    previous = os.environ.get(NO_PICKLE_ENV)
    os.environ[NO_PICKLE_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(NO_PICKLE_ENV, None)
        else:
            os.environ[NO_PICKLE_ENV] = previous


def _check_pickle_free(program: bytes, spec: str) -> None:
    """MLflow's check of a pt2 archive (`mlflow.pytorch`, MLflow 3.17), run as its loader runs it with
    pickle deserialisation off, on the bytes given: every record plain metadata, raw tensor bytes,
    or weights_only-safe."""
    from mlflow.exceptions import MlflowException
    from mlflow.pytorch import _validate_pt2_archive_is_pickle_free

    if not zipfile.is_zipfile(io.BytesIO(program)):
        raise ModelError(f"{spec}: its model.pt2 is not a torch.export archive (not a zip file); refused")
    with _no_pickle():
        try:
            _validate_pt2_archive_is_pickle_free(io.BytesIO(program))
        except MlflowException as exc:
            raise ModelError(
                f"{spec}: its model.pt2 is not pickle-free ({exc.message.split('. ')[0]}); refused"
            ) from exc


def _json(root: Path, rel: str) -> Any:
    path = root / rel
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{rel} of the model is not JSON ({exc})") from exc
