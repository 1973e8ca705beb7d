import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import imagenet, shards
from pipeline.data.sample import SYNSETS
from pipeline.prepare import prepare


def _read(split_dir):
    return pq.read_table(sorted(split_dir.glob("*.parquet"))).to_pydict()


def test_shards_hold_every_image_with_its_label(tiny_shards, tiny_raw):
    classes = json.loads((tiny_shards / "classes.json").read_text())
    wnids = [w for w, _ in SYNSETS[:4]]
    assert classes == [
        {"index": i, "wnid": w, "name": imagenet.read_synset_mapping(tiny_raw / "LOC_synset_mapping.txt")[w]}
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
        for label, wnid, key in zip(train["label"], train["wnid"], train["key"])
    )
    assert len(set(train["label"][:32])) == 4  # shards mix classes

    val = _read(tiny_shards / "val")
    with open(tiny_raw / "LOC_val_solution.csv") as f:
        truth = {line.split(",")[0]: line.split(",")[1].split()[0] for line in f.read().splitlines()[1:]}
    assert {k.split(".")[0]: w for k, w in zip(val["key"], val["wnid"])} == truth

    image = Image.open(io.BytesIO(train["image"][0]))
    assert (image.format, image.size, image.mode) == ("JPEG", (72, 72), "RGB")


def test_manifest_counts_shards_and_identifies_the_dataset(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["size"] == 72 and manifest["bad_files"] == []
    assert manifest["splits"]["train"]["images"] == 96 and manifest["splits"]["val"]["images"] == 24
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [32, 32, 32]
    for s in manifest["splits"]["train"]["shards"]:
        assert pq.read_metadata(tiny_shards / s["file"]).num_rows == s["rows"]
    data = shards.open_dataset(tiny_shards)
    assert data.num_classes == 4 and len(data.dataset_hash) == 16


def test_a_broken_file_is_listed_with_its_reason_not_dropped_silently(ray_cluster, tiny_raw, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_raw, source)
    wnid_dir = next((source / "train").iterdir())
    good = sorted(wnid_dir.iterdir())[0].read_bytes()
    (wnid_dir / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (wnid_dir / "empty.jpeg").write_bytes(b"")
    (wnid_dir / "notes.txt").write_text("not an image, not an ImageNet name")  # ignored: not an image name
    (wnid_dir / "png_named.JPEG").write_bytes(_png())  # real ImageNet has one: it is a fine image

    summary = prepare(source, tmp_path / "out", size=64, shard_size=50)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    bad = {b["path"].rsplit("/", 1)[1]: b["reason"] for b in manifest["bad_files"]}
    assert set(bad) == {"truncated.JPEG", "empty.jpeg"}
    assert all(reason for reason in bad.values())
    assert summary.images == {"train": 97, "val": 24} and len(summary.bad_files) == 2


def _png():
    out = io.BytesIO()
    Image.fromarray(np.full((70, 90, 3), 128, np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "is not a directory"),
        (lambda root: root.mkdir(), "no train/ folder"),
        (lambda root: (root / "train").mkdir(parents=True), "holds no class folders"),
    ],
)
def test_unusable_sources_fail_before_any_cluster_work(tmp_path, make, message):
    root = tmp_path / "imagenet"
    make(root)
    with pytest.raises(imagenet.LayoutError, match=message):
        prepare(root, tmp_path / "out")


def test_flat_val_without_its_labels_file_says_what_to_add(tiny_raw, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_raw, source)
    (source / "LOC_val_solution.csv").unlink()
    with pytest.raises(imagenet.LayoutError, match="LOC_val_solution.csv"):
        imagenet.scan(source)
