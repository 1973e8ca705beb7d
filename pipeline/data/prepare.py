"""Turn an ILSVRC-2012 folder (local or s3://) into Parquet shards, as a Ray Data job.

The driver scans the layout and plans the shards: train shuffled once with a fixed seed so that
every shard mixes all classes, val in file order. The plan is a pure function of the file listing
and the arguments, and its hash (the plan id) is written into every shard's footer and into
manifest.json. Each Ray task reads its shard's images, applies the paper's preprocessing (short
side → size, centre square, RGB) and writes one Parquet file whole or not at all.

Restarting: the manifest lists the finished shards as they finish, and a shard file whose footer
carries the plan id is finished even if the manifest missed it (the job was killed in between).
The same command again does only the rest; on finished output it changes nothing. A file that
cannot be used is listed in manifest.json with its reason; it never stops the job.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import TaskPoolStrategy

from pipeline.cluster import connection
from pipeline.data import imagenet, shards
from pipeline.data.sample import SAMPLE_IMAGE_SIZE, make_sample
from pipeline.data.shards import DEFAULT_SHARD_SIZE
from pipeline.data.transforms import MIN_INPUT_SIZE, describe_undecodable, encode_jpeg, load_square
from pipeline.errors import InputError
from pipeline.storage import DEFAULT_MAX_FILE_BYTES, Location, UnreadableFile, check_apart, locate

MANIFEST_FORMAT = 2
PLAN_KEY, BAD_KEY = b"alexnet.plan", b"alexnet.bad_files"  # shard footer metadata
MANIFEST_EVERY_S = 2.0  # progress written to manifest.json at most this often
SHARD = re.compile(r"(train|val)-\d{5,}\.parquet")  # shards.shard_name
TMP_SHARD = re.compile(r"(train|val)-\d{5,}\.parquet\.[0-9a-f]+\.tmp")  # a shard task's file before its rename


@dataclass
class PrepareSummary:
    out: str
    images: dict[str, int]  # per split, in the finished dataset
    bytes: int  # of all shards
    seconds: float  # of this run's shard writing
    written_images: int  # images this run wrote (0 when everything was done before)
    task_seconds: float  # summed wall time of this run's shard tasks: images / task_seconds = rate per core
    shards_total: int
    shards_skipped: int  # finished by an earlier, interrupted run
    bad_files: list[dict[str, str]] = field(default_factory=list)
    layout: str = ""

    @property
    def images_per_s(self) -> float:
        return self.written_images / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class PrepareOptions:
    """What shapes the dataset (size, shard_size, seed: the plan id covers them) and how the job runs."""

    size: int = 256  # side of the stored square images
    shard_size: int = DEFAULT_SHARD_SIZE  # images per shard
    seed: int = 0  # of the train shuffle across shards
    devkit: str | None = None  # folder with the devkit's meta.mat and validation ground truth
    overwrite: bool = False  # replace a dataset `out` holds from other arguments (only one this job wrote)
    max_tasks: int | None = None  # shard tasks at once (default: as the cluster's CPUs allow)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # a larger source file is listed as bad, not read

    def check(self) -> None:
        if self.size < MIN_INPUT_SIZE:
            raise InputError(f"--size {self.size} is below AlexNet's smallest input ({MIN_INPUT_SIZE} pixels)")
        if self.shard_size < 1:
            raise InputError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise InputError(f"--max-tasks must be at least 1, got {self.max_tasks}")
        if self.max_file_bytes < 1:
            raise InputError(f"--max-file-mb must be positive, got {self.max_file_bytes / 2**20:g}")


def prepare(
    source: str,
    out: str,
    options: PrepareOptions = PrepareOptions(),
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> PrepareSummary:
    """Shards of `source` at `out`: only the shards an earlier run of the same plan did not finish."""
    options.check()
    src = imagenet.scan(source, devkit=options.devkit)  # layout errors surface here, before any cluster work
    dest = locate(out)
    check_apart(dest, "--output", {"--input": src.root})
    dest.check_writable()
    plan, plan_id = make_plan(src, dest, options.size, options.shard_size, options.seed)
    header = {"format": MANIFEST_FORMAT, "plan": plan_id, "source": src.root.uri, "layout": src.layout}
    header.update(size=options.size, shard_size=options.shard_size, seed=options.seed)
    previous = _previous(dest, plan_id, options.overwrite)
    if previous and previous.get("status") == "complete":
        log(f"{dest.uri} is already prepared with these arguments; nothing to do")
        return _summary(dest, previous, plan, done_before=len(plan), written=0, seconds=0.0)

    done = _finished_shards(dest, plan, plan_id, previous)
    todo = [task for task in plan if task["file"] not in done]
    if done:
        log(f"resuming: {len(done)} of {len(plan)} shards are already written")
    shards.write_classes(dest, src.classes)
    shards.write_manifest(dest, _manifest(header, plan, done, src.rejected, complete=False))
    started, last_write = time.perf_counter(), 0.0
    written, task_seconds = 0, 0.0
    bar = _progress_bar(sum(len(t["paths"]) for t in todo), progress)
    for result in _run(todo, src, dest, plan_id, options):
        done[result["file"]] = result
        written += result["rows"]
        task_seconds += result["seconds"]
        bar.update(result["rows"] + len(result["bad"]))
        bar.set_postfix(bad=sum(len(r["bad"]) for r in done.values()), refresh=False)
        if time.perf_counter() - last_write > MANIFEST_EVERY_S:
            shards.write_manifest(dest, _manifest(header, plan, done, src.rejected, complete=False))
            last_write = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - started

    manifest = _manifest(header, plan, done, src.rejected, complete=True)
    manifest["hash"] = shards.manifest_hash(manifest, src.classes)
    shards.write_manifest(dest, manifest)
    done_before = len(plan) - len(todo)
    return _summary(dest, manifest, plan, done_before, written=written, seconds=seconds, task_seconds=task_seconds)


def _previous(dest: Location, plan_id: str, overwrite: bool) -> dict[str, Any] | None:
    """The manifest an earlier run of this plan left; with `overwrite`, none (what this job wrote is
    cleared, once the cluster answers); another plan's, refused."""
    previous = shards.read_manifest(dest)
    if overwrite:
        owned = _owned(dest, previous)  # what it would delete, all of it this job's, or InputError
        # Nothing goes before the cluster answers: a dead RAY_ADDRESS leaves the old dataset whole.
        connection.connect()
        _clear(dest, owned)
        return None
    if previous and previous.get("plan") != plan_id:
        raise InputError(
            f"{dest.uri} already holds a dataset prepared from {previous.get('source')} with other arguments "
            f"or another file listing ({_describe(previous)}); run the command that made it to finish it, "
            "choose another --output, or pass --overwrite to replace it"
        )
    return previous


