import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

from pipeline.data.device import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceAugment,
    decode_crops,
    lighting_shift,
)
from pipeline.model import to_float


def _images(n=4, size=8):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_pca_lighting_matches_a_float64_reference():
    """Each image gets Σ_i p_i·α_i·λ_i added to every pixel, p_i the i-th eigenvector (a column)."""
    n, std = 6, 0.1
    alpha = (torch.randn(n, 3, generator=torch.Generator().manual_seed(7)) * std).double().numpy()
    shift = lighting_shift(
        n, std, torch.tensor(IMAGENET_EIGVAL), torch.tensor(IMAGENET_EIGVEC), torch.Generator().manual_seed(7)
    )
    eigvec, eigval = np.array(IMAGENET_EIGVEC, dtype=np.float64), np.array(IMAGENET_EIGVAL, dtype=np.float64)
    expected = np.stack([sum(eigvec[:, i] * alpha[k, i] * eigval[i] for i in range(3)) for k in range(n)])
    np.testing.assert_allclose(shift.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_training_batch_is_lit_then_normalised_per_image():
    images = _images()
    augment = DeviceAugment(torch.device("cpu"), alpha_std=0.1, seed=3)
    out = augment(images, train=True)
    shift = lighting_shift(len(images), 0.1, augment.eigval, augment.eigvec, torch.Generator().manual_seed(3))
    x = images.permute(0, 3, 1, 2).double() / 255 + shift.double()[:, :, None, None]
    expected = (x - torch.tensor(IMAGENET_MEAN).double().view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).double().view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    # one offset per image and channel: constant over the pixels of a channel
    diff = out - augment(images, train=False)
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-5)


def test_eval_batch_is_torchvision_mean_std_normalisation():
    images = _images()
    out = DeviceAugment(torch.device("cpu"), alpha_std=0.1)(images, train=False)
    expected = torch.stack([TF.normalize(TF.to_tensor(img.numpy()), IMAGENET_MEAN, IMAGENET_STD) for img in images])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_uint8_nhwc_becomes_channels_last_float():
    x = to_float(_images())
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= x.min() and x.max() <= 1


def test_lighting_off_when_alpha_std_is_zero():
    images = _images()
    augment = DeviceAugment(torch.device("cpu"), alpha_std=0.0)
    torch.testing.assert_close(augment(images, train=True), augment(images, train=False))


def _jpegs(sizes, seed=0):
    import io

    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for w, h in sizes:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def test_decoding_on_the_device_draws_the_data_paths_crops_and_flips_from_the_same_generator():
    """One generator, one batch: the worker's crops are the data path's random_crop_flip(decode()), bit for bit."""
    from pipeline.data.transforms import decode, random_crop_flip

    jpegs = _jpegs([(72, 72)] * 6 + [(80, 96), (96, 72)])  # stored squares, and two of other shapes
    got = decode_crops(jpegs, 64, torch.device("cpu"), np.random.default_rng([5, 1]))
    rng = np.random.default_rng([5, 1])
    expected = np.stack([random_crop_flip(decode(data), 64, rng) for data in jpegs])
    assert got.shape == (8, 64, 64, 3) and got.dtype == torch.uint8 and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), expected)
    draws, flips = np.random.default_rng([5, 1]), []
    for w, h in [(72, 72)] * 6 + [(80, 96), (96, 72)]:
        draws.integers(0, h - 63), draws.integers(0, w - 63)
        flips.append(draws.random() < 0.5)
    assert any(flips) and not all(flips)  # both kinds are in the batch


def test_decoding_on_the_device_takes_the_centre_crop_without_a_generator_and_reads_what_its_decoder_refuses():
    from PIL import Image

    from pipeline.data.transforms import center_crop, decode

    jpegs = _jpegs([(72, 72), (90, 70)])
    png = io_bytes(Image.fromarray(np.full((70, 70, 3), 200, dtype=np.uint8)), "PNG")  # not a JPEG: PIL reads it
    got = decode_crops([*jpegs, png], 64, torch.device("cpu"))
    for image, data in zip(got.numpy(), [*jpegs, png], strict=True):
        np.testing.assert_array_equal(image, center_crop(decode(data), 64))
    with pytest.raises(ValueError, match="prepare shards at --size >= 80"):
        decode_crops(jpegs, 80, torch.device("cpu"))


def io_bytes(image, fmt):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
