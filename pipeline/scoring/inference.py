"""Batch inference: a registered model over a bucket (or folder) of images, one Parquet row per file.

    list the input (driver, streamed into Parquet under OUTPUT/_listing) → read + decode + test
    views (CPU tasks) → model actors (each loads the model once; fixed or autoscaling pool) →
    Parquet files written into OUTPUT as they fill, each one recorded in Ray Data's checkpoint

Resumable. OUTPUT/_JOB.json says what the job is: the model version and its program's digest, the
preprocessing, the input, the previous outputs it skips. Ray Data's checkpoint
(ray.data.checkpoint.CheckpointConfig, at _NAME.checkpoint beside the output) holds the paths of
the rows in every Parquet file that is complete: it writes them "pending" before the data file and
commits them after it. The same job run again skips those rows and scores the rest; a data file
whose rows were never committed (a stop between the two) is deleted by Ray Data before it starts.
Another job over the same output (another version, other preprocessing) is refused, or with
`restart` the earlier job's files are deleted first: an output never mixes versions.

Done: the rows are counted against the listing (one per listed file, none twice), _SUCCESS.json
is written last, and the job's own state (_JOB.json, _listing/, the checkpoint) is deleted.
Readers wait for _SUCCESS.json; pyarrow and pandas skip the `_` files of an output in progress.

Incremental. `skip_scored` names earlier outputs (or prefixes holding them): a file with a row
there, without an error, is not scored again. Rows carry the model URI and version that scored them.

On CPUs Ray Data fuses the decode step into the model actors (same resources): each replica reads,
decodes and scores its own files, with no copies between processes, and the pool's size sets the
parallelism. With `gpus_per_replica` the actors hold GPUs and decoding stays in CPU tasks that
feed them.

Preprocessing is validation's: the image resized so its short side is the model's image size and
centre-cropped square (as jobs/prepare.py stores it), then the centre `crop` (or the paper's ten
crops, softmax averaged). A file that cannot be read or decoded gets a row with its `error`.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext
from ray.data.block import BlockMetadata
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import IdColumnCheckpointManager
from ray.data.datasource import Datasource, ReadTask

from pipeline import outputs
from pipeline.errors import InputError
from pipeline.outputs import SUCCESS_FILE
from pipeline.scoring import files
from pipeline.scoring.files import Listing, views_batch
from pipeline.scoring.pool import ONE_ACTOR, Pool
from pipeline.scoring.predictor import ModelRef, Predictor, ship, top_k
from pipeline.storage import DEFAULT_MAX_FILE_BYTES, Location, check_apart, locate

JOB_FILE = "_JOB.json"  # what the job in progress is; a rerun compares itself with it
LISTING = "_listing"  # the input's names, as Parquet files
CHECKPOINT_SUFFIX = ".checkpoint"  # Ray Data's checkpoint: _NAME.checkpoint beside the output (Ray's files only)
DECODE_BATCH = 32  # files per decode task
LIGHT_TASKS = 2  # the CPU-free tasks (read the listing, filter it, write Parquet) running at a time
PENDING = ".pending.parquet"  # a checkpoint file Ray Data has not committed
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


@dataclass(frozen=True)
class InferenceOptions:
    ten_crop_views: bool = False  # average the softmax over the paper's ten 224 views
    pool: Pool = ONE_ACTOR  # the model actors
    batch_size: int = 64  # images per model call
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # a larger file is an error row, not read
    overwrite: bool = False  # replace a finished output this job's kind wrote
    restart: bool = False  # delete an unfinished output's rows and start over
    skip_scored: tuple[str, ...] = ()  # earlier outputs: files with a row there are not scored again
    rows_per_file: int = 10_000  # rows per Parquet file: what a stop can lose per writer
    progress_interval: float = 0.0  # seconds between progress lines; 0: none


@dataclass
class Plan:
    """Where the job stands before any cluster work: new, or resuming an earlier run of itself."""

    output: Location
    checkpoint: Location
    record: dict[str, Any]  # the job, as OUTPUT/_JOB.json holds it
    resumed: int = 0  # rows an earlier run of this job finished
    listing: Listing | None = None
    previous: list[str] = field(default_factory=list)  # Parquet files of the outputs skip_scored names
    previous_fs: pafs.FileSystem | None = None


@dataclass
class InferenceSummary:
    images: int  # image files listed
    scored: int  # rows this run wrote
    resumed: int  # rows an earlier run of the same job wrote
    skipped: int  # files with a row in a previous output
    errors: int  # rows with an error, all runs
    reasons: dict[str, int]  # errors by kind
    ignored: int  # files without an image extension
    seconds: float
    output: str

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        done = f"{self.scored:,} images scored in {self.seconds:.1f}s ({self.images_per_s:,.0f} images/s)"
        if self.resumed:
            done += f", {self.resumed:,} scored before the job was resumed"
        if self.skipped:
            done += f", {self.skipped:,} skipped (scored in a previous output)"
        failed = ", ".join(f"{n:,} {why}" for why, n in self.reasons.items())
        return done + f"; {self.errors:,} failed" + (f" ({failed})" if failed else "")


# ---- before the cluster: what the output holds, what the job is -----------------------------------
def job_record(ref: ModelRef, source: Location, options: InferenceOptions) -> dict[str, Any]:
    """What a rerun must share with the run that began an output to add rows to it."""
    return {
        "model_uri": ref.uri,
        "model_version": ref.version,
        "model_digest": ref.digest or None,  # a checkpoint directory: matched by its path
        "model": ref.version_uri,
        "input": source.uri,
        "image_size": ref.image_size,
        "crop": ref.crop,
        "ten_crop": options.ten_crop_views,
        "max_file_bytes": options.max_file_bytes,
        "skip_scored": sorted(options.skip_scored),
        "skipped_outputs": [],  # the finished outputs those named when the job began
    }


MATCHED = {  # record key → how a difference is told
    "model": "model",
    "model_digest": "model files (same version, other bytes)",
    "input": "--input",
    "image_size": "image size",
    "crop": "crop",
    "ten_crop": "--ten-crop",
    "max_file_bytes": "--max-file-mb",
    "skip_scored": "--skip-scored",
}


def prepare_output(
    ref: ModelRef, source: Location, output: Location, options: InferenceOptions, log: Callable[[str], None] = print
) -> Plan:
    """Check where the predictions go, before any cluster work, and whether this run resumes one.

    The output is a place apart from the input, in a bucket that exists. An unfinished output of
    the same job is resumed; of another job, refused (or with `restart`, deleted). A finished one
    is refused (or with `overwrite`, deleted). A folder holding other files is never touched.
    """
    check_apart(output, "--output", {"--input": source})
    output.check_writable()
    checkpoint = checkpoint_of(output)
    plan = Plan(output, checkpoint, job_record(ref, source, options))
    earlier = _read_record(output)
    finished = output.join(SUCCESS_FILE).is_file()
    if finished and earlier is not None:  # a finished job stopped while it tidied up: finish that
        _tidy(output, checkpoint)
        earlier = None
    if earlier is not None:
        if options.restart or options.overwrite:
            flag = "--restart" if options.restart else "--overwrite"
            log(f"{flag}: deleting the unfinished predictions at {output.uri} and {checkpoint.uri}")
            _discard(output, checkpoint)
        else:
            plan.resumed = committed_rows(checkpoint)
            _check_same_job(earlier, plan.record, output, plan.resumed)
            if not plan.resumed and _data_files(output):
                raise InferenceError(
                    f"output {output.uri} holds Parquet files but {checkpoint.uri} records none of them (a "
                    "deletion that stopped half way?): pass --restart to delete them and start over"
                )
            # Rows name the model as the first run did; the previous outputs are those it found.
            plan.record = {
                **plan.record,
                "model_uri": earlier["model_uri"],
                "skipped_outputs": earlier.get("skipped_outputs", []),
            }
            plan.listing = files.read_listing(output.join(LISTING))
            plan.previous_fs, plan.previous = _previous_files(plan.record["skipped_outputs"])
            return plan
    elif finished:
        if not options.overwrite:
            raise InferenceError(
                f"output {output.uri} already exists (finished); pass --overwrite to replace it (its predictions "
                "are deleted first), or choose another --output"
            )
        log(f"--overwrite: deleting the predictions at {output.uri}")
        _discard(output, checkpoint)
    elif outputs.exists(output):
        raise InferenceError(
            f"output {output.uri} holds files jobs/infer.py did not write (no {SUCCESS_FILE} or {JOB_FILE}): "
            "choose another --output, or move them away yourself"
        )
    if checkpoint.info().type != pafs.FileType.NotFound:  # ours only beside an output holding JOB_FILE
        raise InferenceError(
            f"{checkpoint.uri} exists and this job did not write it: it is where the job keeps its checkpoint. "
            "Move it away, or choose another --output"
        )
    plan.record["skipped_outputs"] = _finished_outputs(options.skip_scored, output)
    plan.previous_fs, plan.previous = _previous_files(plan.record["skipped_outputs"])
    return plan


def checkpoint_of(output: Location) -> Location:
    """Where Ray Data's checkpoint of `output` is kept: `_NAME.checkpoint` beside it (a name Parquet
    readers of the folder above skip, as they skip every name that begins with `_`)."""
    parent, name = posixpath.split(output.path.rstrip("/"))
    return output.at(f"{parent}/_{name}{CHECKPOINT_SUFFIX}")


def _check_same_job(earlier: dict[str, Any], record: dict[str, Any], output: Location, rows: int) -> None:
    differences = [
        f"{what}: {_shown(key, earlier.get(key))} then, {_shown(key, record[key])} now"
        for key, what in MATCHED.items()
        if earlier.get(key) != record[key]
    ]
    if not differences:
        return
    hint = ""
    if earlier.get("model_version") and earlier["model"] != record["model"] and "@" in earlier["model_uri"]:
        hint = f" ({earlier['model_uri']} has moved since: --model {earlier['model']} finishes it)"
    raise InferenceError(
        f"output {output.uri} was begun by another job ({rows:,} rows so far) and an output never mixes them: "
        + "; ".join(differences)
        + f"{hint}. Rerun with the first job's flags to finish it, pass --restart to delete its rows and start "
        "over, or choose another --output"
    )


def _shown(key: str, value: Any) -> str:
    if key == "max_file_bytes" and isinstance(value, int):
        return f"{value / 2**20:g} MiB"
    if key == "model_digest" and isinstance(value, str):
        return value[:12]
    return json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)


def _read_record(output: Location) -> dict[str, Any] | None:
    where = output.join(JOB_FILE)
    return json.loads(where.read_text()) if where.is_file() else None


def _discard(output: Location, checkpoint: Location) -> None:
    """Delete an output this job's kind wrote (it holds JOB_FILE or SUCCESS_FILE), and its checkpoint:
    the data first, then the checkpoint, the markers last, so that a deletion that stops half way
    leaves an output still marked as this job's (and a rerun that finds data without a checkpoint
    asks for --restart)."""
    if not output.join(JOB_FILE).is_file():
        outputs.check_ours(output)
    markers = {output.join(JOB_FILE).path, output.join(SUCCESS_FILE).path}
    for entry in outputs.files(output):
        if entry.path not in markers:
            output.fs.delete_file(entry.path)
    outputs.delete(checkpoint)  # only ever beside an output holding a marker
    outputs.delete(output)


def _tidy(output: Location, checkpoint: Location) -> None:
    """A finished output's job state deleted: the checkpoint, the listing, JOB_FILE last."""
    outputs.delete(checkpoint)
    outputs.delete(output.join(LISTING))
    outputs.delete(output.join(JOB_FILE))


