"""Prepared datasets: Parquet shards plus the JSON files that describe them.

    OUT/train/train-00000.parquet ...   columns: image (JPEG bytes), label (int32), wnid, key
    OUT/val/val-00000.parquet ...
    OUT/classes.json                    [{"index", "wnid", "name"}, ...] in sorted-wnid order
    OUT/manifest.json                   image size, counts and shard files per split, bad files, hash

``open_dataset`` checks all of it on the driver, before any cluster work, so a wrong path or a
foreign Parquet file fails with a message instead of a traceback from inside a Ray worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.imagenet import ClassInfo
from pipeline.errors import InputError

SPLITS = ("train", "val")
SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary()),  # JPEG after the paper's preprocessing (square, `size` pixels)
        pa.field("label", pa.int32()),  # index into classes.json
        pa.field("wnid", pa.string()),
        pa.field("key", pa.string()),  # the source file's name
    ]
)
CLASSES_FILE, MANIFEST_FILE = "classes.json", "manifest.json"


class DataError(InputError):
    """A prepared dataset that cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class PreparedDataset:
    root: Path
    classes: list[ClassInfo]
    manifest: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.manifest["size"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dataset_hash(self) -> str:
        return self.manifest["hash"]

    def split_dir(self, split: str) -> str:
        return str(self.root / split)

    def count(self, split: str) -> int:
        return int(self.manifest["splits"][split]["images"])


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def write_classes(root: Path, classes: list[ClassInfo]) -> None:
    rows = [dataclasses.asdict(c) for c in classes]
    (root / CLASSES_FILE).write_text(json.dumps(rows, indent=1) + "\n")


def read_classes(path: Path) -> list[ClassInfo]:
    rows = json.loads(path.read_text())
    classes = [ClassInfo(int(r["index"]), r["wnid"], r["name"]) for r in rows]
    if [c.index for c in classes] != list(range(len(classes))):
        raise DataError(f"{path}: indices must be 0..{len(classes) - 1} in order")
    return classes


def manifest_hash(manifest: dict[str, Any], classes: list[ClassInfo]) -> str:
    """Identity of a prepared dataset: its classes, image size and per-shard row counts."""
    content = {
        "classes": [c.wnid for c in classes],
        "size": manifest["size"],
        "splits": {s: manifest["splits"][s]["shards"] for s in SPLITS},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def open_dataset(root: str | Path) -> PreparedDataset:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; create it with jobs/prepare.py --out {root}")
    for name in (CLASSES_FILE, MANIFEST_FILE):
        if not (root / name).is_file():
            raise DataError(f"{root} has no {name}: it is not a prepared dataset; run jobs/prepare.py --out {root}")
    try:
        classes = read_classes(root / CLASSES_FILE)
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        counts = {split: int(manifest["splits"][split]["images"]) for split in SPLITS}
        if not {"size", "hash"} <= manifest.keys():
            raise KeyError("size and hash")
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{root}: {CLASSES_FILE} or {MANIFEST_FILE} is not what jobs/prepare.py writes ({exc!r}); prepare it again"
        ) from exc
    if not classes:
        raise DataError(
            f"{root / CLASSES_FILE} lists no classes; re-run jobs/prepare.py on a source with class folders"
        )
    for split in SPLITS:
        _check_split(root, split, counts[split])
    return PreparedDataset(root, classes, manifest)


def _check_split(root: Path, split: str, images: int) -> None:
    files = sorted((root / split).glob("*.parquet"))
    if not files:
        raise DataError(f"{root / split} holds no .parquet shards; run jobs/prepare.py --out {root}")
    if images == 0:
        raise DataError(f"{root}: the {split} split has no images (see bad_files in {MANIFEST_FILE})")
    schema = pq.read_schema(files[0])
    missing = [f"{f.name} ({f.type})" for f in SCHEMA if f.name not in schema.names]
    if missing:
        raise DataError(
            f"shard {files[0]} lacks columns {missing} (has {schema.names}); shards must come from jobs/prepare.py"
        )
