"""PSPNet: a dilated ResNet with a pyramid pooling module.

Paper: Hengshuang Zhao, Jianping Shi, Xiaojuan Qi, Xiaogang Wang, Jiaya Jia, "Pyramid Scene Parsing
Network", CVPR 2017, arXiv:1612.01105 (https://arxiv.org/abs/1612.01105).
Official code: https://github.com/hszhao/PSPNet (Caffe; ``evaluation/prototxt/pspnet*.prototxt``)
and the authors' PyTorch reimplementation https://github.com/hszhao/semseg (``model/pspnet.py``).

Structure (paper §3.2–3.3, Fig. 3; semseg ``PPM``/``PSPNet``):
- ResNet with dilated layer3/layer4 (output stride 8: layer3 rate 2, layer4 rate 4).
- Pyramid pooling module on layer4 (C = 2048 channels; 512 for ResNet-18/34): for each bin size
  b, adaptive average pooling to b×b, 1×1 conv to ``C // len(bins)`` channels + BN + ReLU,
  bilinear upsampling to the feature size; the levels are concatenated with the features.
- Head: 3×3 conv 512 + BN + ReLU, dropout 0.1, 1×1 conv to K, bilinear upsampling to the input.
- Auxiliary head on layer3 (res4b22 in the paper, §4 "deep supervision"): 3×3 conv 256 + BN + ReLU,
  dropout 0.1, 1×1 conv to K; its loss is weighted 0.4 (``aux_weight``), training mode only.

Defaults: ResNet-101, the backbone of the paper's PASCAL VOC (82.6 test mIoU) and Cityscapes
(78.4 test) models and of the released ``pspnet101_VOC2012`` / ``pspnet101_cityscapes`` weights;
ResNet-50 (``backbone="resnet50"``) is the ADE20K ablation network of Tables 1–4 (41.68 val mIoU,
released as ``pspnet50_ADE20K``) and the "PSPNet-50" that ICNet compares against.
``resnet152`` and the smaller ``resnet18``/``resnet34`` (basic units, not in the paper; with
``deep_stem=True`` laid out as semseg's deep-base ``resnet18``/``resnet34``) are also accepted; the
pyramid, the head and the auxiliary head size themselves from the widths the backbone reports
(layer3 256 and layer4 512 channels for ResNet-18/34).

Deviations from the paper:
- Stem: torchvision's single 7×7 conv by default, so torchvision ImageNet weights load through
  ``pretrained_backbone``. ``deep_stem=True`` gives the official code's three 3×3 convs (64, 64,
  128); no ImageNet weights for that stem ship with torchvision.
- ResNet units are torchvision's (ResNet v1.5: the stride sits on the 3×3 conv; the Caffe ResNet
  of the official code strides the first 1×1 conv).
- Reduced width per pyramid level: ``C // len(bins)`` (floor), the semseg rule
  ``int(fea_dim / len(bins))``; semseg additionally requires ``C % len(bins) == 0``, here any bins
  tuple works (e.g. (1, 3, 6) gives 682 channels per level and 2048 + 3·682 = 4094 into the head).
- Pooling is adaptive (bins of the feature map); the Caffe prototxts use fixed kernel/stride pairs
  computed for 473×473 or 713×713 crops, which equal adaptive pooling at those sizes.
- Bilinear resizing uses ``align_corners=True`` (Caffe's Interp layer and semseg both align
  corners); the head's dropout is ``Dropout2d`` as in semseg (the Caffe model drops single units).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures.backbones import RESNET_DEPTHS, ResNet, load_pretrained

__all__ = ["PSPNet", "PSPNetConfig", "PyramidPoolingModule"]

_PSP_BACKBONES = tuple(RESNET_DEPTHS)


@dataclass(frozen=True)
class PSPNetConfig:
    """PSPNet hyperparameters; defaults are the paper's VOC/Cityscapes network."""

    num_classes: int = 21  # K output classes (PASCAL VOC 2012: 20 + background)
    in_channels: int = 3  # input image channels
    backbone: str = "resnet101"  # resnet18/34/50/101/152 or resnet_tiny (tests)
    pretrained_backbone: str | None = None  # path/URI of torchvision ResNet weights, or None
    output_stride: int = 8  # backbone output stride: 8 (paper) or 16
    bins: tuple[int, ...] = (1, 2, 3, 6)  # pyramid bin sizes (b×b pooled maps per level)
    deep_stem: bool = False  # official code's three 3×3 stem convs instead of torchvision's 7×7
    head_channels: int = 512  # width of the 3×3 conv after pyramid pooling (aux head: half)
    dropout: float = 0.1  # dropout before both classifiers
    aux_loss: bool = True  # auxiliary classifier on layer3 (training mode only)
    aux_weight: float = 0.4  # weight of the auxiliary loss (training code reads loss_weights())

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.backbone not in _PSP_BACKBONES:
            raise ValueError(f"backbone must be one of {_PSP_BACKBONES}, got {self.backbone!r}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride}")
        if not self.bins or any(not isinstance(b, int) or b < 1 for b in self.bins):
            raise ValueError(f"bins must be a non-empty tuple of positive ints, got {self.bins}")
        if len(set(self.bins)) != len(self.bins):
            raise ValueError(f"bins must not repeat a size, got {self.bins}")
        if self.head_channels < 2:
            raise ValueError(f"head_channels must be >= 2, got {self.head_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")

    @classmethod
    def tiny(cls, **overrides: Any) -> PSPNetConfig:
        """One-unit-per-stage ResNet and a 64-wide head, for CPU tests."""
        return replace(cls(backbone="resnet_tiny", head_channels=64), **overrides)


