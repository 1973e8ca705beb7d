"""ILSVRC-2012 as people download it, on local disk or in S3.

    ROOT/train/<wnid>/<wnid>_<n>.JPEG                            always
    ROOT/val/<wnid>/*.JPEG                                       val in class folders, or
    ROOT/val/ILSVRC2012_val_<8 digits>.JPEG  + labels from       flat val, labelled by
        ROOT/LOC_val_solution.csv                                  Kaggle's solution file, or
        ILSVRC2012_validation_ground_truth.txt + meta.mat          the devkit (ids mapped via meta.mat)
    ROOT/LOC_synset_mapping.txt  or the devkit's meta.mat        class names (optional)

Kaggle's download (ROOT/ILSVRC/Data/CLS-LOC/{train,val} with the CSVs in ROOT) is found as is. The
devkit's files are looked for in ROOT, ROOT/data and ROOT/ILSVRC2012_devkit_t12/data, or in the
folder given as ``devkit``. Class index = position of the wnid in sorted order (torchvision's).

Files that cannot be used (names without an image extension such as ``.DS_Store``, files outside
class folders, flat val images without a label) are returned in ``Source.rejected`` with a reason;
files with an image name are decoded later, and those that fail are reported then.
"""

from __future__ import annotations

import csv
import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from pipeline.data.transforms import IMAGE_EXTENSIONS, is_image_name
from pipeline.errors import InputError
from pipeline.storage import NOT_UTF8, Location, locate, not_utf8

SYNSET_MAPPING = "LOC_synset_mapping.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DIRS = ("", "data", "ILSVRC2012_devkit_t12/data", "ILSVRC2012_devkit_t12")
KAGGLE_IMAGE_ROOT = "ILSVRC/Data/CLS-LOC"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})$")
LISTING_THREADS = 32  # class folders listed at once: S3 listing is latency-bound


class LayoutError(InputError):
    """The source is not a usable ILSVRC-2012 layout; the message says what is missing."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Item:
    path: str  # inside the source's filesystem
    wnid: str


@dataclass
class Source:
    root: Location
    classes: list[ClassInfo]
    splits: dict[str, list[Item]]  # "train", "val"
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"path", "split", "reason"}
    layout: str = ""


def read_synset_mapping(text: str, origin: str = SYNSET_MAPPING) -> dict[str, str]:
    """wnid → human name (the first of the comma-separated synonyms)."""
    names = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        if not wnid.startswith("n") or not rest:
            raise LayoutError(f"{origin}:{line_no}: expected 'wnid name, name, ...', got {line!r}")
        names[wnid] = rest.split(",")[0].strip()
    return names


def read_kaggle_val_solution(text: str, origin: str = KAGGLE_VAL_SOLUTION) -> dict[str, str]:
    """ImageId → wnid, from the first token of PredictionString."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise LayoutError(f"{origin}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
    return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


def read_devkit_meta(data: bytes, origin: str = DEVKIT_META) -> tuple[dict[int, str], dict[str, str]]:
    """The devkit's meta.mat → (ILSVRC2012_ID → wnid, wnid → name) for the 1000 leaf classes.

    The ids are the devkit's own numbering (1..1000 in WordNet-hierarchy order), not the
    sorted-wnid class index: ground-truth ids must go through this map.
    """
    import scipy.io

    try:
        synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        rows = zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["words"], synsets["num_children"], strict=True)
        leaves = [(int(i), str(w), str(words)) for i, w, words, children in rows if int(children) == 0]
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise LayoutError(f"{origin} is not the ILSVRC-2012 devkit's meta.mat (no 'synsets' table): {exc}") from exc
    return {i: w for i, w, _ in leaves}, {w: words.split(",")[0].strip() for _, w, words in leaves}


def read_devkit_ground_truth(text: str, origin: str = DEVKIT_GROUND_TRUTH) -> list[int]:
    """One ILSVRC2012_ID per line; line n labels ILSVRC2012_val_<n>.JPEG."""
    try:
        return [int(line) for line in text.split()]
    except ValueError as exc:
        raise LayoutError(f"{origin}: expected one integer class id per line ({exc})") from exc


