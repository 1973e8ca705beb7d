"""The float half of preprocessing, done on the train worker's device in one batched pass.

Batches arrive as uint8 NHWC (4× smaller than float32 on the wire and in the object store);
here they become float, get the paper's PCA colour augmentation and are normalised. The same
``to_float`` and ``normalize`` (pipeline.model) run inside the registered model, so serving cannot drift from
training.

With ``--decode-on train`` the batches arrive as the stored JPEG bytes instead, and
``decode_crops`` makes the uint8 NHWC crops on the device first: on a GPU with nvJPEG, the whole
batch at once, so that the CPU nodes only read and ship bytes; on a CPU with libjpeg-turbo, the
same pixels as the data path's decode. Importable without Ray or MLflow (benchmarks/gpu_check.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.data.stats import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, IMAGENET_STD
from pipeline.model import as_nchw, normalize, to_float


def lighting_shift(
    n: int,
    alpha_std: float,
    eigval: torch.Tensor,
    eigvec: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image RGB offsets Σ_i p_i·α_i·λ_i with α_i ~ N(0, alpha_std), shape (n, 3)."""
    alpha = torch.randn(n, 3, generator=generator, device=eigval.device) * alpha_std
    return (alpha * eigval) @ eigvec.T


class DeviceAugment:
    """uint8 NHWC batch → normalised float NCHW, with PCA lighting when ``alpha_std`` > 0.

    ``mean``/``std``/``eigval``/``eigvec`` default to the published ImageNet values; training
    passes the dataset's own (stats.json) when it has them.
    """

    def __init__(
        self,
        device: torch.device,
        alpha_std: float = 0.1,
        seed: int | None = None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eigval=IMAGENET_EIGVAL,
        eigvec=IMAGENET_EIGVEC,
    ) -> None:
        self.mean, self.std = as_nchw(mean, device), as_nchw(std, device)  # per channel, or a mean image
        self.eigval = torch.as_tensor(eigval, dtype=torch.float32, device=device)
        self.eigvec = torch.as_tensor(eigvec, dtype=torch.float32, device=device)
        self.alpha_std = alpha_std
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = to_float(images)
        if train and self.alpha_std > 0:
            shift = lighting_shift(len(x), self.alpha_std, self.eigval, self.eigvec, self.generator)
            x = x + shift[:, :, None, None]
        return normalize(x, self.mean, self.std)


def decode_crops(jpegs: Sequence[bytes], crop: int, device: torch.device, rng: np.random.Generator | None = None):
    """Stored JPEG bytes → uint8 NHWC crops on `device`, ready for DeviceAugment.

    With `rng` (training): a random crop and a random horizontal flip per image, drawn in the
    order and with the draws of the data path's ``random_crop_flip``, so one generator gives the
    same crops either way. Without (validation): the centre crop. A batch the device's decoder
    refuses is decoded image by image on the CPU (``transforms.decode``, which falls back to PIL).
    """
    images = _decode_all(jpegs, torch.device(device))
    views, flips = [], []
    for image in images:
        _, h, w = image.shape
        if h < crop or w < crop:
            raise ValueError(f"a {crop}-pixel crop does not fit a {w}×{h} image; prepare shards at --size >= {crop}")
        if rng is None:
            top, left, flip = (h - crop) // 2, (w - crop) // 2, False
        else:
            top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            flip = rng.random() < 0.5
        views.append(image[:, top : top + crop, left : left + crop])  # a view: no copy yet
        flips.append(flip)
    batch = torch.stack(views)  # (n, 3, crop, crop): one copy of every crop, whatever the source sizes
    if any(flips):
        mirrored = torch.tensor(flips, device=batch.device)[:, None, None, None]
        batch = torch.where(mirrored, batch.flip(3), batch)
    return batch.permute(0, 2, 3, 1).contiguous()  # NHWC, as the data path's batches arrive


def _decode_all(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """Every image as a uint8 CHW RGB tensor on `device`: one batched call of torchvision's decoder."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.data.transforms import check_stored_jpeg

    for data in jpegs:  # sizes from the headers: nothing over the limits reaches the decoder (or the GPU's memory)
        check_stored_jpeg(data)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]  # writable copies
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        from pipeline.data.transforms import decode

        return [torch.from_numpy(np.array(decode(data))).permute(2, 0, 1).to(device) for data in jpegs]
