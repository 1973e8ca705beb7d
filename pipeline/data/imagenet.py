"""ILSVRC-2012 folder layouts, as people download them.

    ROOT/train/<wnid>/<wnid>_<n>.JPEG
    ROOT/val/<wnid>/*.JPEG                                         (val in class folders), or
    ROOT/val/ILSVRC2012_val_<8 digits>.JPEG + ROOT/LOC_val_solution.csv   (Kaggle's flat val)
    ROOT/LOC_synset_mapping.txt                                    ("wnid name, other name, ...")

Class index = position of the wnid in sorted order (torchvision's order).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp")
SYNSET_MAPPING = "LOC_synset_mapping.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"


class LayoutError(InputError):
    """The source folder is not a usable ILSVRC-2012 layout; the message says what is missing."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Item:
    path: str
    wnid: str


@dataclass(frozen=True)
class Source:
    classes: list[ClassInfo]
    splits: dict[str, list[Item]]  # "train", "val"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_synset_mapping(path: Path) -> dict[str, str]:
    """wnid → human name (the first of the comma-separated synonyms)."""
    names = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        if not wnid.startswith("n") or not rest:
            raise LayoutError(f"{path}:{line_no}: expected 'wnid name, name, ...', got {line!r}")
        names[wnid] = rest.split(",")[0].strip()
    return names


def read_kaggle_val_solution(path: Path) -> dict[str, str]:
    """ImageId → wnid, from the first token of PredictionString."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise LayoutError(f"{path}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


def scan(root: str | Path) -> Source:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"source {root} is not a directory; pass the folder that holds train/ and val/")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise LayoutError(f"no train/ folder in {root}; expected train/<wnid>/<images>")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not wnids:
        raise LayoutError(f"{train_dir} holds no class folders; expected train/<wnid>/<images>")

    mapping_path = root / SYNSET_MAPPING
    names = read_synset_mapping(mapping_path) if mapping_path.is_file() else {}
    classes = [ClassInfo(i, wnid, names.get(wnid, wnid)) for i, wnid in enumerate(wnids)]

    train = [Item(str(p), wnid) for wnid in wnids for p in sorted((train_dir / wnid).iterdir()) if _is_image(p)]
    if not train:
        raise LayoutError(f"{train_dir} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    splits = {"train": train, "val": _scan_val(root, set(wnids))}
    return Source(classes, splits)


def _scan_val(root: Path, wnids: set[str]) -> list[Item]:
    val_dir = root / "val"
    if not val_dir.is_dir():
        raise LayoutError(f"no val/ folder in {root}")
    class_dirs = sorted(p for p in val_dir.iterdir() if p.is_dir())
    if class_dirs:
        items = [Item(str(p), d.name) for d in class_dirs for p in sorted(d.iterdir()) if _is_image(p)]
    else:
        solution = root / KAGGLE_VAL_SOLUTION
        if not solution.is_file():
            raise LayoutError(
                f"{val_dir} is flat but {solution.name} is missing; put Kaggle's {KAGGLE_VAL_SOLUTION} "
                "beside train/ and val/, or sort val/ into <wnid> folders"
            )
        labels = read_kaggle_val_solution(solution)
        files = sorted(p for p in val_dir.iterdir() if _is_image(p))
        unlabelled = [p.name for p in files if p.name.split(".")[0] not in labels]
        if unlabelled:
            raise LayoutError(f"{len(unlabelled)} val images have no row in {solution.name}, e.g. {unlabelled[:3]}")
        items = [Item(str(p), labels[p.name.split(".")[0]]) for p in files]
    if not items:
        raise LayoutError(f"{val_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    unknown = sorted({item.wnid for item in items} - wnids)
    if unknown:
        raise LayoutError(f"val labels name classes that train/ does not have: {unknown[:5]}")
    return items


def _is_image(path: Path) -> bool:
    return path.is_file() and is_image_name(path.name)
