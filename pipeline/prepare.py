"""Turn an ILSVRC-2012 folder into Parquet shards, as a Ray Data job over the cluster's CPUs.

The driver scans the layout and plans the shards (train shuffled once with a fixed seed so every
shard mixes all classes; val in file order); each Ray task reads its shard's images, applies the
paper's preprocessing (short side → size, centre square) and writes one Parquet file atomically.
A file that cannot be decoded is listed in manifest.json with its reason, never dropped silently.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from pipeline.data import imagenet, shards
from pipeline.data.transforms import encode_jpeg, square_image
from pipeline.errors import InputError

DEFAULT_SHARD_SIZE = 1024  # images per shard: ~30 MB at 256 px, a good Ray Data block


@dataclass
class PrepareSummary:
    out: str
    images: dict[str, int]
    bytes: int
    seconds: float
    bad_files: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return sum(self.images.values()) / max(self.seconds, 1e-9)


def prepare(
    source: str | Path,
    out: str | Path,
    size: int = 256,
    shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
) -> PrepareSummary:
    if size < 63:
        raise InputError(f"--size {size} is below AlexNet's smallest input (63 pixels)")
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, got {shard_size}")
    src = imagenet.scan(source)  # layout errors surface here, before any cluster work
    out = Path(out).expanduser().resolve()
    label_of = {c.wnid: c.index for c in src.classes}

    plan = []
    for split, items in src.splits.items():
        if split == "train":
            items = random.Random(seed).sample(items, len(items))
        (out / split).mkdir(parents=True, exist_ok=True)
        names = set()
        for index, start in enumerate(range(0, len(items), shard_size)):
            chunk = items[start : start + shard_size]
            names.add(shards.shard_name(split, index))
            plan.append(
                {
                    "split": split,
                    "file": str(out / split / shards.shard_name(split, index)),
                    "paths": [it.path for it in chunk],
                    "labels": [label_of[it.wnid] for it in chunk],
                }
            )
        for stale in (out / split).glob("*.parquet"):  # shards of an earlier, larger plan
            if stale.name not in names:
                stale.unlink()

    start = time.perf_counter()
    results = (
        ray.data.from_items(plan, override_num_blocks=len(plan))
        .map(_write_shard, fn_kwargs={"size": size, "classes": [c.wnid for c in src.classes]})
        .take_all()
    )
    seconds = time.perf_counter() - start

    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in shards.SPLITS}
    for r in sorted(results, key=lambda r: r["file"]):
        by_split[r["split"]].append(r)
    bad = [b for r in results for b in json.loads(r["bad"])]
    manifest = {
        "format": 1,
        "source": str(Path(source).expanduser().resolve()),
        "size": size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "splits": {
            split: {
                "images": sum(r["rows"] for r in rs),
                "shards": [{"file": f"{split}/{Path(r['file']).name}", "rows": r["rows"]} for r in rs],
            }
            for split, rs in by_split.items()
        },
        "bad_files": sorted(bad, key=lambda b: b["path"]),
    }
    manifest["hash"] = shards.manifest_hash(manifest, src.classes)
    shards.write_classes(out, src.classes)
    (out / shards.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return PrepareSummary(
        out=str(out),
        images={s: manifest["splits"][s]["images"] for s in shards.SPLITS},
        bytes=sum(r["bytes"] for r in results),
        seconds=seconds,
        bad_files=manifest["bad_files"],
    )


def _write_shard(task: dict[str, Any], size: int, classes: list[str]) -> dict[str, Any]:
    rows: dict[str, list] = {name: [] for name in shards.SCHEMA.names}
    bad = []
    for path, label in zip(task["paths"], task["labels"]):
        try:
            with Image.open(path) as image:
                data = encode_jpeg(square_image(image, size))
        except Exception as exc:  # any undecodable file is reported, whatever PIL raised
            bad.append({"path": path, "split": task["split"], "reason": f"{type(exc).__name__}: {exc}"})
            continue
        rows["image"].append(data)
        rows["label"].append(int(label))
        rows["wnid"].append(classes[label])
        rows["key"].append(os.path.basename(path))
    table = pa.table(rows, schema=shards.SCHEMA)
    tmp = task["file"] + ".tmp"
    # JPEG bytes do not compress; row groups let readers split a shard.
    pq.write_table(table, tmp, row_group_size=256, compression="none")
    os.replace(tmp, task["file"])  # a shard is there whole or not at all
    return {
        "split": task["split"],
        "file": task["file"],
        "rows": table.num_rows,
        "bytes": os.path.getsize(task["file"]),
        "bad": json.dumps(bad),
    }
