"""The CPU half of preprocessing, defined once for preparation, training, evaluation and inference.

- ``square_image``: the paper's preprocessing of a source image (short side → size, centre crop
  size×size), used when shards are written and when raw images are served.
- ``train_batch``: decode stored squares, random crop, random horizontal flip (the paper's
  training augmentation); uint8 NHWC out.
- ``eval_batch``: decode stored squares, centre crop; uint8 NHWC out.
- ``ten_crop_batch``: decode stored squares into the paper's ten test views (evaluation).
- ``shuffle_rows`` / ``stored_bytes``: the training and validation batches of ``--decode-on
  train``, the JPEG bytes undecoded (the train worker decodes them: pipeline.data.device).

Batches are Ray Data numpy batches: ``{"image": object array of JPEG bytes, "label": int32}``.
"""

from __future__ import annotations

import io
import re
import warnings
import zlib

import numpy as np
from PIL import Image

_JPEG_MAGIC = b"\xff\xd8"

JPEG_QUALITY = 90  # for re-encoded shards: visually lossless at ~1/3 the bytes of quality 100
MIN_INPUT_SIZE = 63  # the smallest square AlexNet's conv/pool stack accepts (pipeline.model)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # source images: preparation and inference, any case
SOURCE_FORMATS = ("JPEG", "PNG", "WEBP")  # the only decoders a source file reaches (not EPS, PSD, TIFF, ...)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # larger source images are listed, not decoded (Pillow's threshold, 89.5 M)
# What decoding one image may take: its pixels as decoded, and the RGB copy preprocessing works on
# (44 M RGB pixels, e.g. 7,700 × 5,800). A JPEG is decoded at a reduced scale first (draft), so
# only PNG and WebP, decoded whole, come near it.
MAX_DECODE_BYTES = 256 * 2**20
# What other formats' files start with, to name them in the file's error.
_MAGIC = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"GIF8": "GIF", b"BM": "BMP", b"%!PS": "PostScript/EPS",
          b"\xc5\xd0\xd3\xc6": "EPS", b"8BPS": "PSD", b"\x00\x00\x01\x00": "ICO", b"%PDF": "PDF"}  # fmt: skip


class UnsupportedImage(ValueError):
    """An image this project does not decode: another format, more pixels than MAX_PIXELS, or more
    memory to decode than MAX_DECODE_BYTES."""


class ImageTooLarge(UnsupportedImage):
    """An image over MAX_PIXELS or MAX_DECODE_BYTES (the endpoint answers 413 for it, 415 for a format)."""


def check_decodable(width: int, height: int, bands: int) -> None:
    """UnsupportedImage when an image of this size would exceed the pixel limit or the decoding budget."""
    pixels = width * height
    if pixels > MAX_PIXELS:
        raise ImageTooLarge(f"{pixels:,} pixels, over the {MAX_PIXELS:,}-pixel limit for a source image")
    needed = pixels * bands + pixels * 3
    if needed > MAX_DECODE_BYTES:
        raise ImageTooLarge(
            f"a {width}×{height} image takes {needed / 2**20:,.0f} MiB to decode, over the "
            f"{MAX_DECODE_BYTES / 2**20:.0f} MiB budget for one image"
        )


# JPEG frame headers (start of frame, any coding): they hold the image's size and components.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, read without decoding; None if none."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            if i + 10 > n:
                return None
            height, width = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height, data[i + 9]
        if marker == 0xDA:  # the scan starts before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def describe_undecodable(exc: Exception, data: bytes) -> str:
    """Why a source file gives no image: what reports and prediction rows say about it."""
    if not data:
        return "empty file (0 bytes)"
    return f"cannot decode: {type(exc).__name__}: {exc}"


