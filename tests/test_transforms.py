import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.transforms import (
    ImageTooLarge,
    UnsupportedImage,
    center_crop,
    decode,
    describe_undecodable,
    encode_jpeg,
    eval_batch,
    load_square,
    random_crop_flip,
    square_image,
    train_batch,
)


def _bands(w, h):
    """Three vertical bands, red | green | blue, so crops and flips are visible."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, : w // 3, 0] = 255
    a[:, w // 3 : 2 * w // 3, 1] = 255
    a[:, 2 * w // 3 :, 2] = 255
    return a


def test_square_image_resizes_the_short_side_and_takes_the_centre():
    out = square_image(Image.fromarray(_bands(300, 100)), 72)
    assert out.size == (72, 72) and out.mode == "RGB"
    a = np.asarray(out)
    assert (a[:, 36, 1] > 200).all() and (a[:, 36, 0] < 50).all()  # the green centre band survives
    assert square_image(Image.fromarray(_bands(100, 300)), 72).size == (72, 72)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_every_pil_mode_becomes_rgb(mode):
    image = Image.fromarray(_bands(90, 80)).convert(mode)
    assert square_image(image, 64).mode == "RGB"


def test_decode_reads_grayscale_jpegs_as_rgb():
    data = encode_jpeg(Image.fromarray(_bands(80, 80)).convert("L"))
    assert decode(data).shape == (80, 80, 3)


def test_random_crop_is_a_window_of_the_image_or_its_mirror():
    image = np.random.default_rng(0).integers(0, 256, (72, 72, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    flips = set()
    for _ in range(40):
        crop = random_crop_flip(image, 64, rng)
        assert crop.shape == (64, 64, 3)
        found = [
            (flipped, top, left)
            for flipped, src in ((False, image), (True, image[:, ::-1]))
            for top in range(9)
            for left in range(9)
            if np.array_equal(src[top : top + 64, left : left + 64], crop)
        ]
        assert found
        flips.add(found[0][0])
    assert flips == {False, True}


def test_center_crop_is_exact():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    np.testing.assert_array_equal(center_crop(image, 6), image[2:8, 3:9])


def test_a_crop_larger_than_the_image_names_the_fix():
    with pytest.raises(ValueError, match="--size >= 80"):
        center_crop(np.zeros((72, 72, 3), np.uint8), 80)


def test_batches_are_uint8_nhwc_with_int64_labels():
    jpegs = [encode_jpeg(Image.fromarray(_bands(72, 72))) for _ in range(5)]
    batch = {"image": np.array(jpegs, dtype=object), "label": np.arange(5, dtype=np.int32)}
    for fn in (train_batch, eval_batch):
        out = fn(batch, crop=64)
        assert out["image"].shape == (5, 64, 64, 3) and out["image"].dtype == np.uint8
        assert out["label"].dtype == np.int64
    assert sorted(train_batch(batch, crop=64)["label"]) == list(range(5))  # shuffled, none lost
    expected = center_crop(np.asarray(Image.open(io.BytesIO(jpegs[0]))), 64)
    np.testing.assert_array_equal(eval_batch(batch, crop=64)["image"][0], expected)


def _encoded(fmt: str, size=(80, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """The first chunk of a PNG claiming width×height pixels: all Pillow reads before decoding."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_source_images_are_jpeg_png_or_webp(fmt):
    assert load_square(_encoded(fmt), 32).size == (32, 32)


@pytest.mark.parametrize("fmt, named", [("TIFF", "TIFF"), ("GIF", "GIF"), ("BMP", "BMP"), ("PDF", "PDF")])
def test_other_formats_behind_an_image_name_are_refused_naming_their_format(fmt, named):
    data = _encoded(fmt)
    with pytest.raises(UnsupportedImage, match=f"a {named} file, not a JPEG, PNG or WebP image") as refused:
        load_square(data, 32)
    assert describe_undecodable(refused.value, data).startswith("cannot decode: UnsupportedImage: a ")


def test_a_format_without_a_known_signature_never_reaches_its_decoder():
    # An ICNS file (Pillow can read it): not in the signature table, refused by Pillow's format list.
    data = _encoded("ICNS", (64, 64))
    with pytest.raises(Exception, match="cannot identify image file"):
        load_square(data, 32)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header():
    for side in (10_000, 20_000):  # above Pillow's warning threshold, and above its error threshold
        with pytest.raises(UnsupportedImage, match=f"{side * side:,} pixels, over the 89,478,485-pixel limit"):
            load_square(_png_header(side, side), 32)  # 0.3 and 1.2 GB of pixels if decoded: never allocated


def test_a_png_within_the_pixel_limit_but_too_big_to_decode_is_refused_from_its_header(tmp_path):
    """9400×9400 pixels is under Pillow's limit; decoding it whole took 709 MiB. Refused, read only to its header."""
    big = tmp_path / "big.png"
    Image.new("RGB", (9400, 9400)).save(big, "PNG")  # a few hundred KiB on disk
    probe = (
        "import resource, sys; from pathlib import Path; from pipeline.data.transforms import load_square\n"
        "data = Path(sys.argv[1]).read_bytes(); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_square(data, 256)\nexcept ValueError as exc:\n    print(exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(big)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    message, grown_mib = proc.stdout.strip().splitlines()
    assert message == "a 9400×9400 image takes 506 MiB to decode, over the 256 MiB budget for one image", message
    assert int(grown_mib) < 32, grown_mib  # nothing was decoded


def test_a_thin_strip_that_would_grow_past_the_budget_when_resized_is_refused_before_the_resize():
    """4×4,000,000 RGB pixels decode within the budget (92 MiB); their short side at 256 px would make
    256×256,000,000 of them."""
    with pytest.raises(ImageTooLarge, match=r"a 4×4000000 image takes 187,500 MiB at 256 px on its short side"):
        load_square(_png_header(4, 4_000_000), 256)
    assert load_square(_encoded("PNG", (40, 400)), 32).size == (32, 32)  # an ordinary tall image still fits


def test_stored_images_meet_the_same_format_list_and_limits_as_source_images():
    """Shards are data too: whoever can write them must not reach other decoders or plant a bomb."""
    with pytest.raises(UnsupportedImage, match="a TIFF file, not a JPEG, PNG or WebP image"):
        decode(_encoded("TIFF"))
    small = _encoded("JPEG", (16, 16))
    sof = next(i for i in range(2, len(small)) if small[i] == 0xFF and small[i + 1] == 0xC0)
    huge = small[: sof + 5] + (20_000).to_bytes(2, "big") * 2 + small[sof + 9 :]  # the frame header says 20000×20000
    with pytest.raises(UnsupportedImage, match="400,000,000 pixels, over the 89,478,485-pixel limit"):
        decode(huge)
    assert decode(small).shape == (16, 16, 3)
