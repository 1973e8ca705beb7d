import shutil

import pytest
from imagenet_layouts import as_devkit, as_val_folders, kaggle_truth

from pipeline.data import imagenet
from pipeline.data.sample import SYNSETS


def _labels(source: imagenet.Source, split: str) -> dict[str, str]:
    return {item.path.rsplit("/", 1)[1].split(".")[0]: item.wnid for item in source.splits[split]}


def test_kaggle_flat_val_is_labelled_by_its_solution_file(tiny_raw):
    source = imagenet.scan(tiny_raw)
    assert _labels(source, "val") == kaggle_truth(tiny_raw)
    assert [c.wnid for c in source.classes] == [w for w, _ in SYNSETS[:4]]
    assert [c.name for c in source.classes] == [names.split(",")[0] for _, names in SYNSETS[:4]]
    assert len(source.splits["train"]) == 96 and source.rejected == []
    assert "LOC_val_solution.csv" in source.layout


def test_val_in_class_folders_needs_no_label_file(tiny_raw, tmp_path):
    source = imagenet.scan(as_val_folders(tiny_raw, tmp_path / "folders"))
    assert _labels(source, "val") == kaggle_truth(tiny_raw)
    assert source.layout.startswith("train: class folders; val: class folders")


def test_devkit_ground_truth_ids_are_mapped_through_meta_not_read_as_class_indices(tiny_raw, tmp_path):
    source = imagenet.scan(as_devkit(tiny_raw, tmp_path / "devkit"))
    assert _labels(source, "val") == kaggle_truth(tiny_raw)
    assert [c.wnid for c in source.classes] == sorted(c.wnid for c in source.classes)  # index: sorted wnids
    assert [c.name for c in source.classes] == [f"devkit name of {c.wnid}" for c in source.classes]


def test_devkit_files_elsewhere_are_found_with_the_devkit_option(tiny_raw, tmp_path):
    root = as_devkit(tiny_raw, tmp_path / "devkit", devkit_dir="../downloads/devkit")
    with pytest.raises(imagenet.LayoutError, match="--devkit"):
        imagenet.scan(root)
    source = imagenet.scan(root, devkit=str(tmp_path / "downloads" / "devkit"))
    assert _labels(source, "val") == kaggle_truth(tiny_raw)


def test_kaggle_download_tree_is_found_as_downloaded(tiny_raw, tmp_path):
    root = tmp_path / "imagenet-object-localization-challenge"
    images = root / "ILSVRC" / "Data" / "CLS-LOC"
    images.mkdir(parents=True)
    shutil.copytree(tiny_raw / "train", images / "train")
    shutil.copytree(tiny_raw / "val", images / "val")
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.copy(tiny_raw / name, root / name)
    source = imagenet.scan(root)
    assert _labels(source, "val") == kaggle_truth(tiny_raw) and len(source.splits["train"]) == 96


def test_extensions_match_whatever_their_case(tiny_raw, tmp_path):
    root = shutil.copytree(tiny_raw, tmp_path / "src")
    folder = sorted((root / "train").iterdir())[0]
    images = sorted(folder.iterdir())
    for image, suffix in zip(images, (".jpeg", ".jpg", ".JPG", ".Jpeg", ".PNG"), strict=False):
        image.rename(image.with_suffix(suffix))
    source = imagenet.scan(root)
    assert len(source.splits["train"]) == 96 and source.rejected == []


def test_stray_files_are_rejected_with_a_reason(tiny_raw, tmp_path):
    root = shutil.copytree(tiny_raw, tmp_path / "src")
    folder = sorted((root / "train").iterdir())[0]
    (root / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "n01440764.tar").write_bytes(b"leftover archive")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "README.txt").write_text("downloaded from somewhere")
    (root / "val" / "ILSVRC2012_val_99999999.JPEG").write_bytes((root / "val").iterdir().__next__().read_bytes())
    source = imagenet.scan(root)
    reasons = {r["path"].removeprefix(str(root) + "/"): r["reason"] for r in source.rejected}
    assert set(reasons) == {
        "train/.DS_Store",
        "train/n01440764.tar",
        f"train/{folder.name}/.DS_Store",
        f"train/{folder.name}/README.txt",
        "val/ILSVRC2012_val_99999999.JPEG",
    }
    assert reasons["train/.DS_Store"] == "not inside a class folder"
    assert reasons[f"train/{folder.name}/README.txt"].startswith("not an image file name")
    assert reasons["val/ILSVRC2012_val_99999999.JPEG"].startswith("no label for it")
    assert len(source.splits["train"]) == 96 and len(source.splits["val"]) == 24


def test_flat_val_without_labels_names_every_way_to_label_it(tiny_raw, tmp_path):
    root = shutil.copytree(tiny_raw, tmp_path / "src")
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(imagenet.LayoutError, match="LOC_val_solution.csv.*ILSVRC2012_validation_ground_truth.txt"):
        imagenet.scan(root)


def test_ground_truth_from_another_devkit_fails_with_the_ids_it_lacks(tiny_raw, tmp_path):
    root = as_devkit(tiny_raw, tmp_path / "devkit")
    truth = root / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
    truth.write_text(truth.read_text().replace("1\n", "977\n", 1))
    with pytest.raises(imagenet.LayoutError, match=r"ids \[977\]"):
        imagenet.scan(root)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.write_text("a file"), "is not a directory"),
        (lambda root: root.mkdir(), "no train/ folder"),
        (lambda root: (root / "train").mkdir(parents=True), "holds no class folders"),
        (lambda root: (root / "train" / "n01440764").mkdir(parents=True), "no images"),
    ],
)
def test_unusable_sources_fail_before_any_cluster_work(tmp_path, make, message):
    root = tmp_path / "imagenet"
    make(root)
    with pytest.raises(imagenet.LayoutError, match=message):
        imagenet.scan(root)