def square_image(image: Image.Image, size: int) -> Image.Image:
    """RGB, short side resized to `size` (antialiased bicubic), centre-cropped to size×size."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_square(data: bytes, size: int) -> Image.Image:
    """Source file bytes (JPEG, PNG or WebP; any colour mode) → the RGB size×size square.

    A JPEG at least twice the target size is decoded at a reduced DCT scale (1/2, 1/4, 1/8; never
    below `size` on the short side) before the antialiased resize: the same result to the eye,
    several times faster on large photos. A truncated or undecodable file raises; so do another
    format (UnsupportedImage, naming it: no other decoder is reached) and an image over
    MAX_PIXELS or one that would take more than MAX_DECODE_BYTES to decode (refused from its
    header, before any pixel is decoded).
    """
    _refuse_other_formats(data)
    try:
        with warnings.catch_warnings():  # Pillow only warns between its limit and twice it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=SOURCE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(size[1]):,} pixels" if size else "too many pixels"
        raise ImageTooLarge(f"{pixels}, over the {MAX_PIXELS:,}-pixel limit for a source image") from None
    with opened as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # the size below is the reduced one
        check_decodable(*image.size, len(image.getbands()))
        check_resizable(*image.size, size)
        return square_image(image, size)


def check_resizable(width: int, height: int, size: int) -> None:
    """ImageTooLarge when resizing the short side to `size` would take more than MAX_DECODE_BYTES: a
    thin strip (a few pixels by millions, a small file) grows by its aspect ratio."""
    scale = size / min(width, height)
    needed = max(size, round(width * scale)) * max(size, round(height * scale)) * 3
    if needed > MAX_DECODE_BYTES:
        raise ImageTooLarge(
            f"a {width}×{height} image takes {needed / 2**20:,.0f} MiB at {size} px on its short side, over the "
            f"{MAX_DECODE_BYTES / 2**20:.0f} MiB budget for one image"
        )


def source_views(data: bytes, size: int, crop: int, ten: bool = False) -> np.ndarray:
    """Source file bytes → its test views, (views, crop, crop, 3) uint8: the size×size square's centre
    crop, or with `ten` the paper's ten views. What batch inference and the endpoint score."""
    square = np.asarray(load_square(data, size))
    return ten_crop(square, crop) if ten else center_crop(square, crop)[None]


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Stored image bytes → HWC uint8 RGB.

    JPEGs (every shard image) go through torchvision's libjpeg-turbo decoder straight into a
    CHW tensor, returned as an HWC view of it: the same pixels as PIL (bit for bit), without
    PIL's extra copies, 1.7× faster per core in the training pipeline (benchmarks/NOTES.md).
    Anything else, or a JPEG torchvision refuses, goes through PIL, and only for the formats a
    source may have. Either way an image over the pixel limit or the decoding budget is refused
    from its header (shards are data too: whoever can write them could plant a decompression bomb).
    """
    if data[:2] == _JPEG_MAGIC:
        check_stored_jpeg(data)
        # Imported here: preparation (PIL only) and the jobs' start-up need no torch (seconds per process).
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # writable: a copy of a few KB
            return decode_jpeg(encoded, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
        except RuntimeError:
            pass
    with _open_checked(data) as image:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _refuse_other_formats(data: bytes) -> None:
    kind = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)
    if kind:
        raise UnsupportedImage(f"a {kind} file, not a JPEG, PNG or WebP image")


def check_stored_jpeg(data: bytes) -> None:
    """UnsupportedImage unless a stored JPEG's frame header is readable and within the limits. Shards
    hold JPEGs this project re-encoded (plain headers): one that is not is a damaged or foreign shard."""
    if data[:2] != _JPEG_MAGIC:
        return  # not a JPEG: whoever decodes it checks it (decode's PIL path)
    size = jpeg_size(data)
    if size is None:
        raise UnsupportedImage("a JPEG without a readable frame header: the shard is damaged; prepare it again")
    check_decodable(*size)


def _open_checked(data: bytes) -> Image.Image:
    """PIL's image of `data`, header read only: a source format, within the pixel limit and decoding budget."""
    _refuse_other_formats(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=SOURCE_FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ImageTooLarge(f"over the {MAX_PIXELS:,}-pixel limit for an image") from None
    check_decodable(*image.size, len(image.getbands()))
    return image


def center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    h, w = image.shape[:2]
    _check_fits(h, w, crop)
    top, left = (h - crop) // 2, (w - crop) // 2
    return image[top : top + crop, left : left + crop]


def ten_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """The paper's test views: four corner crops and the centre crop, then their mirror images.

    Shape (10, crop, crop, 3), in torchvision's ``ten_crop`` order: top-left, top-right,
    bottom-left, bottom-right, centre, then the same five flipped horizontally.
    """
    h, w = image.shape[:2]
    _check_fits(h, w, crop)
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop)]
    views = [image[t : t + crop, left : left + crop] for t, left in corners] + [center_crop(image, crop)]
    return np.stack(views + [v[:, ::-1] for v in views])


