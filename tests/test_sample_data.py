import csv
import filecmp

import pytest
from conftest import run_job
from PIL import Image

from pipeline.data import imagenet
from pipeline.data.sample import SYNSETS, make_sample
from pipeline.errors import InputError


def test_sample_has_the_ilsvrc_layout_with_real_wnids(tiny_raw):
    wnids = sorted(p.name for p in (tiny_raw / "train").iterdir())
    assert wnids == [w for w, _ in SYNSETS[:4]]
    for wnid in wnids:
        files = sorted(p.name for p in (tiny_raw / "train" / wnid).iterdir())
        assert len(files) == 24 and all(f.startswith(f"{wnid}_") and f.endswith(".JPEG") for f in files)
    val = sorted(p.name for p in (tiny_raw / "val").iterdir())
    assert val[0] == "ILSVRC2012_val_00000001.JPEG" and len(val) == 24
    with open(tiny_raw / "LOC_val_solution.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["ImageId"] + ".JPEG" for r in rows} == set(val)
    assert all(r["PredictionString"].split()[0] in wnids and len(r["PredictionString"].split()) == 5 for r in rows)
    names = imagenet.read_synset_mapping((tiny_raw / "LOC_synset_mapping.txt").read_text())
    assert names["n01440764"] == "tench" and names["n01484850"] == "great white shark"


def test_images_vary_in_size_and_aspect_like_imagenet(tiny_raw):
    sizes = {Image.open(p).size for p in (tiny_raw / "train").glob("*/*.JPEG")}
    assert len(sizes) > 20
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    modes = {Image.open(p).mode for p in (tiny_raw / "train").glob("*/*.JPEG")}
    assert modes == {"RGB", "L"}  # a few grayscale JPEGs, as in the real train set


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_sample(tmp_path / "a", num_classes=2, train_per_class=3, val_per_class=2, seed=5)
    b = make_sample(tmp_path / "b", num_classes=2, train_per_class=3, val_per_class=2, seed=5)
    c = make_sample(tmp_path / "c", num_classes=2, train_per_class=3, val_per_class=2, seed=6)
    files = [p.relative_to(a) for p in sorted(a.rglob("*")) if p.is_file()]
    assert len(files) == 2 * 3 + 2 * 2 + 2 + 1  # images, the two ILSVRC files, the sample's marker
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    assert not filecmp.cmp(a / files[-1], c / files[-1], shallow=False)


def test_the_job_writes_the_sample_and_rejects_bad_counts(tmp_path):
    argv = ["jobs/make_sample_data.py", "--output", tmp_path / "s", "--classes", "3", "--train-per-class", "2"]
    done = run_job(*argv, "--val-per-class", "1", "--contact-sheet", tmp_path / "sheet.png")
    assert done.returncode == 0 and "wrote 6 train and 3 val images of 3 classes" in done.stdout
    assert len(list((tmp_path / "s" / "train").glob("*/*.JPEG"))) == 6
    sheet = Image.open(tmp_path / "sheet.png")  # a row per class, the 2 images each of them has
    assert sheet.format == "PNG" and sheet.size == (150 + 8 * 96, 3 * 96)
    bad = run_job(*argv, "--classes", "11")
    assert bad.returncode == 2 and "num_classes must be between 2 and 10" in bad.stderr


def test_a_folder_that_is_not_this_jobs_sample_is_never_written_into(tmp_path):
    """A real ImageNet root (here: a stand-in with its files) is left byte for byte as it was."""
    root = tmp_path / "ILSVRC2012"
    (root / "val").mkdir(parents=True)
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n")
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"\xff\xd8 a real photo")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    refused = run_job("jobs/make_sample_data.py", "--output", root, "--classes", "2", "--train-per-class", "1")
    assert refused.returncode == 2 and "holds no sample this job wrote" in refused.stderr, refused.stderr
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before and not (root / "train").exists()

    # Its own sample, made again with the same settings: written again; with other settings: refused.
    make_sample(tmp_path / "s", num_classes=2, train_per_class=1, val_per_class=1)
    make_sample(tmp_path / "s", num_classes=2, train_per_class=1, val_per_class=1)
    with pytest.raises(InputError, match="holds a sample made with other settings"):
        make_sample(tmp_path / "s", num_classes=3, train_per_class=1, val_per_class=1)
