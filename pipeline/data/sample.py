"""A small procedurally generated dataset in the real ILSVRC-2012 layout.

Each class is a shape (disc, square, triangle, ring, ...) drawn on a cluttered, noisy background
at a random size, position and tilt. Its colour leans towards a hue of its own but the hues of
neighbouring classes overlap, so colour alone gets a network part of the way and shape does the
rest: AlexNet learns it in minutes on a CPU, not in one step. Images have ImageNet-like varied
sizes and aspect ratios, a few are grayscale (as in the real train set), and everything is a
deterministic function of the seed.

The classes borrow the first ten real ILSVRC-2012 wnids and names, in sorted order.

The folder gets MARKER first, with the settings it was made with: a sample is written only into an
empty folder or one holding a sample of the same settings (which is written again, file for file).
A folder with other contents, a real ImageNet copy among them, is refused, never written into.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from pipeline.data.imagenet import KAGGLE_VAL_SOLUTION, SYNSET_MAPPING
from pipeline.errors import InputError

# The first ten ILSVRC-2012 synsets, as LOC_synset_mapping.txt spells them.
SYNSETS = (
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"),
    ("n01498041", "stingray"),
    ("n01514668", "cock"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich, Struthio camelus"),
)
SHAPES = ("disc", "square", "triangle", "ring", "plus", "star", "bars", "crescent", "hexagon", "checker")
SAMPLE_IMAGE_SIZE = 72  # shards of the sample profile: 72-pixel squares, 64-pixel crops
GRAYSCALE_EVERY = 50  # one image in 50 is stored as grayscale
MARKER = ".alexnet-sample.json"  # in a sample's folder: which job wrote it, with which settings


def make_sample(
    out: str | Path,
    num_classes: int = 10,
    train_per_class: int = 260,
    val_per_class: int = 50,
    seed: int = 0,
) -> Path:
    if not 2 <= num_classes <= len(SYNSETS):
        raise InputError(f"num_classes must be between 2 and {len(SYNSETS)}, got {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise InputError("train_per_class and val_per_class must be at least 1")
    out = Path(out)
    settings = {"written_by": "jobs/make_sample_data.py", "classes": num_classes, "train_per_class": train_per_class,
                "val_per_class": val_per_class, "seed": seed}  # fmt: skip
    _check_writable(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps(settings, indent=1) + "\n")  # first: a killed run's folder is still ours
    synsets = SYNSETS[:num_classes]
    (out / "val").mkdir(parents=True, exist_ok=True)
    (out / SYNSET_MAPPING).write_text("".join(f"{wnid} {names}\n" for wnid, names in synsets))

    for label, (wnid, _) in enumerate(synsets):
        class_dir = out / "train" / wnid
        class_dir.mkdir(parents=True, exist_ok=True)
        for n in range(train_per_class):
            image, _ = render(label, np.random.default_rng([seed, 0, label, n]), label * train_per_class + n)
            image.save(class_dir / f"{wnid}_{n}.JPEG", quality=90)

    # Flat val, labels in Kaggle's CSV; classes interleaved as in the real val set.
    rows = []
    for i in range(num_classes * val_per_class):
        label = i % num_classes
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        image, box = render(label, np.random.default_rng([seed, 1, i]), i)
        image.save(out / "val" / f"{image_id}.JPEG", quality=90)
        rows.append((image_id, f"{synsets[label][0]} {' '.join(map(str, box))}"))
    with (out / KAGGLE_VAL_SOLUTION).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    return out


def _check_writable(out: Path, settings: dict) -> None:
    """`out` is new, empty, or a sample made with the same settings; else InputError, nothing written."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file; name a folder for the sample")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / MARKER
    if not marker.is_file():
        raise InputError(
            f"--output {out} is not empty and holds no sample this job wrote (no {MARKER}): it could be a real ImageNet "
            "folder, whose LOC_val_solution.csv and images the sample would replace. Name a new or empty folder"
        )
    try:
        theirs = json.loads(marker.read_text())
    except (OSError, ValueError):
        theirs = None
    if theirs != settings:
        raise InputError(
            f"--output {out} holds a sample made with other settings ({theirs}); writing this one over it would mix "
            "the two. Name another folder, or delete that sample first"
        )