def random_crop_flip(image: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    _check_fits(h, w, crop)
    top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    out = image[top : top + crop, left : left + crop]
    return out[:, ::-1] if rng.random() < 0.5 else out


def train_batch(batch: dict[str, np.ndarray], crop: int, seed: int | None = None) -> dict[str, np.ndarray]:
    """Decode, random crop, random flip, and shuffle the rows of the batch.

    The row shuffle complements the per-epoch file shuffle of the reader: shards are written with
    classes mixed, so file order × in-batch order gives every epoch a fresh sample order without
    a shuffle buffer's copies. With a `seed`, the randomness is a function of the seed, the epoch
    (the dataset's execution) and the block's contents: the same every run, new every epoch.
    """
    rng = _block_rng(batch, seed)
    order = rng.permutation(len(batch["label"]))
    # Each crop goes straight into the batch while its decoded image is still in cache: stacking
    # a list of crops afterwards keeps every decoded image alive and was ~27% slower per core.
    images = np.empty((len(order), crop, crop, 3), dtype=np.uint8)
    for row, i in enumerate(order):
        images[row] = random_crop_flip(decode(batch["image"][i]), crop, rng)
    return {"image": images, "label": batch["label"][order].astype(np.int64)}


def shuffle_rows(batch: dict[str, np.ndarray], seed: int | None = None) -> dict[str, np.ndarray]:
    """``train_batch`` without the decode (``--decode-on train``): the block's rows shuffled alike,
    the stored JPEG bytes shipped as they are; the train worker decodes, crops and flips."""
    order = _block_rng(batch, seed).permutation(len(batch["label"]))
    return {"image": batch["image"][order], "label": batch["label"][order].astype(np.int64)}


def stored_bytes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``eval_batch`` without the decode (``--decode-on train``): the stored JPEG bytes and labels."""
    return {"image": batch["image"], "label": batch["label"].astype(np.int64)}


def eval_batch(batch: dict[str, np.ndarray], crop: int) -> dict[str, np.ndarray]:
    images = np.empty((len(batch["image"]), crop, crop, 3), dtype=np.uint8)
    for row, data in enumerate(batch["image"]):
        images[row] = center_crop(decode(data), crop)
    return {"image": images, "label": batch["label"].astype(np.int64)}


def ten_crop_batch(batch: dict[str, np.ndarray], crop: int) -> dict[str, np.ndarray]:
    """Decode stored squares into their ten test views: image (n, 10, crop, crop, 3) uint8."""
    images = np.stack([ten_crop(decode(data), crop) for data in batch["image"]])
    return {"image": images, "label": batch["label"].astype(np.int64)}


def batch_rng(batch: dict[str, np.ndarray], seed: int | None, execution: int) -> np.random.Generator:
    """The random crops' and flips' generator for a block or batch: a function of the seed, the
    epoch (`execution`, from 0) and what the batch holds; fresh randomness without a seed."""
    return np.random.default_rng(None if seed is None else [seed, execution, _fingerprint(batch)])


def _block_rng(batch: dict[str, np.ndarray], seed: int | None) -> np.random.Generator:
    return batch_rng(batch, seed, _execution_index() if seed is not None else 0)


def _fingerprint(batch: dict[str, np.ndarray]) -> int:
    """Which block this is, from what it holds: its labels and the start of its first image."""
    first = bytes(batch["image"][0][:4096]) if len(batch["image"]) else b""
    return zlib.crc32(first, zlib.crc32(batch["label"].tobytes()))


def _execution_index() -> int:
    """Which execution of its dataset this task serves: under Ray Train, the epoch (from 0).

    Ray Data counts the executions of each dataset; RandomSeedConfig reads the count from the
    task's own DataContext (Ray 2.60), as FileShuffleConfig does for the per-epoch file order.
    """
    from ray.data import DataContext, RandomSeedConfig

    seed = RandomSeedConfig(seed=0, reseed_after_execution=True).get_seed_tuple(data_context=DataContext.get_current())
    return seed.execution_idx or 0


def _check_fits(h: int, w: int, crop: int) -> None:
    if h < crop or w < crop:
        raise ValueError(f"a {crop}-pixel crop does not fit a {w}×{h} image; prepare shards at --size >= {crop}")
