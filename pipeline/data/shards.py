"""Prepared datasets: Parquet shards plus the JSON files that describe them.

    OUT/train/train-00000.parquet ...   columns: image (JPEG bytes), label (int32), wnid, key
    OUT/val/val-00000.parquet ...
    OUT/classes.json                    [{"index", "wnid", "name"}, ...] in sorted-wnid order
    OUT/manifest.json                   image size, counts and shard files per split, bad files, hash
    OUT/stats.json                      RGB mean, std, covariance and its eigen-decomposition (optional)

OUT is a local folder or an s3:// prefix. ``open_dataset`` checks all of it on the driver, before
any cluster work, so a wrong path, an unfinished prepare, a foreign or damaged Parquet file (wrong
columns or types, another row count than the manifest's, labels outside classes.json) or a stray
one fails with a message instead of a traceback from inside a Ray worker. Every shard's footer is
read; no image is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.imagenet import ClassInfo
from pipeline.errors import DataError
from pipeline.storage import Location, locate

if TYPE_CHECKING:
    import ray.data

SPLITS = ("train", "val")
SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary()),  # JPEG after the paper's preprocessing (square, `size` pixels)
        pa.field("label", pa.int32()),  # index into classes.json
        pa.field("wnid", pa.string()),
        pa.field("key", pa.string()),  # the source file's name
    ]
)
CLASSES_FILE, MANIFEST_FILE, STATS_FILE = "classes.json", "manifest.json", "stats.json"
DEFAULT_SHARD_SIZE = 1024  # images per shard: ~25-30 MB at 256 px, a good Ray Data block


@dataclass(frozen=True)
class PreparedDataset:
    root: Location
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

    @property
    def uri(self) -> str:
        return self.root.uri

    def split_dir(self, split: str) -> Location:
        return self.root.join(split)

    def count(self, split: str) -> int:
        return int(self.manifest["splits"][split]["images"])


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def write_classes(root: Location, classes: list[ClassInfo]) -> None:
    rows = [dataclasses.asdict(c) for c in classes]
    root.join(CLASSES_FILE).write_text(json.dumps(rows, indent=1) + "\n")


def read_classes(path: Location) -> list[ClassInfo]:
    rows = json.loads(path.read_text())
    classes = [ClassInfo(int(r["index"]), r["wnid"], r["name"]) for r in rows]
    if [c.index for c in classes] != list(range(len(classes))):
        raise DataError(f"{path.uri}: indices must be 0..{len(classes) - 1} in order")
    return classes


def read_manifest(root: Location) -> dict[str, Any] | None:
    path = root.join(MANIFEST_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(root: Location, manifest: dict[str, Any]) -> None:
    root.join(MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def inside(root: Location, rel: str, origin: str, under: str = "") -> Location:
    """`root`/`rel` for a path a dataset's JSON file names, which must stay inside the dataset (under
    `under`/ when given): no absolute path, no '..', nothing a crafted manifest or stats.json could
    use to make a job read (or, with --overwrite, touch) files elsewhere."""
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or any(part in ("", ".", "..") for part in parts)
        or (under and (len(parts) != 2 or parts[0] != under))
    ):
        where = f"{root.uri}/{under}/" if under else f"{root.uri}/"
        raise DataError(
            f"{root.uri}/{origin} names {rel!r}, which is not a file inside {where}; prepare the dataset again"
        )
    return root.join(rel)


def manifest_hash(manifest: dict[str, Any], classes: list[ClassInfo]) -> str:
    """Identity of a prepared dataset: its classes, image size and per-shard row counts."""
    content = {
        "classes": [c.wnid for c in classes],
        "size": manifest["size"],
        "splits": {s: [(sh["file"], sh["rows"]) for sh in manifest["splits"][s]["shards"]] for s in SPLITS},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def open_dataset(uri: str | Location) -> PreparedDataset:
    root = uri if isinstance(uri, Location) else locate(uri)
    if not root.is_dir():
        raise DataError(f"data directory {root.uri} does not exist; create it with jobs/prepare.py --output {root.uri}")
    for name in (CLASSES_FILE, MANIFEST_FILE):
        if not root.join(name).is_file():
            raise DataError(
                f"{root.uri} has no {name}: it is not a prepared dataset; run jobs/prepare.py --output {root.uri}"
            )
    try:
        classes = read_classes(root.join(CLASSES_FILE))
        manifest = read_manifest(root) or {}
        counts = {split: int(manifest["splits"][split]["images"]) for split in SPLITS}
        status = manifest["status"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{root.uri}: {CLASSES_FILE} or {MANIFEST_FILE} is not what this version of jobs/prepare.py writes "
            f"({exc!r}); prepare it again with --overwrite"
        ) from exc
    if status != "complete":
        raise DataError(
            f"{root.uri} is not finished (manifest status {status!r}): run the jobs/prepare.py command that "
            "started it again; it continues where it stopped"
        )
    if not classes:
        raise DataError(f"{root.uri}/{CLASSES_FILE} lists no classes; re-run jobs/prepare.py on a source with classes")
    for split in SPLITS:
        for shard in manifest["splits"][split].get("shards", []):
            inside(root, str(shard.get("file")), MANIFEST_FILE, under=split)
    for split in SPLITS:
        _check_split(root, split, counts[split], manifest["splits"][split].get("shards", []), len(classes))
    return PreparedDataset(root, classes, manifest)


def _check_split(root: Location, split: str, images: int, listed: list[dict[str, Any]], num_classes: int) -> None:
    """Every shard of the split, from its Parquet footer (no image read): the columns and their types,
    the rows the manifest recorded, labels within classes.json, and no file the manifest does not list."""
    files = sorted(
        (e for e in root.join(split).listdir() if e.base_name.endswith(".parquet")), key=lambda e: e.base_name
    )
    if not files:
        raise DataError(f"{root.uri}/{split} holds no .parquet shards; run jobs/prepare.py --output {root.uri}")
    if images == 0:
        raise DataError(f"{root.uri}: the {split} split has no images (see bad_files in {MANIFEST_FILE})")
    rows = {posixpath.basename(str(shard["file"])): int(shard["rows"]) for shard in listed}
    strays = [root.uri_of(e.path) for e in files if e.base_name not in rows]
    if strays:
        shown = ", ".join(strays[:3]) + (f" and {len(strays) - 3} more" if len(strays) > 3 else "")
        raise DataError(
            f"{shown} {'is' if len(strays) == 1 else 'are'} not in {root.uri}/{MANIFEST_FILE}: training reads every "
            f".parquet file of {root.uri}/{split}; move {'it' if len(strays) == 1 else 'them'} out, or prepare again"
        )
    missing = sorted(set(rows) - {e.base_name for e in files})
    if missing:
        raise DataError(
            f"{root.uri}/{split} lacks {missing[:3]} that {MANIFEST_FILE} lists; run jobs/prepare.py --output "
            f"{root.uri} again (it rewrites what is missing)"
        )
    with ThreadPoolExecutor(max_workers=16) as pool:  # one footer read each: S3 answers them in parallel
        problems = [p for p in pool.map(partial(_check_shard, root, rows, num_classes), files) if p]
    if problems:
        more = f" (and {len(problems) - 1} more shard(s))" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; shards must come from jobs/prepare.py: prepare again with --overwrite")


def _check_shard(root: Location, rows: dict[str, int], num_classes: int, entry) -> str | None:
    """What is wrong with one shard file, or None."""
    shown = root.uri_of(entry.path)
    try:
        meta = pq.read_metadata(entry.path, filesystem=root.fs)
    except (OSError, pa.ArrowException) as exc:
        return f"shard {shown} is not a readable Parquet file ({exc})"
    schema = meta.schema.to_arrow_schema()
    lacking = [f"{f.name} ({f.type})" for f in SCHEMA if f.name not in schema.names]
    if lacking:
        return f"shard {shown} lacks columns {lacking} (has {schema.names})"
    wrong = [
        f"{f.name} is {schema.field(f.name).type}, not {f.type}" for f in SCHEMA if schema.field(f.name).type != f.type
    ]
    if wrong:
        return f"shard {shown}: {'; '.join(wrong)}"
    if meta.num_rows != rows[entry.base_name]:
        return f"shard {shown} has {meta.num_rows} rows, {MANIFEST_FILE} recorded {rows[entry.base_name]}"
    low, high = _label_range(root, entry.path, meta, schema.get_field_index("label"))
    if low is not None and (low < 0 or high >= num_classes):
        return (
            f"shard {shown} has labels {low}..{high}, outside 0..{num_classes - 1} ({CLASSES_FILE} lists {num_classes})"
        )
    return None


def _label_range(root: Location, path: str, meta: pq.FileMetaData, column: int) -> tuple[int | None, int | None]:
    """The smallest and largest label: from the footer's statistics, else from the label column alone."""
    lows, highs = [], []
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            labels = pq.read_table(path, columns=["label"], filesystem=root.fs)["label"]
            if len(labels) == 0:
                return None, None
            bounds = pc.min_max(labels)
            return bounds["min"].as_py(), bounds["max"].as_py()
        lows.append(stats.min)
        highs.append(stats.max)
    return (min(lows), max(highs)) if lows else (None, None)


