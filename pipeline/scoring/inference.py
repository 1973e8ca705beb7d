"""Batch inference: a registered model over a bucket (or folder) of images, one Parquet row per file.

    list the input (driver) → read + decode + test views (CPU tasks) → model actors (each loads the
    model once; fixed or autoscaling pool) → Parquet in a staging location → moved into place

The output is whole or untouched: locally the previous output is renamed aside until the new one
is in place (and renamed back if that fails); on S3, where nothing renames, the output carries
REPLACING_FILE while its objects are replaced, and the staging copy is kept until the copy is
complete. Either way a failed replacement names where the whole new predictions are.

On CPUs Ray Data fuses the decode step into the model actors (same resources): each replica reads,
decodes and scores its own files, with no copies between processes, and the pool's size sets the
parallelism. With `gpus_per_replica` the actors hold GPUs and decoding stays in CPU tasks that
feed them.

Preprocessing is validation's: the image resized so its short side is the model's image size and
centre-cropped square (as jobs/prepare.py stores it), then the centre `crop` (or the paper's ten
crops, softmax averaged). A file that cannot be decoded gets a row with its `error`, never a crash.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy

from pipeline import outputs
from pipeline.data.transforms import (
    IMAGE_EXTENSIONS,
    center_crop,
    describe_undecodable,
    is_image_name,
    load_square,
    ten_crop,
)
from pipeline.errors import InputError
from pipeline.outputs import REPLACING_FILE, SUCCESS_FILE, OutputNotReplaced  # noqa: F401 (this job's names)
from pipeline.scoring.loading import ModelRef, Predictor, ship
from pipeline.scoring.pool import ONE_ACTOR, Pool
from pipeline.storage import DEFAULT_MAX_FILE_BYTES, Location, UnreadableFile, check_apart

DECODE_BATCH = 32  # files per decode task
NONFINITE = "the model gave probabilities that are not finite (NaN or inf): the model is broken, not the image"
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("top1_wnid", pa.string()),
        ("top1_name", pa.string()),
        ("top1_prob", pa.float32()),
        ("top5_wnids", pa.list_(pa.string())),
        ("top5_names", pa.list_(pa.string())),
        ("top5_probs", pa.list_(pa.float32())),
        ("model_uri", pa.string()),
        ("model_version", pa.string()),
        ("error", pa.string()),
    ]
)


class InferenceError(InputError):
    """An input, output or model the job cannot use; the message says what to do."""


@dataclass
class Listing:
    images: list[str]  # paths inside the filesystem, sorted
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    unlisted: list[tuple[str, str]] = field(default_factory=list)  # (path, why): names not UTF-8, link loops


@dataclass
class InferenceSummary:
    images: int
    errors: int
    ignored: int
    seconds: float
    output: str

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def list_images(source: Location) -> Listing:
    """Every image file under `source` (recursively; extensions in any case), or a clear error."""
    info = source.info()
    if info.type == pafs.FileType.NotFound:
        where = "bucket or prefix" if not source.is_local else "directory"
        raise InferenceError(f"input {source.uri} does not exist: check the {where}")
    unlisted: list[tuple[str, str]] = []
    if info.type == pafs.FileType.File:
        files = [source.path]
    else:
        files, unlisted = source.walk()
    images = [f for f in files if is_image_name(f)]
    ignored = [f for f in files if not is_image_name(f)]
    if not images:
        raise InferenceError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {source.uri}"
            + (f"; {len(ignored)} other files, e.g. {source.uri_of(ignored[0])}" if ignored else ": it is empty")
        )
    return Listing(images, ignored, unlisted)


def prepare_output(output: Location, overwrite: bool, source: Location) -> None:
    """Check where the predictions go, before any cluster work: a place apart from the input (and
    from /, home, the working directory; a prefix, not a bucket root) in a bucket that exists; an
    existing output is refused, or with --overwrite replaced only if this job wrote it."""
    check_apart(output, "--output", {"--input": source})
    output.check_writable()
    if outputs.exists(output):
        if not overwrite:
            raise InferenceError(f"output {output.uri} already exists; pass --overwrite to replace it whole")
        outputs.check_ours(output)


def views_batch(
    batch: dict[str, np.ndarray], fs: pafs.FileSystem, size: int, crop: int, ten: bool, max_bytes: int
) -> dict:
    """Read and decode files into test views; a file that cannot be read or decoded gets its error instead."""
    views_of = (lambda a: ten_crop(a, crop)) if ten else (lambda a: center_crop(a, crop)[None])
    count = 10 if ten else 1
    images, errors = [], []
    for path in batch["path"]:
        try:  # a store that does not answer fails the task (Ray retries it); one file's trouble is its row's
            data = Location(fs, path, path).read_input(max_bytes)
        except UnreadableFile as exc:
            images.append(np.zeros((count, crop, crop, 3), np.uint8))
            errors.append(str(exc))
            continue
        try:
            images.append(views_of(np.asarray(load_square(data, size))))
            errors.append("")  # not None: a block of only None would travel as a null column
        except Exception as exc:  # noqa: BLE001 -- any decoding failure is this file's, reported in its row
            images.append(np.zeros((count, crop, crop, 3), np.uint8))
            errors.append(describe_undecodable(exc, data))
    return {"path": batch["path"], "image": np.stack(images), "error": np.array(errors, dtype=object)}


def top_five(probs: torch.Tensor, batch: dict[str, np.ndarray], ref: ModelRef, uri_prefix: str) -> pa.Table:
    """One row per file: the top five classes of the views' averaged probabilities, or the file's error."""
    n = len(batch["path"])
    top_p, top_i = probs.mean(dim=1).topk(min(5, probs.shape[2]), dim=1)
    top_p, top_i = top_p.cpu().numpy(), top_i.cpu().numpy()
    wnids, names = np.array(ref.wnids, dtype=object), np.array(ref.names, dtype=object)
    finite = torch.isfinite(probs).flatten(1).all(dim=1).cpu().numpy()  # NaN weights still rank classes
    errors = [_row_error(e, good) for e, good in zip(batch["error"], finite, strict=True)]
    ok = [e is None for e in errors]
    return pa.table(
        {
            "path": [uri_prefix + p for p in batch["path"]],
            "top1_wnid": [wnids[i[0]] if good else None for i, good in zip(top_i, ok, strict=True)],
            "top1_name": [names[i[0]] if good else None for i, good in zip(top_i, ok, strict=True)],
            "top1_prob": [float(p[0]) if good else None for p, good in zip(top_p, ok, strict=True)],
            "top5_wnids": [list(wnids[i]) if good else None for i, good in zip(top_i, ok, strict=True)],
            "top5_names": [list(names[i]) if good else None for i, good in zip(top_i, ok, strict=True)],
            "top5_probs": [p.tolist() if good else None for p, good in zip(top_p, ok, strict=True)],
            "model_uri": [ref.uri] * n,
            "model_version": [ref.version] * n,
            "error": errors,
        },
        schema=SCHEMA,
    )


def _row_error(decoding: str | None, finite: bool) -> str | None:
    """A row's error: the file's (it did not decode), else the model's (its probabilities are not finite)."""
    if isinstance(decoding, str) and decoding:
        return decoding
    return None if finite else NONFINITE


