import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.transforms import (
    center_crop,
    decode,
    encode_jpeg,
    eval_batch,
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
