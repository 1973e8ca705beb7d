"""AlexNet, single-column ("one weird trick") layout, as torchvision builds it.

Layer table (Krizhevsky 2014, torchvision ``alexnet``)::

    features.0    conv  3→64    k11 s4 p2   ReLU  [LRN]  maxpool 3/2
    features.3    conv  64→192  k5     p2   ReLU  [LRN]  maxpool 3/2
    features.6    conv  192→384 k3     p1   ReLU
    features.8    conv  384→256 k3     p1   ReLU
    features.10   conv  256→256 k3     p1   ReLU         maxpool 3/2
    avgpool       adaptive average pool to 6×6
    classifier.1  dropout 0.5, fc 9216→4096, ReLU
    classifier.4  dropout 0.5, fc 4096→4096, ReLU
    classifier.6  fc 4096→classes

``fc_width`` sets the width of fc6 and fc7 (4096 in the paper). They hold 54.5M of the 61.1M
parameters, so a narrow network (e.g. 64: 3.1M parameters, 12 MB of weights instead of 244 MB)
trains and moves around in a fraction of the time: for experiments and for tests whose subject
is the plumbing around the model rather than the model.

Parameter names and shapes equal torchvision's, so its weights load with ``strict=True``.
The paper's local response normalisation (``lrn=True``) sits inside the parameter-free block
that holds each of the first two ReLUs, so switching it on shifts no index.

``init="torchvision"`` keeps PyTorch's default initialisation (what torchvision does);
``init="paper"`` draws every weight from N(0, 0.01) and sets the biases of conv2, conv4, conv5,
fc6 and fc7 to ``paper_bias`` (1 in the paper; Caffe used 0.1 because 1 can stall learning),
the others to 0.

The smallest input this network accepts is 63×63 (three 3/2 max-pools after a stride-4 conv).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import INITS

LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0  # the paper's n, α, β, k
PAPER_FC_WIDTH = 4096  # fc6 and fc7

# Layers whose bias the paper initialises to a positive constant (its section 5).
_PAPER_POSITIVE_BIAS = ("features.3", "features.8", "features.10", "classifier.1", "classifier.4")


def _relu(lrn: bool) -> nn.Module:
    """ReLU, followed by the paper's LRN when asked; a parameter-free block either way."""
    if not lrn:
        return nn.ReLU(inplace=True)
    return nn.Sequential(nn.ReLU(inplace=True), nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K))


class AlexNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        lrn: bool = False,
        init: str = "torchvision",
        dropout: float = 0.5,
        paper_bias: float = 1.0,
        fc_width: int = PAPER_FC_WIDTH,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.num_classes, self.lrn, self.fc_width = num_classes, lrn, fc_width
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
            _relu(lrn),  # 1
            nn.MaxPool2d(kernel_size=3, stride=2),  # 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            _relu(lrn),  # 4
            nn.MaxPool2d(kernel_size=3, stride=2),  # 5
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(inplace=True),  # 7
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(inplace=True),  # 9
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(inplace=True),  # 11
            nn.MaxPool2d(kernel_size=3, stride=2),  # 12
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),  # 0
            nn.Linear(256 * 6 * 6, fc_width),  # 1
            nn.ReLU(inplace=True),  # 2
            nn.Dropout(p=dropout),  # 3
            nn.Linear(fc_width, fc_width),  # 4
            nn.ReLU(inplace=True),  # 5
            nn.Linear(fc_width, num_classes),  # 6
        )
        if init == "paper":
            self._paper_init(paper_bias)

    @classmethod
    def from_config(cls, num_classes: int, config: Mapping[str, Any]) -> AlexNet:
        """The network a training config describes (a TrainConfig as a dict, as checkpoints store it)."""
        return cls(
            num_classes, init=config["init"], dropout=config["dropout"], paper_bias=config["paper_bias"],
            **architecture(config),
        )  # fmt: skip

    def _paper_init(self, positive_bias: float) -> None:
        for name, module in self.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                nn.init.constant_(module.bias, positive_bias if name in _PAPER_POSITIVE_BIAS else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields that change the network's layers or shapes: what a checkpoint must match."""
    # Checkpoints from before fc_width existed have the paper's width.
    return {"lrn": config["lrn"], "fc_width": config.get("fc_width", PAPER_FC_WIDTH)}


# --- the registered model's own preprocessing: training's device augmentation (pipeline.data.device)
# runs the same two steps, so serving cannot drift from training ------------------------------------


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW in [0, 1]; the permute leaves it in channels_last memory."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def as_nchw(values, device: torch.device | None = None) -> torch.Tensor:
    """A per-channel (3,) or per-pixel (3, H, W) statistic, shaped to broadcast over NCHW batches."""
    # A copy: a mean image from Ray's object store is a read-only array, which torch will not share.
    t = torch.from_numpy(np.array(values, dtype=np.float32)).to(device)
    return t.reshape(1, 3, *(t.shape[1:] or (1, 1)))


class ImageClassifier(nn.Module):
    """What gets registered: uint8 NHWC crops in, class logits out.

    Carries the normalisation as buffers so a served model needs only the CPU transform
    (decode, resize, centre crop) in front of it, the same one validation uses.
    """

    def __init__(self, net: AlexNet, mean, std) -> None:
        """`mean`/`std`: per channel (3,), or a (3, crop, crop) mean image with std 1 (the paper's)."""
        super().__init__()
        self.net = net
        self.register_buffer("mean", as_nchw(mean))
        self.register_buffer("std", as_nchw(std))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(to_float(images), self.mean, self.std))
