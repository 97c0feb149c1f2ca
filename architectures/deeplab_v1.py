"""DeepLab v1 (DeepLab-LargeFOV and DeepLab-7x7): atrous VGG16 with output stride 8.

Paper: Liang-Chieh Chen, George Papandreou, Iasonas Kokkinos, Kevin Murphy, Alan L. Yuille,
"Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015,
arXiv:1412.7062.
Official code (Caffe): https://bitbucket.org/deeplab/deeplab-public, models and prototxts at
http://liangchiehchen.com/projects/DeepLab_Models.html (the LargeFOV ``test.prototxt`` is also
redistributed in github.com/TheLegendAli/DeepLab-Context, ``config/DeepLab-LargeFOV``).

What the network is (paper §3.1, Table 2; official LargeFOV prototxt):
- VGG16 whose pool1..pool3 are 3×3/stride 2/pad 1 and pool4, pool5 3×3/stride 1/pad 1, with the
  conv5 block dilated by 2 ("hole" 2): output stride 8 (``backbones.VGG16(dilate_last=True)``).
- ``pool5a``: a 3×3/stride 1/pad 1 average pooling after pool5 (official LargeFOV prototxt; it has
  no parameters and the paper does not mention it; ``pool5a=False`` removes it).
- LargeFOV (default, ``fov="large"``): fc6 3×3 with dilation 12 and 1024 channels, ReLU,
  dropout 0.5; fc7 1×1 1024, ReLU, dropout 0.5; fc8 1×1 → K. 20.5M parameters with K = 21
  (Table 2 counts every weight and bias of the network, VGG16 convolutions included:
  14.71M + fc6 4.72M + fc7 1.05M + fc8 0.02M).
- DeepLab-CRF-7x7 (``fov="7x7"``): fc6 7×7 with dilation 4 and 4096 channels, fc7 1×1 4096
  (Table 2: 134.3M parameters).
- The logits (stride 8) are upsampled bilinearly to the input size (the prototxt's ``INTERP``
  layer, zoom factor 8; the paper trains against 8× subsampled labels instead, see below).

The fully connected CRF of the paper is a post-processing step outside the module:
``segplatform.crf.dense_crf`` (defaults: the official LargeFOV VOC values).

Knobs that are not the paper's (off by default), for training the tiny network from scratch on
small crops:
- ``fc6_rate``: fc6's dilation instead of the variant's (12 LargeFOV, 4 7x7). On a 96 px crop
  the stride-8 map is 12×12 and a rate-12 3×3 kernel reads only zero padding off its centre
  tap: fc6 is a 1×1 convolution there. ``fc6_rate=2`` is 12 scaled as DeepLab v2's tiny rates
  (1, 2, 3, 4) are scaled from (6, 12, 18, 24).
- ``backbone_norm=True``: VGG16-BN (a BN after each of the 13 convolutions, torchvision's
  ``vgg16_bn`` layout; SegNet's encoder) instead of VGG16. The paper fine-tunes an ImageNet
  VGG16; trained from random weights the 13 plain convolutions stall. Not with
  ``pretrained_backbone`` (a plain VGG16 state dict).
  Measured (tiny config on ``digits-scenes`` 96×96 crops, AdamW 1e-3, batch 8, 400 iterations,
  one plain PyTorch loop, val mIoU; the majority baseline is 0.085): the tiny defaults (fc
  width 32, dropout 0.5, rate 12, pool5a) predict background everywhere (0.085, also at 1000
  iterations, with or without ``backbone_norm``); with ``backbone_norm``, ``fc6_rate=2``,
  ``fc_channels=256``, ``dropout=0`` and no ``pool5a`` 0.18-0.22; leaving any one of the four
  head changes out of that went back to 0.085-0.13, and the same head without
  ``backbone_norm`` stayed at 0.085. The head on the tiny ResNet (DeepLab v2's backbone)
  predicted background everywhere with the tiny defaults too and learned (0.21 at 160
  iterations) with fc width 256, no dropout, rate 2 and no pool5a.

Deviations from the paper:
- fc6/fc7 are randomly initialised (Kaiming); the paper initialises them by subsampling VGG16's
  fully connected layers (4096→1024 channels, 7×7→3×3 spatially). ``pretrained_backbone`` loads
  the thirteen convolutions from a torchvision VGG16 state dict only. fc8 is N(0, 0.01), bias 0,
  as in the prototxt.
- The loss is computed at input resolution on upsampled logits (the platform's contract); the
  paper subsamples the ground truth by 8 during training.
- Pooling rounds down (PyTorch) where Caffe rounds up; since the logits are resized to the
  input, only the alignment of odd sizes differs by at most one stride-8 cell.
- Bilinear upsampling uses ``align_corners=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from architectures.backbones import VGG16, load_pretrained

__all__ = ["DeepLabV1", "DeepLabV1Config"]

# backbone name -> VGG16 width divisor ("vgg16_tiny" is the same network at 1/8 of the width).
_VGG_BACKBONES: dict[str, int] = {"vgg16": 1, "vgg16_tiny": 8}

# fov -> (fc6 kernel, fc6 dilation, default fc6/fc7 width): Table 2 of the paper.
_FOV_VARIANTS: dict[str, tuple[int, int, int]] = {
    "large": (3, 12, 1024),
    "7x7": (7, 4, 4096),
}


@dataclass(frozen=True)
class DeepLabV1Config:
    """DeepLab v1; defaults are DeepLab-LargeFOV on PASCAL VOC (21 classes)."""

    num_classes: int = 21  # K: output channels of fc8
    in_channels: int = 3  # image channels (3 = RGB)
    backbone: str = "vgg16"  # "vgg16" or "vgg16_tiny" (1/8 width, for tests)
    fov: str = "large"  # "large" (fc6 3×3 rate 12) or "7x7" (fc6 7×7 rate 4), paper Table 2
    fc_channels: int | None = None  # fc6/fc7 width; None = the variant's (1024 large, 4096 7x7)
    dropout: float = 0.5  # dropout after fc6 and fc7 (prototxt drop6/drop7)
    pool5a: bool = True  # 3×3 stride-1 average pool after pool5 (official LargeFOV prototxt)
    fc6_rate: int | None = None  # fc6 dilation; None = the variant's (12 large, 4 7x7), Table 2
    backbone_norm: bool = False  # VGG16-BN backbone (not in the paper; for training from scratch)
    pretrained_backbone: str | None = None  # path/URI of a torchvision VGG16 state dict

    def __post_init__(self) -> None:
        _check_positive_int(self, "num_classes")
        _check_positive_int(self, "in_channels")
        if self.backbone not in _VGG_BACKBONES:
            raise ValueError(
                f"DeepLabV1Config.backbone: {self.backbone!r} is not one of "
                f"{sorted(_VGG_BACKBONES)}"
            )
        if self.fov not in _FOV_VARIANTS:
            raise ValueError(
                f"DeepLabV1Config.fov: {self.fov!r} is not one of {sorted(_FOV_VARIANTS)}"
            )
        if self.fc_channels is not None:
            _check_positive_int(self, "fc_channels")
        if self.fc6_rate is not None:
            _check_positive_int(self, "fc6_rate")
        if self.backbone_norm and self.pretrained_backbone:
            raise ValueError(
                "DeepLabV1Config.backbone_norm: the pretrained backbone is a plain VGG16 "
                "state dict; backbone_norm=True builds VGG16-BN, whose layers do not match"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DeepLabV1Config.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def tiny(cls, **overrides: Any) -> DeepLabV1Config:
        """A small CPU configuration: VGG16 at 1/8 width, 32-channel fc6/fc7."""
        params: dict[str, Any] = {"backbone": "vgg16_tiny", "fc_channels": 32}
        params.update(overrides)
        return cls(**params)


def _check_positive_int(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


class DeepLabV1(nn.Module):
    """DeepLab v1 (paper §3, Table 2): atrous VGG16 + fc6/fc7/fc8, logits upsampled to input.

    ``forward(images (N, C, H, W)) -> {"out": (N, K, H, W)}``; there are no auxiliary outputs.
    """

    def __init__(self, config: DeepLabV1Config) -> None:
        super().__init__()
        self.config = config
        self.backbone = VGG16(
            batch_norm=config.backbone_norm,
            dilate_last=True,
            in_channels=config.in_channels,
            width_divisor=_VGG_BACKBONES[config.backbone],
        )
        kernel, dilation, default_width = _FOV_VARIANTS[config.fov]
        dilation = config.fc6_rate or dilation
        width = config.fc_channels or default_width
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1) if config.pool5a else nn.Identity()
        padding = dilation * (kernel - 1) // 2
        self.fc6 = nn.Conv2d(
            self.backbone.out_channels, width, kernel, padding=padding, dilation=dilation
        )
        self.fc7 = nn.Conv2d(width, width, 1)
        self.fc8 = nn.Conv2d(width, config.num_classes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(config.dropout)  # element-wise, as Caffe's DROPOUT
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)
        if config.pretrained_backbone:
            load_pretrained(self.backbone, config.pretrained_backbone)

    def loss_weights(self) -> dict[str, float]:
        """Weights of the outputs returned in training: only ``"out"``."""
        return {"out": 1.0}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        size = images.shape[-2:]
        x = self.backbone(images)["pool5"]  # (N, 512, H/8, W/8)
        x = self.pool5a(x)  # (N, 512, H/8, W/8)
        x = self.dropout(self.relu(self.fc6(x)))  # (N, 1024, H/8, W/8)
        x = self.dropout(self.relu(self.fc7(x)))  # (N, 1024, H/8, W/8)
        x = self.fc8(x)  # (N, K, H/8, W/8)
        out = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (N, K, H, W)
        return {"out": out}
