"""Preparing from and to S3, and training's reader on S3 shards, against a real S3-compatible server.

Training with its checkpoints in S3: tests/test_training.py."""

import json
import pickle

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from conftest import S3_KEY_ID, S3_SECRET

from pipeline.data import shards
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.stats import compute_stats
from pipeline.errors import InputError
from pipeline.storage import locate
from pipeline.train import ingest


@pytest.fixture(scope="module")
def s3_prepared(ray_cluster, s3_server, tiny_raw):
    """tiny_raw uploaded to s3://raw/ILSVRC2012 with two bad files, prepared to s3://shards/imagenet."""
    s3_server.create_dir("raw")
    s3_server.create_dir("shards")
    pafs.copy_files(str(tiny_raw), "raw/ILSVRC2012", destination_filesystem=s3_server)
    with s3_server.open_output_stream("raw/ILSVRC2012/train/n01440764/empty.JPEG") as f:
        f.write(b"")
    with s3_server.open_output_stream("raw/ILSVRC2012/val/.DS_Store") as f:
        f.write(b"\0\0\0\1Bud1")
    summary = prepare("s3://raw/ILSVRC2012", "s3://shards/imagenet/", PrepareOptions(size=72, shard_size=32))
    return summary


def _rows(fs, root):
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.path.endswith(".parquet"))
    table = pq.read_table(files, filesystem=fs) if len(files) > 1 else pq.read_table(files[0], filesystem=fs)
    return sorted(zip(*table.select(["key", "label", "image"]).to_pydict().values(), strict=True))


def test_s3_source_and_output_give_the_same_shards_as_local_disk(s3_prepared, s3_server, tiny_shards):
    assert s3_prepared.out == "s3://shards/imagenet" and s3_prepared.images == {"train": 96, "val": 24}
    local = pafs.LocalFileSystem()
    for split in ("train", "val"):
        assert _rows(s3_server, f"shards/imagenet/{split}") == _rows(local, str(tiny_shards / split))
    manifest = json.loads(s3_server.open_input_file("shards/imagenet/manifest.json").read())
    assert {b["path"]: b["reason"].split(" (")[0] for b in manifest["bad_files"]} == {
        "s3://raw/ILSVRC2012/train/n01440764/empty.JPEG": "empty file",
        "s3://raw/ILSVRC2012/val/.DS_Store": "not an image file name",
    }


def test_training_streams_and_measures_shards_in_s3(s3_prepared, s3_server):
    data = shards.open_dataset("s3://shards/imagenet")
    assert data.num_classes == 4 and data.count("train") == 96
    labels = np.concatenate(
        [b["label"] for b in ingest.train_dataset(data.split_dir("train"), crop=64, seed=0).iter_batches()]
    )
    assert len(labels) == 96 and sorted(np.bincount(labels)) == [24] * 4
    stats = compute_stats("s3://shards/imagenet")
    assert stats["pixels"] == 96 * 72 * 72
    assert json.loads(s3_server.open_input_file("shards/imagenet/stats.json").read()) == stats


def test_prepare_again_on_finished_s3_output_writes_nothing(s3_prepared, s3_server):
    before = {i.path: i.mtime for i in s3_server.get_file_info(pafs.FileSelector("shards/imagenet", recursive=True))}
    summary = prepare("s3://raw/ILSVRC2012", "s3://shards/imagenet", PrepareOptions(size=72, shard_size=32))
    assert summary.written_images == 0 and summary.shards_skipped == summary.shards_total
    after = {i.path: i.mtime for i in s3_server.get_file_info(pafs.FileSelector("shards/imagenet", recursive=True))}
    assert after == before


@pytest.mark.parametrize(
    "source, out, message",
    [
        ("s3://no-such-bucket/ILSVRC2012", "s3://shards/x", "s3://no-such-bucket/ILSVRC2012 does not exist"),
        ("s3://raw/ILSVRC2012", "s3://missing-bucket/x", "bucket s3://missing-bucket does not exist"),
        ("s3://", "s3://shards/x", "names no bucket"),
        ("gs://raw/ILSVRC2012", "s3://shards/x", "only local paths and s3:// URIs"),
    ],
)
def test_missing_buckets_fail_with_a_message_before_any_cluster_work(s3_server, source, out, message):
    with pytest.raises(InputError, match=message):
        prepare(source, out)


def test_an_s3_location_travels_without_credentials_and_finds_them_where_it_runs(ray_cluster, s3_server):
    s3_server.create_dir("travels")
    with s3_server.open_output_stream("travels/notes/hello.txt") as f:
        f.write(b"hello")
    notes = locate("s3://travels/notes")
    sent = pickle.dumps(notes)  # what a Ray task gets: the endpoint and region, never the keys
    assert S3_SECRET.encode() not in sent and S3_KEY_ID.encode() not in sent
    assert b"127.0.0.1" in sent

    @ray.remote
    def read(location):  # another process, on whatever node: its own credentials, by the AWS chain
        return location.join("hello.txt").read_text()

    assert ray.get(read.remote(notes)) == "hello"


def test_a_run_name_on_s3_is_claimed_by_one_job_only_and_given_back_if_the_run_never_starts(s3_server):
    from pipeline import config
    from pipeline.config import ConfigError
    from pipeline.train import run

    s3_server.create_dir("runs-bucket")
    cfg = config.resolve("sample", storage_path="s3://runs-bucket/runs", name="claimed")
    run.claim(cfg, run.free_name(cfg))
    with pytest.raises(ConfigError, match="s3://runs-bucket/runs/claimed already exists"):
        run.claim(cfg, "claimed")  # a second job, past the first check: S3's conditional write refuses it
    with pytest.raises(ConfigError, match="already exists"):
        run.free_name(cfg)
    run.release(cfg, "claimed")  # nothing of the run written: the claim goes, the name is free again
    assert run.free_name(cfg) == "claimed"