def sample_shards(sample_dir: str, log: Callable[[str], None] = print) -> Path:
    """The bundled sample's shards, generating and preparing them on first use.

    No stats.json: the sample trains with the published ImageNet colour statistics. Its own
    (near-isotropic, eigenvalues ~0.07-0.08 against ImageNet's 0.22/0.019/0.0045) make the PCA
    lighting scramble the colour cue its classes partly rely on.
    """
    root = Path(sample_dir).expanduser().resolve()
    raw, shard_dir = root / "raw", root / "shards"
    manifest = shards.read_manifest(locate(shard_dir))
    if manifest and manifest.get("status") == "complete":
        return shard_dir
    if not (raw / imagenet.KAGGLE_VAL_SOLUTION).is_file():
        log(f"generating the sample dataset in {raw} ...")
        make_sample(raw)
    log(f"preparing shards in {shard_dir} ...")
    summary = prepare(str(raw), str(shard_dir), PrepareOptions(size=SAMPLE_IMAGE_SIZE, shard_size=256), log=log)
    log(f"prepared {summary.images} images in {summary.seconds:.1f}s")
    return shard_dir


def make_plan(
    src: imagenet.Source, dest: Location, size: int, shard_size: int, seed: int
) -> tuple[list[dict[str, Any]], str]:
    """Shard tasks in a fixed order, and the plan id that names exactly this plan."""
    label_of = {c.wnid: c.index for c in src.classes}
    plan = []
    for split, items in src.splits.items():
        if split == "train":
            items = random.Random(seed).sample(items, len(items))
        for index, start in enumerate(range(0, len(items), shard_size)):
            chunk = items[start : start + shard_size]
            plan.append(
                {
                    "split": split,
                    "file": f"{split}/{shards.shard_name(split, index)}",
                    "paths": [it.path for it in chunk],
                    "labels": [label_of[it.wnid] for it in chunk],
                }
            )
    digest = hashlib.sha256(json.dumps([MANIFEST_FORMAT, size, [c.wnid for c in src.classes]]).encode())
    for task in plan:
        digest.update(json.dumps([task["file"], task["paths"], task["labels"]]).encode())
    return plan, digest.hexdigest()[:16]