@dataclass(frozen=True)
class InferenceOptions:
    ten_crop_views: bool = False  # average the softmax over the paper's ten 224 views
    pool: Pool = ONE_ACTOR  # the model actors
    batch_size: int = 64  # images per model call
    overwrite: bool = False  # replace an output this job wrote
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # a larger file is an error row, not read


def infer(
    ref: ModelRef, source: Location, listing: Listing, output: Location, options: InferenceOptions = InferenceOptions()
) -> InferenceSummary:
    """Score every listed image and put the Parquet table at `output` (whole, or not at all)."""
    started = time.time()
    ref = ship(ref)  # the program's bytes once into the object store, not into every actor's arguments
    staging = output.at(f"{output.path.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}")
    prefix = "" if source.is_local else "s3://"
    dataset = (
        ray.data.from_items([{"path": p} for p in listing.images], override_num_blocks=_blocks(len(listing.images)))
        .map_batches(
            views_batch,
            fn_kwargs={
                "fs": source.fs,
                "size": ref.image_size,
                "crop": ref.crop,
                "ten": options.ten_crop_views,
                "max_bytes": options.max_file_bytes,
            },  # fmt: skip
            batch_size=DECODE_BATCH,
            batch_format="numpy",
        )
        .map_batches(
            Predictor,
            fn_constructor_kwargs={"ref": ref, "keep": partial(top_five, ref=ref, uri_prefix=prefix)},
            compute=ActorPoolStrategy(min_size=options.pool.smallest, max_size=options.pool.largest),
            batch_size=options.batch_size,
            num_gpus=options.pool.gpus,
            batch_format="numpy",
        )
    )
    try:
        dataset.write_parquet(staging.path, filesystem=staging.fs, min_rows_per_file=100_000)
        rows, errors = _count(staging)
        if rows != len(listing.images):
            raise InferenceError(f"wrote {rows} rows for {len(listing.images)} images; the output was not moved")
        summary = InferenceSummary(len(listing.images), errors, len(listing.ignored), 0.0, output.uri)
        summary.seconds = time.time() - started
        staging.join(SUCCESS_FILE).write_text(_success_record(ref, source, listing, summary, options.ten_crop_views))
    except BaseException:
        outputs.delete(staging)
        raise
    outputs.move_into_place(
        staging, output, options.overwrite
    )  # on a failure staging is kept whole, and the error names it
    outputs.delete(staging)
    return summary


def _success_record(
    ref: ModelRef, source: Location, listing: Listing, summary: InferenceSummary, ten_crop_views: bool
) -> str:
    record = {
        "model_uri": ref.uri,
        "model_version": ref.version,
        "input": source.uri,
        "images": summary.images,
        "errors": summary.errors,
        "ignored_files": [source.uri_of(p) for p in listing.ignored],
        "unlisted": [{"path": source.uri_of(p), "reason": why} for p, why in listing.unlisted],
        "ten_crop": ten_crop_views,
        "seconds": round(summary.seconds, 1),
    }
    return json.dumps(record, indent=1) + "\n"


def read_predictions(output: Location) -> pa.Table:
    files = sorted(e.path for e in outputs.files(output) if e.path.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f, filesystem=output.fs) for f in files])


# ---- helpers ------------------------------------------------------------------------------------
def _blocks(n: int) -> int:
    return max(1, min(n // DECODE_BATCH, 200))


def _count(location: Location) -> tuple[int, int]:
    """Rows and error rows in the Parquet files under `location`."""
    rows = errors = 0
    for entry in outputs.files(location):
        if entry.path.endswith(".parquet"):
            column = pq.read_table(entry.path, columns=["error"], filesystem=location.fs)["error"]
            rows += len(column)
            errors += len(column) - column.null_count
    return rows, errors
