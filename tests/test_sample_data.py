import csv
import filecmp

from conftest import run_job
from PIL import Image

from pipeline.data import imagenet
from pipeline.data.sample import SYNSETS, make_sample


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
    assert len(files) == 2 * 3 + 2 * 2 + 2
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    assert not filecmp.cmp(a / files[-1], c / files[-1], shallow=False)


def test_the_job_writes_the_sample_and_rejects_bad_counts(tmp_path):
    argv = ["jobs/make_sample_data.py", "--out", tmp_path / "s", "--classes", "3", "--train-per-class", "2"]
    done = run_job(*argv, "--val-per-class", "1")
    assert done.returncode == 0 and "wrote 6 train and 3 val images of 3 classes" in done.stdout
    assert len(list((tmp_path / "s" / "train").glob("*/*.JPEG"))) == 6
    bad = run_job(*argv, "--classes", "11")
    assert bad.returncode == 2 and "num_classes must be between 2 and 10" in bad.stderr