def _run(
    todo: list[dict[str, Any]], src: imagenet.Source, dest: Location, plan_id: str, options: PrepareOptions
) -> Iterable[dict[str, Any]]:
    """Results of the shard tasks, streamed back to the driver as each one finishes."""
    if not todo:
        return []
    connection.connect()  # the cluster this job runs on (or a local Ray): a dead one is named, not waited for
    wnids = [c.wnid for c in src.classes]
    results = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
        _write_shard,
        fn_kwargs={
            "src": src.root,
            "dest": dest,
            "size": options.size,
            "wnids": wnids,
            "plan_id": plan_id,
            "max_bytes": options.max_file_bytes,
        },  # fmt: skip
        compute=TaskPoolStrategy(size=options.max_tasks),
        num_cpus=1,
    )
    # One operator does all the work: Ray Data's per-operator reservation (half the CPUs held
    # back for operators this job does not have) would leave half the cluster idle.
    results.context.op_resource_reservation_enabled = False
    return ({**row, "bad": json.loads(row["bad"])} for row in results.iter_rows())


def _write_shard(
    task: dict[str, Any], src: Location, dest: Location, size: int, wnids: list[str], plan_id: str, max_bytes: int
) -> dict[str, Any]:
    started = time.perf_counter()
    rows: dict[str, list] = {name: [] for name in shards.SCHEMA.names}
    bad = []
    for path, label in zip(task["paths"], task["labels"], strict=True):
        try:  # a store that fails to answer fails the task (Ray retries it); one file that cannot be read is listed
            data = src.at(path).read_input(max_bytes)
            image = encode_jpeg(load_square(data, size))
        except UnreadableFile as exc:
            bad.append({"path": src.uri_of(path), "split": task["split"], "reason": str(exc), "shard": task["file"]})
            continue
        except Exception as exc:  # noqa: BLE001 (any undecodable file is reported, whatever PIL raised)
            reason = describe_undecodable(exc, data)
            bad.append({"path": src.uri_of(path), "split": task["split"], "reason": reason, "shard": task["file"]})
            continue
        rows["image"].append(image)
        rows["label"].append(int(label))
        rows["wnid"].append(wnids[label])
        rows["key"].append(path.rsplit("/", 1)[-1])
    table = pa.table(rows, schema=shards.SCHEMA).replace_schema_metadata(
        {PLAN_KEY: plan_id.encode(), BAD_KEY: json.dumps(bad).encode()}
    )
    target = dest.join(task["file"])
    dest.fs.create_dir(dest.join(task["split"]).path, recursive=True)
    tmp = target.path + f".{ray.get_runtime_context().get_task_id()[:12]}.tmp" if dest.is_local else target.path
    # JPEG bytes do not compress; row groups let readers split a shard.
    pq.write_table(table, tmp, filesystem=dest.fs, row_group_size=256, compression="none")
    if tmp != target.path:
        dest.fs.move(tmp, target.path)  # a local shard appears whole; an S3 object does on upload
    return {
        "split": task["split"],
        "file": task["file"],
        "rows": table.num_rows,
        "bytes": dest.fs.get_file_info(target.path).size,
        "bad": json.dumps(bad),
        "seconds": time.perf_counter() - started,
    }