def render(label: int, rng: np.random.Generator, n: int = 0) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Image number `n` of its split, of class `label`, and the object's box (x0, y0, x1, y1)."""
    short = int(rng.integers(80, 161))
    aspect = float(rng.uniform(1.0, 1.6))
    w, h = (round(short * aspect), short) if rng.random() < 0.7 else (short, round(short * aspect))

    image = Image.fromarray(_background(w, h, rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):  # clutter: small strokes in random colours
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(3, max(4, short // 10)))
        draw.ellipse((x - r, y - r, x + r, y + r), outline=_random_colour(rng), width=2)

    radius = short * rng.uniform(0.2, 0.34)
    cx = w / 2 + rng.uniform(-0.15, 0.15) * w
    cy = h / 2 + rng.uniform(-0.15, 0.15) * h
    hue = (label / 10 + rng.normal(0, 0.06)) % 1.0  # neighbouring classes' hues overlap
    colour = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    _draw_shape(draw, SHAPES[label], cx, cy, radius, math.radians(rng.uniform(-20, 20)), colour, rng)
    box = tuple(int(v) for v in (max(0, cx - radius), max(0, cy - radius), min(w, cx + radius), min(h, cy + radius)))
    if n % GRAYSCALE_EVERY == GRAYSCALE_EVERY - 1:
        image = image.convert("L")
    return image, box


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(0, 255, 3)
    direction = rng.uniform(-80, 80, 3)
    ramp = np.linspace(-0.5, 0.5, w)[None, :, None] if rng.random() < 0.5 else np.linspace(-0.5, 0.5, h)[:, None, None]
    noise = rng.normal(0, rng.uniform(5, 30), (h, w, 3))
    return np.clip(base + ramp * direction + noise, 0, 255).astype(np.uint8)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


def _polygon(cx: float, cy: float, radii: list[float], tilt: float) -> list[tuple[float, float]]:
    k = len(radii)
    return [
        (cx + r * math.sin(tilt + 2 * math.pi * i / k), cy - r * math.cos(tilt + 2 * math.pi * i / k))
        for i, r in enumerate(radii)
    ]


def _rotated_rect(cx: float, cy: float, half_w: float, half_h: float, tilt: float) -> list[tuple[float, float]]:
    c, s = math.cos(tilt), math.sin(tilt)
    corners = ((-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _draw_shape(draw, shape, cx, cy, r, tilt, colour, rng) -> None:
    if shape == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.polygon(_rotated_rect(cx, cy, r * 0.8, r * 0.8, tilt), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, tilt), fill=colour)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r * 0.3)))
    elif shape == "plus":
        draw.polygon(_rotated_rect(cx, cy, r, r * 0.28, tilt), fill=colour)
        draw.polygon(_rotated_rect(cx, cy, r * 0.28, r, tilt), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, r * 0.4] * 5, tilt), fill=colour)
    elif shape == "bars":
        for offset in (-0.6, 0.0, 0.6):
            c, s = math.cos(tilt), math.sin(tilt)
            bx, by = cx - offset * r * s, cy + offset * r * c
            draw.polygon(_rotated_rect(bx, by, r, r * 0.16, tilt), fill=colour)
    elif shape == "crescent":  # a disc with an offset disc cut out of it, drawn through a mask
        mask = Image.new("L", draw.im.size, 0)
        cut = ImageDraw.Draw(mask)
        cut.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        dx, dy = r * 0.55 * math.cos(tilt), r * 0.55 * math.sin(tilt)
        cut.ellipse((cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy), fill=0)
        draw.bitmap((0, 0), mask, fill=colour)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, tilt), fill=colour)
    elif shape == "checker":
        cells, size = 3, 2 * r / 3
        for i in range(cells):
            for j in range(cells):
                if (i + j) % 2 == 0:
                    x0, y0 = cx - r + i * size, cy - r + j * size
                    draw.rectangle((x0, y0, x0 + size, y0 + size), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def contact_sheet(sample: str | Path, per_class: int = 8, tile: int = 96) -> Image.Image:
    """A picture of a sample: a row per class, its first `per_class` training images as squares."""
    root = Path(sample)
    classes = [line.split(" ", 1) for line in (root / SYNSET_MAPPING).read_text().splitlines() if line]
    label_width = 150
    sheet = Image.new("RGB", (label_width + per_class * tile, len(classes) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (wnid, names) in enumerate(classes):
        draw.text((6, row * tile + tile // 2 - 12), f"{names.split(',')[0]}\n{SHAPES[row]}", fill="black")
        files = sorted((root / "train" / wnid).glob("*.JPEG"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        for col, path in enumerate(files[:per_class]):
            with Image.open(path) as image:
                square = ImageOps.fit(image.convert("RGB"), (tile - 4, tile - 4))
            sheet.paste(square, (label_width + col * tile + 2, row * tile + 2))
    return sheet