def _committed_files(checkpoint: Location) -> list[str]:
    """The checkpoint's committed files; a store that does not answer fails the job (never a file fewer)."""
    entries = checkpoint.fs.get_file_info(pafs.FileSelector(checkpoint.path, allow_not_found=True))
    return [e.path for e in entries if e.type == pafs.FileType.File and _is_committed(e.path)]


def _is_committed(path: str) -> bool:
    return path.endswith(".parquet") and not path.endswith(PENDING)


def committed_rows(checkpoint: Location) -> int:
    """Rows in the checkpoint's committed files: what a rerun skips."""
    return sum(pq.read_metadata(f, filesystem=checkpoint.fs).num_rows for f in _committed_files(checkpoint))


def _committed(checkpoint: Location, known: dict[str, int]) -> int:
    """Rows committed so far, for progress lines: `known` caches rows by file; what cannot be read
    now (a store that hesitates, a file committed and not yet visible) is counted next time."""
    try:
        entries = checkpoint.fs.get_file_info(pafs.FileSelector(checkpoint.path, allow_not_found=True))
    except OSError:
        return sum(known.values())
    for entry in entries:
        if entry.type == pafs.FileType.File and _is_committed(entry.path) and entry.path not in known:
            try:
                known[entry.path] = pq.read_metadata(entry.path, filesystem=checkpoint.fs).num_rows
            except OSError:
                continue
    return sum(known.values())


