import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import free_port, run_job
from imagenet_layouts import as_devkit, jpeg, kaggle_truth, png, red
from PIL import Image

from pipeline.data import imagenet, shards
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.sample import SYNSETS
from pipeline.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _read(split_dir):
    return pq.read_table(sorted(split_dir.glob("*.parquet"))).to_pydict()


def test_shards_hold_every_image_with_its_label(tiny_shards, tiny_raw):
    classes = json.loads((tiny_shards / "classes.json").read_text())
    wnids = [w for w, _ in SYNSETS[:4]]
    assert classes == [
        {
            "index": i,
            "wnid": w,
            "name": imagenet.read_synset_mapping((tiny_raw / "LOC_synset_mapping.txt").read_text())[w],
        }
        for i, w in enumerate(wnids)
    ]

    schema = pq.read_schema(next((tiny_shards / "train").glob("*.parquet")))
    assert [(f.name, str(f.type)) for f in schema] == [
        ("image", "binary"),
        ("label", "int32"),
        ("wnid", "string"),
        ("key", "string"),
    ]

    train = _read(tiny_shards / "train")
    assert sorted(train["key"]) == sorted(p.name for p in (tiny_raw / "train").glob("*/*.JPEG"))
    assert all(
        wnids[label] == wnid and key.startswith(wnid)
        for label, wnid, key in zip(train["label"], train["wnid"], train["key"], strict=True)
    )
    assert len(set(train["label"][:32])) == 4  # shards mix classes

    val = _read(tiny_shards / "val")
    with open(tiny_raw / "LOC_val_solution.csv") as f:
        truth = {line.split(",")[0]: line.split(",")[1].split()[0] for line in f.read().splitlines()[1:]}
    assert {k.split(".")[0]: w for k, w in zip(val["key"], val["wnid"], strict=True)} == truth

    image = Image.open(io.BytesIO(train["image"][0]))
    assert (image.format, image.size, image.mode) == ("JPEG", (72, 72), "RGB")