def scan(source: str | Location, devkit: str | None = None) -> Source:
    root = source if isinstance(source, Location) else locate(source)
    if root.info().type == pafs.FileType.NotFound:
        raise LayoutError(f"source {root.uri} does not exist; pass the folder that holds train/ and val/")
    if not root.is_dir():
        raise LayoutError(f"source {root.uri} is not a directory; pass the folder that holds train/ and val/")
    images = root
    if not root.join("train").is_dir() and root.join(KAGGLE_IMAGE_ROOT, "train").is_dir():
        images = root.join(KAGGLE_IMAGE_ROOT)
    train_dir = images.join("train")
    if not train_dir.is_dir():
        raise LayoutError(f"no train/ folder in {root.uri}; expected train/<wnid>/<images>")

    metadata = _Metadata(root, images, devkit)
    rejected: list[dict[str, str]] = []
    train, wnids = _scan_class_folders(train_dir, "train", rejected)
    if not wnids:
        raise LayoutError(f"{train_dir.uri} holds no class folders; expected train/<wnid>/<images>")
    if not train:
        raise LayoutError(f"{train_dir.uri} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    val, val_layout = _scan_val(images.join("val"), metadata, rejected)
    unknown = sorted({item.wnid for item in val} - set(wnids))
    if unknown:
        raise LayoutError(f"val labels name classes that train/ does not have: {unknown[:5]}")

    names = metadata.class_names()
    classes = [ClassInfo(i, wnid, names.get(wnid, wnid)) for i, wnid in enumerate(wnids)]
    layout = f"train: class folders; val: {val_layout}; names: {metadata.names_origin or 'wnids'}"
    return Source(root, classes, {"train": train, "val": val}, rejected, layout)


class _Metadata:
    """The label and name files beside the images, each looked up once."""

    def __init__(self, root: Location, images: Location, devkit: str | None) -> None:
        self.root, self.images = root, images
        self.devkit_dirs = [locate(devkit)] if devkit else [root.join(d) if d else root for d in DEVKIT_DIRS]
        self.names_origin = ""

    def find(self, name: str, dirs: list[Location]) -> Location | None:
        for d in dirs:
            candidate = d.join(name)
            if candidate.is_file():
                return candidate
        return None

    def kaggle_solution(self) -> Location | None:
        return self.find(KAGGLE_VAL_SOLUTION, [self.root, self.images])

    def devkit(self) -> tuple[Location, Location] | None:
        truth, meta = self.find(DEVKIT_GROUND_TRUTH, self.devkit_dirs), self.find(DEVKIT_META, self.devkit_dirs)
        return (truth, meta) if truth and meta else None

    def class_names(self) -> dict[str, str]:
        mapping = self.find(SYNSET_MAPPING, [self.root, self.images])
        if mapping:
            self.names_origin = SYNSET_MAPPING
            return read_synset_mapping(mapping.read_text(), mapping.uri)
        meta = self.find(DEVKIT_META, self.devkit_dirs)
        if meta:
            self.names_origin = f"devkit {DEVKIT_META}"
            return read_devkit_meta(meta.read_bytes(), meta.uri)[1]
        return {}


def _scan_class_folders(split_dir: Location, split: str, rejected: list) -> tuple[list[Item], list[str]]:
    folders = []
    for entry in split_dir.listdir():
        if entry.type == pafs.FileType.Directory:
            folders.append(entry)
        else:
            rejected.append(_reject(split_dir, entry, split, "not inside a class folder"))
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        listings = list(pool.map(lambda d: split_dir.at(d.path).listdir(), folders))
    items = []
    for folder, entries in zip(folders, listings, strict=True):
        for entry in entries:
            reason = _unusable(entry)
            if reason:
                rejected.append(_reject(split_dir, entry, split, reason))
            else:
                items.append(Item(entry.path, folder.base_name))
    return items, [f.base_name for f in folders]


def _scan_val(val_dir: Location, metadata: _Metadata, rejected: list) -> tuple[list[Item], str]:
    if not val_dir.is_dir():
        raise LayoutError(f"no val/ folder in {val_dir.uri.rsplit('/', 1)[0]}")
    entries = val_dir.listdir()
    if any(e.type == pafs.FileType.Directory for e in entries):
        items, _ = _scan_class_folders(val_dir, "val", rejected)
        layout = "class folders"
    else:
        label_of, layout = _flat_val_labels(val_dir, metadata)
        items = []
        for entry in entries:
            reason = _unusable(entry)
            wnid = label_of(entry.base_name.split(".")[0])
            if not reason and wnid is None:
                reason = f"no label for it in {layout}"
            if reason:
                rejected.append(_reject(val_dir, entry, "val", reason))
            else:
                items.append(Item(entry.path, wnid))
    if not items:
        raise LayoutError(f"{val_dir.uri} holds no labelled images ({', '.join(IMAGE_EXTENSIONS)})")
    return items, layout


def _flat_val_labels(val_dir: Location, metadata: _Metadata):
    solution = metadata.kaggle_solution()
    if solution:
        labels = read_kaggle_val_solution(solution.read_text(), solution.uri)
        return labels.get, f"flat + {KAGGLE_VAL_SOLUTION}"
    devkit = metadata.devkit()
    if devkit:
        truth_file, meta_file = devkit
        truth = read_devkit_ground_truth(truth_file.read_text(), truth_file.uri)
        id_to_wnid, _ = read_devkit_meta(meta_file.read_bytes(), meta_file.uri)
        bad_ids = sorted({i for i in truth if i not in id_to_wnid})
        if bad_ids:
            raise LayoutError(
                f"{truth_file.uri} uses ids {bad_ids[:5]} that {meta_file.uri} does not define; "
                "use the ground truth and meta.mat of the same devkit"
            )

        def label_of(stem: str) -> str | None:
            match = VAL_NAME.match(stem)
            n = int(match.group(1)) if match else 0
            return id_to_wnid[truth[n - 1]] if 1 <= n <= len(truth) else None

        return label_of, f"flat + devkit {DEVKIT_GROUND_TRUTH}"
    raise LayoutError(
        f"{val_dir.uri} is flat but no labels were found: put Kaggle's {KAGGLE_VAL_SOLUTION} beside train/ and "
        f"val/, or the devkit's {DEVKIT_GROUND_TRUTH} and {DEVKIT_META} (pass --devkit DIR), "
        "or sort val/ into <wnid> folders"
    )


def _unusable(entry: pafs.FileInfo) -> str:
    if entry.type == pafs.FileType.Directory:
        return "a folder where images were expected: not read"
    if not_utf8(entry):
        return NOT_UTF8
    if entry.type != pafs.FileType.File:
        return "not a regular file"
    if not is_image_name(entry.base_name):
        return f"not an image file name (expected {', '.join(IMAGE_EXTENSIONS)}, any case)"
    return ""


def _reject(root: Location, entry: pafs.FileInfo, split: str, reason: str) -> dict[str, str]:
    return {"path": root.uri_of(entry.path), "split": split, "reason": reason}