def _finished_shards(
    dest: Location, plan: list[dict[str, Any]], plan_id: str, previous: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """Shards of this plan already written: listed in the manifest, or carrying the plan id."""
    done: dict[str, dict[str, Any]] = {}
    if previous:
        bad_by_shard: dict[str, list] = {}
        for b in previous.get("bad_files", []):
            bad_by_shard.setdefault(b.get("shard", ""), []).append(b)
        for split in shards.SPLITS:
            for s in previous["splits"].get(split, {}).get("shards", []):
                done[s["file"]] = {**s, "split": split, "bad": bad_by_shard.get(s["file"], [])}
    planned = {task["file"] for task in plan}
    for split in shards.SPLITS:
        for entry in dest.join(split).listdir():
            rel = f"{split}/{entry.base_name}"
            if TMP_SHARD.fullmatch(entry.base_name) and dest.is_local:
                dest.fs.delete_file(entry.path)  # left by a killed task of this job
            elif entry.base_name.endswith(".parquet") and rel not in done:
                metadata = pq.read_schema(entry.path, filesystem=dest.fs).metadata or {}
                if metadata.get(PLAN_KEY) != plan_id.encode() or rel not in planned:
                    raise InputError(
                        f"{dest.uri} holds shard {rel} from another prepare run; choose another --output "
                        "or pass --overwrite to replace its contents"
                    )
                rows = pq.read_metadata(entry.path, filesystem=dest.fs).num_rows
                bad = json.loads(metadata.get(BAD_KEY, b"[]"))
                done[rel] = {"split": split, "file": rel, "rows": rows, "bytes": entry.size, "bad": bad}
    return done


def _manifest(
    header: dict[str, Any],
    plan: list[dict[str, Any]],
    done: dict[str, dict[str, Any]],
    rejected: list[dict[str, str]],
    complete: bool,
) -> dict[str, Any]:
    splits = {}
    for split in shards.SPLITS:
        planned = [t for t in plan if t["split"] == split]
        finished = [done[t["file"]] for t in planned if t["file"] in done]
        splits[split] = {
            "images": sum(s["rows"] for s in finished),
            "planned_shards": len(planned),
            "shards": [{"file": s["file"], "rows": s["rows"], "bytes": s["bytes"]} for s in finished],
        }
    bad = rejected + [b for s in done.values() for b in s["bad"]]
    return {
        **header,
        "status": "complete" if complete else "in progress",
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "splits": splits,
        "bad_files": sorted(bad, key=lambda b: b["path"]),
    }


def _summary(
    dest: Location,
    manifest: dict,
    plan: list,
    done_before: int,
    written: int,
    seconds: float,
    task_seconds: float = 0.0,
) -> PrepareSummary:
    splits = manifest["splits"]
    return PrepareSummary(
        out=dest.uri,
        images={s: splits[s]["images"] for s in shards.SPLITS},
        bytes=sum(sh.get("bytes", 0) for s in shards.SPLITS for sh in splits[s]["shards"]),
        seconds=seconds,
        written_images=written,
        task_seconds=task_seconds,
        shards_total=len(plan),
        shards_skipped=done_before,
        bad_files=manifest["bad_files"],
        layout=manifest.get("layout", ""),
    )


def _owned(dest: Location, manifest: dict[str, Any] | None) -> list[Location]:
    """The files --overwrite would delete, every one recognised as this job's; InputError naming the
    first that is not (nothing is deleted then).

    This job's: a manifest.json in its format (a plan id, splits, a source), the JSON files beside
    it, and in train/ and val/ only shards named as it names them whose Parquet footer carries the
    manifest's plan id (or a killed task's temporary file). Someone else's folder that happens to hold
    a manifest.json, a train/ or parquet files is left alone.
    """
    splits = [split for split in shards.SPLITS if dest.join(split).is_dir()]
    if manifest is None:
        if splits:
            raise InputError(
                f"--overwrite replaces only a dataset jobs/prepare.py wrote (it holds {shards.MANIFEST_FILE}); "
                f"{dest.uri} has {', '.join(f'{s}/' for s in splits)} but no {shards.MANIFEST_FILE}: choose another "
                "--output, or move those folders away yourself"
            )
        return []
    if not _our_manifest(manifest):
        raise InputError(
            f"--overwrite replaces only a dataset jobs/prepare.py wrote; {dest.join(shards.MANIFEST_FILE).uri} is "
            "not one of its manifests (no plan, splits and source): choose another --output, or move it away yourself"
        )
    owned = [dest.join(name) for name in (shards.MANIFEST_FILE, shards.CLASSES_FILE, shards.STATS_FILE)
             if dest.join(name).is_file()]  # fmt: skip
    for split in splits:
        for entry in dest.join(split).listdir():
            place = dest.join(split, entry.base_name)
            if not _our_shard(place, entry, manifest["plan"]):
                raise InputError(
                    f"--overwrite replaces only what jobs/prepare.py wrote, and {place.uri} is not one of its shards "
                    "(name, type or Parquet metadata): nothing was deleted. Move it away, or choose another --output"
                )
            owned.append(place)
    return owned


def _our_manifest(manifest: dict[str, Any]) -> bool:
    return (
        isinstance(manifest.get("plan"), str)
        and isinstance(manifest.get("splits"), dict)
        and isinstance(manifest.get("source"), str)
        and manifest.get("format") == MANIFEST_FORMAT
    )


def _our_shard(place: Location, entry, plan_id: str) -> bool:
    if entry.type != pafs.FileType.File:
        return False
    if TMP_SHARD.fullmatch(entry.base_name):
        return True
    if not SHARD.fullmatch(entry.base_name):
        return False
    try:
        metadata = pq.read_schema(place.path, filesystem=place.fs).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return False
    return metadata.get(PLAN_KEY) == plan_id.encode()


def _clear(dest: Location, owned: list[Location]) -> None:
    """Delete what _owned listed, then the split folders if that left them empty."""
    for place in owned:
        place.fs.delete_file(place.path)
    for split in shards.SPLITS:
        folder = dest.join(split)
        if folder.is_dir() and not folder.listdir():
            folder.fs.delete_dir(folder.path)


def _describe(manifest: dict[str, Any]) -> str:
    keys = ("status", "size", "shard_size", "seed")
    return ", ".join(f"{k} {manifest.get(k)}" for k in keys if k in manifest)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="preparing", disable=not enabled, smoothing=0.1)
