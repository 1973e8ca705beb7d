"""The image files a batch job scores: listed as a stream into Parquet, read and decoded in CPU tasks.

    write_listing(source, folder)  driver   → Listing: every image file under `source`, by the name
                                              its output row carries (a local path, s3://bucket/key),
                                              in Parquet files of LISTING_ROWS names under `folder`.
                                              The driver holds one such file's names at a time,
                                              whatever the bucket holds; Ray Data reads them back
    views_batch(batch, ...)        CPU task → each file read and decoded into its test views, or the
                                              reason it could not be

    read_unscored                  CPU-free task → a listing file's names, less those already scored
                                              (kept as sorted 16-byte keys: `path_keys`)

No torch or MLflow here: the tasks before the model import this module, and start in a blink.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipeline.data.transforms import IMAGE_EXTENSIONS, describe_undecodable, is_image_name, source_views
from pipeline.errors import InputError
from pipeline.storage import Location, UnreadableFile

LISTING_ROWS = 10_000  # names per listing file: what the driver holds while it lists
EXAMPLES = 20  # files without an image extension named in the record (all are counted)
COMPLETE_FILE = "_COMPLETE.json"  # written last into the listing's folder


class ListingError(InputError):
    """An input the job cannot list, or one with no images; the message says what to do."""


@dataclass
class Listing:
    images: int = 0
    ignored: int = 0  # files without an image extension
    ignored_examples: list[str] = field(default_factory=list)
    unlisted: list[tuple[str, str]] = field(default_factory=list)  # (uri, why): names not UTF-8, link loops
    files: list[str] = field(default_factory=list)  # the listing's Parquet files (paths in its filesystem)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Listing:
        record = json.loads(text)
        record["unlisted"] = [tuple(pair) for pair in record["unlisted"]]
        return cls(**record)


def write_listing(source: Location, folder: Location) -> Listing:
    """List `source` (a folder, prefix or one file) into Parquet files under `folder`, COMPLETE_FILE last."""
    info = source.info()
    if info.type == pafs.FileType.NotFound:
        where = "bucket or prefix" if not source.is_local else "directory"
        raise ListingError(f"input {source.uri} does not exist: check the {where}")
    walk = [(source.path, None)] if info.type == pafs.FileType.File else source.stream()
    folder.fs.create_dir(folder.path, recursive=True)
    listing, names = Listing(), []
    for path, why in walk:
        if why is not None:
            listing.unlisted.append((source.uri_of(path), why))
        elif is_image_name(path):
            names.append(source.uri_of(path))
            if len(names) == LISTING_ROWS:
                _write_names(folder, listing, names)
                names = []
        else:
            listing.ignored += 1
            if len(listing.ignored_examples) < EXAMPLES:
                listing.ignored_examples.append(source.uri_of(path))
    if names:
        _write_names(folder, listing, names)
    if not listing.images:
        raise ListingError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {source.uri}"
            + (
                f"; {listing.ignored} other files, e.g. {listing.ignored_examples[0]}"
                if listing.ignored
                else ": it is empty"
            )
        )
    folder.join(COMPLETE_FILE).write_text(listing.to_json())
    return listing


def read_listing(folder: Location) -> Listing | None:
    """A listing an earlier run finished under `folder`, or None."""
    done = folder.join(COMPLETE_FILE)
    return Listing.from_json(done.read_text()) if done.is_file() else None


def _write_names(folder: Location, listing: Listing, names: list[str]) -> None:
    path = f"{folder.path}/part-{len(listing.files):05d}.parquet"
    pq.write_table(pa.table({"path": pa.array(names, pa.string())}), path, filesystem=folder.fs)
    listing.files.append(path)
    listing.images += len(names)


def views_batch(
    batch: dict[str, np.ndarray], fs: pafs.FileSystem, size: int, crop: int, ten: bool, max_bytes: int
) -> dict:
    """Read and decode files into test views; a file that cannot be read or decoded gets its error instead."""
    count = 10 if ten else 1
    images, errors = [], []
    for uri in batch["path"]:
        path = uri.removeprefix("s3://")
        try:  # a store that does not answer fails the task (Ray retries it); one file's trouble is its row's
            data = Location(fs, path, uri).read_input(max_bytes)
        except (UnreadableFile, ValueError) as exc:  # ValueError: a key pyarrow cannot open (`a//b.jpg`)
            images.append(np.zeros((count, crop, crop, 3), np.uint8))
            errors.append(str(exc) if isinstance(exc, UnreadableFile) else f"cannot be opened: {exc}")
            continue
        try:
            images.append(source_views(data, size, crop, ten))
            errors.append("")  # not None: a block of only None would travel as a null column
        except Exception as exc:  # noqa: BLE001 -- any decoding failure is this file's, reported in its row
            images.append(np.zeros((count, crop, crop, 3), np.uint8))
            errors.append(describe_undecodable(exc, data))
    return {"path": batch["path"], "image": np.stack(images), "error": np.array(errors, dtype=object)}


def reason(error: str) -> str:
    """What kind of failure a row's error is: its words before the first ':' or '(' ("cannot decode",
    "empty file", "too large", ...), so a summary counts failures by kind, not by file."""
    if "MiB limit for one file" in error:
        return "too large"
    for mark in (":", "("):
        error = error.split(mark, 1)[0]
    return error.strip() or "error"


def reasons(errors: list[str]) -> dict[str, int]:
    """Errors counted by kind, the commonest first (then by name)."""
    counts = Counter(reason(e) for e in errors)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ---- in the CPU-free read tasks: the names, less those already scored ----
def read_unscored(path: str, fs: pafs.FileSystem, done: ray.ObjectRef) -> list[pa.Table]:
    """One listing file's names, less those already scored, as Ray Data's read task returns them."""
    return [unscored(pq.read_table(path, filesystem=fs), done)]


_DONE_CACHE: dict[str, np.ndarray] = {}


def unscored(batch: pa.Table, done: ray.ObjectRef | np.ndarray) -> pa.Table:
    """The batch's files not yet scored (the sorted keys fetched once per worker process)."""
    if isinstance(done, ray.ObjectRef):
        key = done.hex()
        if key not in _DONE_CACHE:
            _DONE_CACHE.clear()
            _DONE_CACHE[key] = ray.get(done)
        done = _DONE_CACHE[key]
    return batch.filter(pa.array(~member(path_keys(batch["path"]), done)))


KEY = "S16"  # a path's key: its 128-bit BLAKE2b digest, 16 bytes whatever the path's length


def path_keys(paths: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Fixed-size keys of paths, so millions of them sort and search in a compact NumPy array (a
    collision between two paths of one bucket: about 1 in 10^24 for ten million files)."""
    return np.array([hashlib.blake2b(p.encode(), digest_size=16).digest() for p in paths.to_pylist()], dtype=KEY)


def member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Which of `keys` are in `sorted_keys` (a binary search each)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), bool)
    at = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[at] == keys
