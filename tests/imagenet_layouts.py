"""Builders for the ILSVRC-2012 layouts and the messy files real downloads hold (used by the tests)."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def kaggle_truth(raw: Path) -> dict[str, str]:
    """ImageId → wnid of a sample made by make_sample (flat val + LOC_val_solution.csv)."""
    with open(raw / "LOC_val_solution.csv", newline="") as f:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}


def as_val_folders(raw: Path, out: Path) -> Path:
    """The same images with val/ sorted into wnid folders and no label file."""
    shutil.copytree(raw, out)
    truth = kaggle_truth(raw)
    (out / "LOC_val_solution.csv").unlink()
    for image in sorted((out / "val").iterdir()):
        (out / "val" / truth[image.name.split(".")[0]]).mkdir(exist_ok=True)
        image.rename(out / "val" / truth[image.name.split(".")[0]] / image.name)
    return out


def as_devkit(raw: Path, out: Path, devkit_dir: str = "ILSVRC2012_devkit_t12/data") -> Path:
    """Flat val labelled by the devkit: ground-truth ids in the devkit's own (not sorted-wnid) order.

    The ids are assigned in *reverse* wnid order, so code that reads them as sorted-wnid class
    indices gets every label wrong. No LOC_* files: names come from meta.mat.
    """
    shutil.copytree(raw, out)
    truth = kaggle_truth(raw)
    (out / "LOC_val_solution.csv").unlink()
    (out / "LOC_synset_mapping.txt").unlink()
    wnids = sorted({w.name for w in (out / "train").iterdir()})
    ids = {wnid: len(wnids) - i for i, wnid in enumerate(wnids)}  # n0... → N, ..., last → 1
    data = out / devkit_dir
    data.mkdir(parents=True)
    write_devkit_meta(data / "meta.mat", [(ids[w], w, f"devkit name of {w}, synonym") for w in wnids])
    lines = [str(ids[truth[f"ILSVRC2012_val_{n:08d}"]]) for n in range(1, len(truth) + 1)]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(lines) + "\n")
    return out


def write_devkit_meta(path: Path, leaves: list[tuple[int, str, str]]) -> None:
    """A meta.mat shaped like the devkit's: a (N, 1) struct array `synsets`, leaves plus one inner node."""
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height")
    rows = [(i, w, words, "a gloss", 0, np.zeros((1, 0)), 0) for i, w, words in leaves]
    rows.append((len(leaves) + 1, "n00001740", "entity", "the root", len(leaves), np.arange(1, len(leaves) + 1), 9))
    synsets = np.array(rows, dtype=[(f, "O") for f in fields]).reshape(-1, 1)
    scipy.io.savemat(path, {"synsets": synsets})


def jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="JPEG", quality=95)
    return out.getvalue()


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def red(h: int = 80, w: int = 100) -> np.ndarray:
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 0] = 220
    return pixels