def _conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm_layer: Callable[..., nn.Module],
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPoolingModule(nn.Module):
    """Pyramid pooling module (paper §3.3, Fig. 3c).

    Each level: adaptive average pool to b×b, 1×1 conv to ``reduced_channels`` + BN + ReLU,
    bilinear upsampling to the input size. Output: ``concat(x, level_1, …, level_n)`` with
    ``in_channels + len(bins) * reduced_channels`` channels.
    """

    def __init__(
        self,
        in_channels: int,
        bins: Sequence[int],
        reduced_channels: int,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b), _conv_bn_relu(in_channels, reduced_channels, 1, norm_layer)
            )
            for b in bins
        )
        self.out_channels = in_channels + len(bins) * reduced_channels

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(level(x), size=size, mode="bilinear", align_corners=True)
            for level in self.levels  # each (N, C_r, h, w)
        ]
        return torch.cat([x, *pooled], dim=1)  # (N, C + n·C_r, h, w)


def _classifier(
    in_channels: int,
    mid_channels: int,
    num_classes: int,
    dropout: float,
    norm_layer: Callable[..., nn.Module],
) -> nn.Sequential:
    return nn.Sequential(
        _conv_bn_relu(in_channels, mid_channels, 3, norm_layer),
        nn.Dropout2d(dropout),
        nn.Conv2d(mid_channels, num_classes, 1),
    )


class PSPNet(nn.Module):
    """PSPNet (paper Fig. 3): dilated ResNet → pyramid pooling → 3×3 conv → 1×1 classifier."""

    def __init__(
        self, config: PSPNetConfig, *, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNet(
            config.backbone,
            output_stride=config.output_stride,
            in_channels=config.in_channels,
            norm_layer=norm_layer,
            deep_stem=config.deep_stem,
        )
        if config.pretrained_backbone:
            load_pretrained(self.backbone, config.pretrained_backbone)
        info = {f.name: f for f in self.backbone.feature_info}
        top = info["layer4"].channels
        self.ppm = PyramidPoolingModule(top, config.bins, top // len(config.bins), norm_layer)
        self.head = _classifier(
            self.ppm.out_channels,
            config.head_channels,
            config.num_classes,
            config.dropout,
            norm_layer,
        )
        self.aux_head = (
            _classifier(
                info["layer3"].channels,
                config.head_channels // 2,
                config.num_classes,
                config.dropout,
                norm_layer,
            )
            if config.aux_loss
            else None
        )

    def loss_weights(self) -> dict[str, float]:
        """Loss weight per output key returned in training mode."""
        weights = {"out": 1.0}
        if self.aux_head is not None:
            weights["aux"] = self.config.aux_weight
        return weights

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        pooled = self.ppm(features["layer4"])  # (N, C + n·C_r, H/os, W/os)
        logits = self.head(pooled)  # (N, K, H/os, W/os)
        out = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=True)}
        if self.training and self.aux_head is not None:
            aux = self.aux_head(features["layer3"])  # (N, K, H/os, W/os)
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=True)
        return out  # "out": (N, K, H, W)