def read_shards(
    shard_dir: str | Location,
    columns: tuple[str, ...] = ("image", "label"),
    shuffle: ray.data.FileShuffleConfig | None = None,
) -> ray.data.Dataset:
    """The shards of one split (a local folder or s3:// prefix), streamed one file per read task.

    One block per file is also what lets Ray Data fuse the read with the decode that follows:
    with fewer files than its default minimum of 200 read blocks it would split each file's
    output, and split reads are never fused, so every raw shard would wait in the object store
    for a separate decode task (and spill, with a small store).
    """
    import ray.data  # here: open_dataset checks a dataset without loading Ray

    _use_file_reader()
    shard_dir = shard_dir if isinstance(shard_dir, Location) else locate(shard_dir)
    files = [e for e in shard_dir.listdir() if e.base_name.endswith(".parquet")]
    ds = ray.data.read_parquet(
        shard_dir.path,
        filesystem=shard_dir.fs,
        columns=list(columns),
        file_extensions=["parquet"],
        shuffle=shuffle,
        override_num_blocks=max(1, len(files)),
    )
    # The whole pipeline is one fused operator (read → decode → crop): Ray Data's per-operator
    # reservation would hold back half of the CPUs for operators it does not have (on 2 cores,
    # one decode task at a time instead of two). Object-store backpressure still applies.
    ds.context.op_resource_reservation_enabled = False
    return ds


def _use_file_reader() -> None:
    """Read Parquet with one task per shard file (Ray Data's V1 reader).

    Ray 2.60's default V2 reader lists files and provisions footer-reader actors again at every
    execution (3-4 s per epoch on a 2-core machine) and bin-packs small shards into one read
    task, so an epoch arrives as a single block after that delay instead of streaming.
    """
    from ray.data import DataContext

    DataContext.get_current().use_datasource_v2 = False