def test_manifest_counts_shards_and_identifies_the_dataset(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["size"] == 72 and manifest["bad_files"] == [] and manifest["status"] == "complete"
    assert manifest["splits"]["train"]["images"] == 96 and manifest["splits"]["val"]["images"] == 24
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [32, 32, 32]
    for s in manifest["splits"]["train"]["shards"]:
        assert pq.read_metadata(tiny_shards / s["file"]).num_rows == s["rows"]
    data = shards.open_dataset(tiny_shards)
    assert data.num_classes == 4 and len(data.dataset_hash) == 16


def test_messy_real_world_files_become_rgb_or_are_listed_with_their_reason(ray_cluster, tiny_raw, tmp_path):
    source = shutil.copytree(tiny_raw, tmp_path / "src")
    folder = sorted((source / "train").iterdir())[0]
    good = sorted(folder.iterdir())[0].read_bytes()
    fine = {  # real ImageNet has all three: each must end up in the shards as RGB
        "cmyk.JPEG": jpeg(red(), mode="CMYK"),
        "gray.JPEG": jpeg(red(), mode="L"),
        "png_named.JPEG": png(red()),
    }
    broken = {"truncated.JPEG": good[: len(good) // 3], "empty.jpeg": b"", "._resource_fork.JPEG": b"\0\5\26\7junk"}
    stray = {".DS_Store": b"\0\0\0\1Bud1", "notes.txt": b"not an image"}
    for name, data in {**fine, **broken, **stray}.items():
        (folder / name).write_bytes(data)
    with open(os.fsencode(folder) + b"/caf\xe9.JPEG", "wb") as latin1:  # a name in Latin-1, not UTF-8
        latin1.write(good)
    os.mkfifo(folder / "fifo.JPEG")  # reading it would block for ever
    (folder / "gone.JPEG").symlink_to(folder / "deleted.JPEG")
    (folder / "huge.JPEG").write_bytes(good + b"\0" * 200_000)  # over --max-file-mb below: never read
    unreadable = {"fifo.JPEG": "not a regular file", "gone.JPEG": "not a regular file",
                  "huge.JPEG": "over the 0.191 MiB limit for one file (--max-file-mb): not read"}  # fmt: skip

    summary = prepare(
        str(source), str(tmp_path / "out"), PrepareOptions(size=64, shard_size=50, max_file_bytes=200_000)
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    bad = {b["path"].rsplit("/", 1)[1]: b["reason"] for b in manifest["bad_files"]}
    assert set(bad) == set(broken) | set(stray) | set(unreadable) | {"caf\\xe9.JPEG"}
    assert all(reason in bad[name] for name, reason in unreadable.items()), bad
    assert bad["caf\\xe9.JPEG"].startswith("its name is not UTF-8")
    assert bad["empty.jpeg"] == "empty file (0 bytes)"
    assert "truncated" in bad["truncated.JPEG"] and bad["notes.txt"].startswith("not an image file name")
    assert summary.images == {"train": 96 + len(fine), "val": 24} and len(summary.bad_files) == len(bad)

    train = _read(tmp_path / "out" / "train")
    for name in fine:
        image = Image.open(io.BytesIO(train["image"][train["key"].index(name)]))
        pixels = np.asarray(image).astype(int)
        assert image.mode == "RGB" and pixels.shape == (64, 64, 3)
        if name != "gray.JPEG":  # red stays red through CMYK and PNG
            assert abs(pixels[..., 0].mean() - 220) < 12 and pixels[..., 1:].mean() < 12


def test_devkit_layout_shards_carry_the_mapped_labels(ray_cluster, tiny_raw, tmp_path):
    prepare(
        str(as_devkit(tiny_raw, tmp_path / "devkit")), str(tmp_path / "out"), PrepareOptions(size=64, shard_size=64)
    )
    val = _read(tmp_path / "out" / "val")
    assert {k.split(".")[0]: w for k, w in zip(val["key"], val["wnid"], strict=True)} == kaggle_truth(tiny_raw)
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert all(val["wnid"][i] == classes[label]["wnid"] for i, label in enumerate(val["label"]))


def test_running_again_on_finished_output_changes_nothing(ray_cluster, tiny_raw, tiny_shards):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in tiny_shards.rglob("*") if p.is_file()}
    summary = prepare(str(tiny_raw), str(tiny_shards), PrepareOptions(size=72, shard_size=32))
    assert summary.written_images == 0 and summary.shards_skipped == summary.shards_total == 4
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in tiny_shards.rglob("*") if p.is_file()} == before


def test_other_arguments_on_finished_output_are_refused_unless_overwrite(ray_cluster, tiny_raw, tmp_path):
    out = tmp_path / "out"
    prepare(str(tiny_raw), str(out), PrepareOptions(size=64, shard_size=64))
    with pytest.raises(InputError, match="--overwrite"):
        prepare(str(tiny_raw), str(out), PrepareOptions(size=64, shard_size=32))
    summary = prepare(str(tiny_raw), str(out), PrepareOptions(size=64, shard_size=32, overwrite=True))
    assert summary.shards_total == 4 and sorted(p.name for p in (out / "train").iterdir()) == [
        "train-00000.parquet",
        "train-00001.parquet",
        "train-00002.parquet",
    ]


def test_a_killed_prepare_resumes_without_redoing_or_losing_anything(ray_cluster, tiny_raw, tmp_path):
    out, log = tmp_path / "out", tmp_path / "killed.log"
    args = ["--input", str(tiny_raw), "--output", str(out), "--size", "64", "--shard-size", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    with log.open("wb") as output:  # one shard task at a time, so the kill lands mid-job
        job = subprocess.Popen(
            [sys.executable, "jobs/prepare.py", *args, "--max-tasks", "1", "--no-progress"],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while len(list(out.glob("train/*.parquet"))) < 5 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert json.loads((out / "manifest.json").read_text())["status"] == "in progress", log.read_text()
    written = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("*/*.parquet")}
    assert 5 <= len(written) < 60

    summary = prepare(str(tiny_raw), str(out), PrepareOptions(size=64, shard_size=2))
    assert summary.shards_skipped >= len(written) and summary.images == {"train": 96, "val": 24}
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in written} == written  # not redone
    assert not list(out.glob("*/*.tmp"))

    reference = tmp_path / "reference"
    prepare(str(tiny_raw), str(reference), PrepareOptions(size=64, shard_size=2))
    for split in ("train", "val"):
        resumed, uninterrupted = _read(out / split), _read(reference / split)
        assert resumed == uninterrupted  # same keys, labels and bytes, in the same shards and order
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (out, reference)]
    assert manifests[0]["hash"] == manifests[1]["hash"] and manifests[0]["status"] == "complete"


def test_overwrite_never_reaches_the_source_or_folders_prepare_did_not_write(tiny_raw, tmp_path):
    before = sorted(p.relative_to(tiny_raw) for p in tiny_raw.rglob("*"))
    for out, message in [
        (tiny_raw, f"--output {tiny_raw} is --input {tiny_raw}"),
        (tiny_raw / "shards", "is inside --input"),
        (tiny_raw.parent, "holds --input"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            prepare(str(tiny_raw), str(out), PrepareOptions(size=64, shard_size=32, overwrite=True))
    # An ILSVRC-style tree (train/, val/) that is not a dataset prepare wrote is not replaced.
    other = shutil.copytree(tiny_raw, tmp_path / "copy")
    with pytest.raises(InputError, match="replaces only a dataset jobs/prepare.py wrote"):
        prepare(str(tiny_raw), str(other), PrepareOptions(size=64, shard_size=32, overwrite=True))
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before
    assert sorted(p.relative_to(tiny_raw) for p in tiny_raw.rglob("*")) == before


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_deletes_nothing_it_cannot_recognise_as_its_own(tiny_raw, tiny_shards, tmp_path):
    # Someone else's folder with a manifest.json, a train/ and Parquet files of their own.
    theirs = tmp_path / "theirs"
    (theirs / "train").mkdir(parents=True)
    (theirs / "manifest.json").write_text(json.dumps({"splits": {"train": 1}, "owner": "another team"}))
    pq.write_table(pq.read_table(next(tiny_shards.glob("train/*.parquet"))).replace_schema_metadata({}),
                   theirs / "train" / "train-00000.parquet")  # fmt: skip
    # A dataset prepare wrote, into which someone put a file of their own.
    ours = shutil.copytree(tiny_shards, tmp_path / "ours")
    (ours / "train" / "README.txt").write_text("notes on these shards\n")
    # A dataset prepare wrote whose shard was replaced by another file of the same name.
    swapped = shutil.copytree(tiny_shards, tmp_path / "swapped")
    shutil.copy(theirs / "train" / "train-00000.parquet", swapped / "train" / "train-00000.parquet")
    for out, message in [
        (theirs, "is not one of its manifests (no plan, splits and source)"),
        (ours, f"{ours / 'train' / 'README.txt'} is not one of its shards"),
        (swapped, f"{swapped / 'train' / 'train-00000.parquet'} is not one of its shards"),
    ]:
        before = _contents(out)
        with pytest.raises(InputError, match=re.escape(message)):
            prepare(str(tiny_raw), str(out), PrepareOptions(size=64, shard_size=32, overwrite=True))
        assert _contents(out) == before, out  # byte for byte


def test_overwrite_deletes_nothing_before_the_cluster_answers(tiny_raw, tiny_shards, tmp_path):
    ours = shutil.copytree(tiny_shards, tmp_path / "ours")
    before = _contents(ours)
    dead = f"127.0.0.1:{free_port()}"
    args = ["--input", tiny_raw, "--output", ours, "--size", "64", "--overwrite", "--no-progress"]
    proc = run_job("jobs/prepare.py", *args, env={**os.environ, "RAY_ADDRESS": dead}, timeout=120)
    assert proc.returncode == 2 and f"the Ray cluster at {dead} (from RAY_ADDRESS) does not answer" in proc.stderr
    assert _contents(ours) == before