def _finished_outputs(uris: tuple[str, ...], output: Location) -> list[str]:
    """Every finished output (a folder holding SUCCESS_FILE) under each of `uris`, not `output` itself."""
    found: list[str] = []
    kinds = {locate(uri).is_local for uri in uris}
    if len(kinds) > 1:
        raise InferenceError("--skip-scored: name previous outputs all on local disk or all in S3")
    own = output.path.rstrip("/")
    for uri in uris:
        place = locate(uri)
        if place.is_local == output.is_local and place.path.rstrip("/") == own:
            raise InferenceError(f"--skip-scored {uri} is --output itself: name earlier outputs")
        finished = sorted(e.path[: -len(SUCCESS_FILE) - 1] for e in outputs.files(place) if e.base_name == SUCCESS_FILE)
        finished = [f for f in finished if f != own]
        if not finished:
            raise InferenceError(
                f"--skip-scored {uri}: no finished predictions there (an output of jobs/infer.py holds "
                f"{SUCCESS_FILE}); name an earlier --output, or a prefix holding them"
            )
        found += [place.uri_of(f) for f in finished]
    return found


def _previous_files(outputs_: list[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """The Parquet files of finished outputs (as the run that began this output found them)."""
    fs, paths = None, []
    for uri in outputs_:
        place = locate(uri)
        if not place.join(SUCCESS_FILE).is_file():
            raise InferenceError(f"--skip-scored: {uri} is gone or no longer finished; pass --restart to start over")
        fs = place.fs
        paths += _data_files(place)
    return fs, paths


# ---- the listing ----------------------------------------------------------------------------------------
def list_input(source: Location, plan: Plan, log: Callable[[str], None] = print) -> Listing:
    """The input's images: an earlier run's listing of this job, or a new one, streamed into the output."""
    if plan.listing is not None:
        return plan.listing
    folder = plan.output.join(LISTING)
    if not plan.output.join(JOB_FILE).is_file():  # first: what is in the output from now on is this job's
        plan.output.join(JOB_FILE).write_text(json.dumps(plan.record, indent=1) + "\n")
    outputs.delete(folder)  # a listing an earlier run did not finish
    log(f"listing {source.uri} ...")
    try:
        plan.listing = files.write_listing(source, folder)
    except BaseException:
        if not plan.resumed:
            _discard(plan.output, plan.checkpoint)  # nothing scored yet: leave nothing behind
        raise
    return plan.listing


# ---- on the cluster ----------------------------------------------------------------------------------
def top_five(probs: torch.Tensor, batch: dict[str, np.ndarray], ref: ModelRef) -> pa.Table:
    """One row per file: the top five classes of the views' averaged probabilities, or the file's error."""
    n = len(batch["path"])
    top_p, top_i, finite = top_k(probs)
    wnids, names = np.array(ref.wnids, dtype=object), np.array(ref.names, dtype=object)
    errors = [_row_error(e, good) for e, good in zip(batch["error"], finite, strict=True)]
    ok = [e is None for e in errors]
    return pa.table(
        {
            "path": list(batch["path"]),
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


def infer(
    ref: ModelRef, source: Location, plan: Plan, options: InferenceOptions, log: Callable[[str], None] = print
) -> InferenceSummary:
    """Score every listed image not yet scored, into `plan.output`; finish it when every row is there."""
    started = time.time()
    listing = list_input(source, plan, log)
    previous = _scored_before(plan)  # sorted paths, in the object store: never all in the driver
    skipped = ray.get(_count_in.remote(listing.files, plan.output.fs, previous)) if previous is not None else 0
    done = _done.remote(previous, _committed_files(plan.checkpoint), plan.checkpoint.fs)
    to_score = listing.images - skipped - plan.resumed
    if plan.resumed:
        log(
            f"resuming: {plan.resumed:,} of {listing.images:,} files were scored by an earlier run of this job; "
            f"scoring the other {to_score:,}"
        )
    if skipped:
        log(f"skipping {skipped:,} files scored in previous outputs (--skip-scored)")
    ref = ship(dataclasses.replace(ref, uri=plan.record["model_uri"]))  # the program once into the object store
    progress = _Progress(plan.checkpoint, plan.resumed, to_score, options.progress_interval, log)
    context = DataContext.get_current()
    context.checkpoint_config = CheckpointConfig(
        id_column="path",
        checkpoint_path=plan.checkpoint.uri,
        delete_checkpoint_on_success=False,  # deleted once the rows are counted and SUCCESS_FILE is written
        override_filesystem=plan.checkpoint.fs,
        checkpoint_manager_cls=RecoveryOnly,
    )
    try:
        dataset = _dataset(ref, source, listing, plan, options, done)
        progress.start()
        dataset.write_parquet(
            plan.output.path,
            filesystem=plan.output.fs,
            min_rows_per_file=options.rows_per_file,
            ray_remote_args={"num_cpus": 0},
            concurrency=LIGHT_TASKS,
        )
    finally:
        context.checkpoint_config = None
        progress.stop()
    audit = ray.get(_audit.remote(listing.files, _data_files(plan.output), plan.output.fs, previous))
    if audit["duplicates"] or audit["unlisted"]:
        raise InferenceError(
            f"{plan.output.uri} holds {audit['duplicates']:,} files' rows twice and {audit['unlisted']:,} rows for "
            "files not in its listing: it is not one row per file. Nothing was deleted; pass --restart to score it again"
        )
    if audit["missing"]:
        raise InferenceError(
            f"{plan.output.uri} lacks the rows of {audit['missing']:,} listed files although its checkpoint "
            "records them (data files deleted by hand?). Nothing was deleted; pass --restart to score it again"
        )
    summary = InferenceSummary(
        images=listing.images,
        scored=audit["rows"] - plan.resumed,
        resumed=plan.resumed,
        skipped=audit["skipped"],
        errors=sum(audit["reasons"].values()),
        reasons=audit["reasons"],
        ignored=listing.ignored,
        seconds=time.time() - started,
        output=plan.output.uri,
    )
    plan.output.join(SUCCESS_FILE).write_text(_success_record(plan, listing, summary))
    _tidy(plan.output, plan.checkpoint)  # stopped half way, a rerun finishes it
    return summary


def _dataset(
    ref: ModelRef, source: Location, listing: Listing, plan: Plan, options: InferenceOptions, done: ray.ObjectRef
) -> ray.data.Dataset:
    # The names, one read task per listing file (a Read at the root, as Ray Data's checkpointing
    # needs), read, filtered and written without a CPU of their own: the model actors may hold every
    # CPU of a small machine, and a task waiting for one would wait for ever. Two at a time: each
    # task is small, and every one more is a worker process to start. Dropped: the files with a row
    # in this output's checkpoint (an earlier run's) or in a previous output.
    names = ListingSource(listing.files, plan.output.fs, done)
    dataset = ray.data.read_datasource(names, num_cpus=0, concurrency=min(LIGHT_TASKS, len(listing.files)))
    decode = {
        "fs": source.fs,
        "size": ref.image_size,
        "crop": ref.crop,
        "ten": options.ten_crop_views,
        "max_bytes": options.max_file_bytes,
    }
    return dataset.map_batches(
        views_batch, fn_kwargs=decode, batch_size=DECODE_BATCH, batch_format="numpy"
    ).map_batches(
        Predictor,
        fn_constructor_kwargs={"ref": ref, "keep": partial(top_five, ref=ref)},
        compute=ActorPoolStrategy(min_size=options.pool.smallest, max_size=options.pool.largest),
        batch_size=options.batch_size,
        num_gpus=options.pool.gpus,
        batch_format="numpy",
    )


def _scored_before(plan: Plan) -> ray.ObjectRef | None:
    """The paths the previous outputs scored without an error, sorted, in the object store (not the driver)."""
    if not plan.previous:
        return None
    return _scored_paths.remote(plan.previous, plan.previous_fs)


@ray.remote
def _scored_paths(paths: list[str], fs: pafs.FileSystem) -> np.ndarray:
    """The keys of the paths the previous outputs scored without an error."""
    keys = []
    for path in paths:
        table = pq.read_table(path, columns=["path", "error"], filesystem=fs)
        keys.append(files.path_keys(table.filter(pc.is_null(table["error"]))["path"]))
    return np.unique(np.concatenate([np.array([], files.KEY), *keys]))


@ray.remote(num_cpus=0)
def _done(previous: np.ndarray | None, checkpoint_files: list[str], fs: pafs.FileSystem) -> np.ndarray:
    """The sorted keys of the paths not to score: the previous outputs' and this output's committed checkpoint's."""
    keys = [files.path_keys(pq.read_table(f, columns=["path"], filesystem=fs)["path"]) for f in checkpoint_files]
    return np.unique(np.concatenate([np.array([], files.KEY), *keys, *([previous] if previous is not None else [])]))


class ListingSource(Datasource):
    """The listing's Parquet files, one read task each, less the files already scored (Ray Data's own
    Parquet reader adds a task that lists the files, which needs a CPU)."""

    def __init__(self, paths: list[str], fs: pafs.FileSystem, done: ray.ObjectRef) -> None:
        super().__init__()
        self.paths, self.fs, self.done = paths, fs, done

    def get_name(self) -> str:
        return "Listing"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        unknown = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(partial(files.read_unscored, path, self.fs, self.done), unknown) for path in self.paths]


class RecoveryOnly(IdColumnCheckpointManager):
    """Ray Data's recovery (the data files of uncommitted checkpoints deleted) without its filter actor.

    Ray Data would drop checkpointed rows in an actor pool of its own, one CPU each for the whole
    job: on a small machine, where the model actors hold the other CPUs, the reads behind it never
    start. The job drops them in `files.unscored` instead, with the same sorted-array lookup, no CPU held.
    """

    def load_checkpoint(self, data_file_dir=None, data_file_filesystem=None):
        if data_file_dir is not None:
            self._clean_pending_checkpoints(data_file_dir, data_file_filesystem)
        return None, 0


def _listed(listing_files: list[str], fs: pafs.FileSystem) -> np.ndarray:
    return np.concatenate(
        [np.array([], files.KEY)] + [files.path_keys(pq.read_table(f, filesystem=fs)["path"]) for f in listing_files]
    )


@ray.remote
def _count_in(listing_files: list[str], fs: pafs.FileSystem, scored: np.ndarray) -> int:
    """How many listed files the previous outputs scored."""
    return int(files.member(_listed(listing_files, fs), scored).sum())


@ray.remote
def _audit(listing_files: list[str], data_files: list[str], fs: pafs.FileSystem, scored: np.ndarray | None) -> dict:
    """The output's rows against the listing, in a worker (a bucket's names never in the driver)."""
    listed = _listed(listing_files, fs)
    rows, errors = [np.array([], files.KEY)], []
    for path in data_files:
        table = pq.read_table(path, columns=["path", "error"], filesystem=fs)
        rows.append(files.path_keys(table["path"]))
        errors += table.filter(pc.invert(pc.is_null(table["error"])))["error"].to_pylist()
    rows = np.concatenate(rows)
    skipped = files.member(listed, scored) if scored is not None else np.zeros(len(listed), bool)
    to_score, unique_rows = np.unique(listed[~skipped]), np.unique(rows)
    return {
        "rows": len(rows),
        "skipped": int(skipped.sum()),
        "duplicates": len(rows) - len(unique_rows),
        "missing": len(np.setdiff1d(to_score, unique_rows, assume_unique=True)),
        "unlisted": len(np.setdiff1d(unique_rows, to_score, assume_unique=True)),
        "reasons": files.reasons(errors),
    }


def _data_files(output: Location) -> list[str]:
    """The output's Parquet files: not the job's own (its listing)."""
    inside = len(output.path.rstrip("/"))
    return sorted(e.path for e in outputs.files(output) if e.path.endswith(".parquet") and "/_" not in e.path[inside:])


class _Progress:
    """A line every `interval` seconds from the rows Ray Data's checkpoint has committed: done, rate, time left."""

    def __init__(self, checkpoint: Location, before: int, total: int, interval: float, log: Callable[[str], None]):
        self.checkpoint, self.before, self.total, self.interval, self.log = checkpoint, before, total, interval, log
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="inference-progress", daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        known: dict[str, int] = {}
        started = time.time()
        while not self.stopping.wait(self.interval):
            done = _committed(self.checkpoint, known) - self.before
            elapsed = time.time() - started
            rate = done / elapsed if elapsed else 0.0
            left = f", about {_duration((self.total - done) / rate)} left" if rate > 0 else ""
            share = f" ({done / self.total:.0%})" if self.total else ""
            self.log(f"scored {done:,} of {self.total:,}{share}, {rate:,.0f} images/s{left}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _success_record(plan: Plan, listing: Listing, summary: InferenceSummary) -> str:
    record = {
        **plan.record,
        "images": summary.images,
        "rows": summary.scored + summary.resumed,
        "resumed": summary.resumed,
        "skipped": summary.skipped,
        "errors": summary.errors,
        "errors_by_reason": summary.reasons,
        "ignored_files": listing.ignored,
        "ignored_examples": listing.ignored_examples,
        "unlisted": [{"path": path, "reason": why} for path, why in listing.unlisted],
        "seconds": round(summary.seconds, 1),
    }
    return json.dumps(record, indent=1) + "\n"


def read_predictions(output: Location) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, filesystem=output.fs) for f in _data_files(output)])
