"""DeepLab v2: atrous ResNet-101 (or VGG16) with ASPP-L and optional multi-scale inputs.

Paper: Liang-Chieh Chen, George Papandreou, Iasonas Kokkinos, Kevin Murphy, Alan L. Yuille,
"DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully
Connected CRFs", IEEE TPAMI 40(4), 2018, arXiv:1606.00915.
Official code (Caffe): https://bitbucket.org/aquariusjay/deeplab-public-ver2; prototxts and
models at http://liangchiehchen.com/projects/DeepLabv2_resnet.html and ``DeepLabv2_vgg.html``.

What the network is:
- ResNet-101 (default) with atrous convolution and output stride 8 (§3.1, §4.1): layer3 dilated
  by 2, layer4 by 4. ``backbone`` also takes ``resnet50``/``resnet152`` and the smaller
  ``resnet18``/``resnet34`` (basic units, 512 channels into ASPP; not in the paper); the ASPP
  branches read the width the backbone reports.
- ASPP-L (§3.2, Fig. 4, Table 3): parallel 3×3 atrous branches with rates (6, 12, 18, 24) whose
  class scores are **summed**. In the ResNet prototxt each branch is a single 3×3 dilated
  convolution 2048 → K (``fc1_voc12_c0..c3``, with bias, N(0, 0.01) init); in the VGG16 variant
  (``backbone="vgg16"``, on DeepLab v1's stride-8 VGG16) each branch is fc6 (3×3 dilated, 1024),
  ReLU, dropout 0.5, fc7 (1×1, 1024), ReLU, dropout 0.5, fc8 (1×1, K), Fig. 7.
- Multi-scale inputs (§4.1 "MSC"): the image is also fed at scales 0.75 and 0.5 through the same
  weights; each scale's logits are resized to the size of the largest scale's logits (the
  full-scale logits for the paper's scales) and fused by a per-position **max**. Off by default
  (``scales=(1.0,)``); the paper's setting is ``scales=(1.0, 0.75, 0.5)``. During training the
  paper sums the cross-entropy of every scale and of the fused output, so in training mode (and
  only with more than one scale) the model also returns each scale's logits as
  ``"aux_scale_<s>"`` (e.g. ``"aux_scale_0.75"``), upsampled to the input size;
  ``loss_weights()`` gives each ``scale_loss_weight`` (1.0: the paper's plain sum). Input sizes
  at scale ``s`` follow the official code: ``int((size - 1) * s + 1)``.
- Logits are upsampled bilinearly to the input size.

The fully connected CRF is post-processing outside the module (``segplatform.crf``; use
``CRFParams.deeplab_v2_resnet101()`` for this model's official VOC kernel parameters).

Deviations from the paper:
- The ResNet is torchvision's (stride on the 3×3 convolution of a bottleneck, "ResNet v1.5"); the
  Caffe ResNet-101 strides the first 1×1. The parameter count is identical. In torchvision's
  dilated ResNet the first unit of a dilated stage keeps the previous stage's rate.
- BatchNorm is ordinary trainable BN; the paper keeps the ImageNet BN statistics and affine
  parameters frozen (a training-loop choice: freeze them there if wanted).
- The loss is taken at input resolution on upsampled logits; the paper subsamples the labels by 8.
- The VGG16 variant's fc6/fc7 are randomly initialised (the paper initialises them from a
  subsampled VGG16 classifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures.backbones import RESNET_DEPTHS, VGG16, ResNet, load_pretrained

__all__ = ["ASPPSum", "DeepLabV2", "DeepLabV2Config", "VGGASPPBranch"]

# backbone name -> VGG16 width divisor ("vgg16_tiny" is VGG16 at 1/8 of the width, for tests).
_VGG_BACKBONES: dict[str, int] = {"vgg16": 1, "vgg16_tiny": 8}
_BACKBONES: tuple[str, ...] = (*RESNET_DEPTHS, *_VGG_BACKBONES)


@dataclass(frozen=True)
class DeepLabV2Config:
    """DeepLab v2; defaults are the paper's ResNet-101 ASPP-L model on PASCAL VOC (21 classes)."""

    num_classes: int = 21  # K: channels of every ASPP branch's output
    in_channels: int = 3  # image channels (3 = RGB)
    backbone: str = "resnet101"  # resnet18/34/50/101/152, resnet_tiny, vgg16 or vgg16_tiny
    pretrained_backbone: str | None = None  # path/URI of a torchvision ResNet/VGG16 state dict
    output_stride: int = 8  # 8 (paper) or 16 for ResNets; VGG16 is always 8
    atrous_rates: tuple[int, ...] = (6, 12, 18, 24)  # ASPP-L rates at stride 8 (Table 3)
    scales: tuple[float, ...] = (1.0,)  # input scales fused by max; paper MSC: (1.0, 0.75, 0.5)
    scale_loss_weight: float = 1.0  # weight of each per-scale output in training (MSC only)
    fc_channels: int = 1024  # width of fc6/fc7 in each VGG16 branch (unused for ResNets)
    dropout: float = 0.5  # dropout after fc6/fc7 in each VGG16 branch (unused for ResNets)

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("num_classes", "in_channels", "fc_channels"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
        if self.backbone not in _BACKBONES:
            raise ValueError(f"{name}.backbone: {self.backbone!r} is not one of {_BACKBONES}")
        allowed_strides = (8,) if self.backbone in _VGG_BACKBONES else (8, 16)
        if self.output_stride not in allowed_strides:
            raise ValueError(
                f"{name}.output_stride must be one of {allowed_strides} for backbone "
                f"{self.backbone!r}, got {self.output_stride!r}"
            )
        object.__setattr__(self, "atrous_rates", tuple(self.atrous_rates))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.atrous_rates or any(
            not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in self.atrous_rates
        ):
            raise ValueError(f"{name}.atrous_rates must be positive ints, got {self.atrous_rates}")
        if not self.scales or any(not 0.0 < s <= 4.0 for s in self.scales):
            raise ValueError(f"{name}.scales must be in (0, 4], got {self.scales}")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"{name}.scales must not repeat a scale, got {self.scales}")
        if self.scale_loss_weight < 0:
            raise ValueError(f"{name}.scale_loss_weight must be >= 0, got {self.scale_loss_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def tiny(cls, **overrides: Any) -> DeepLabV2Config:
        """A small CPU configuration: one-unit-per-stage ResNet, rates scaled to small inputs."""
        params: dict[str, Any] = {
            "backbone": "resnet_tiny",
            "atrous_rates": (1, 2, 3, 4),
            "fc_channels": 32,
        }
        params.update(overrides)
        return cls(**params)


def scaled_size(size: int, scale: float) -> int:
    """Side of an input resized by ``scale`` (the official code's ``(size - 1) * scale + 1``)."""
    return max(1, int((size - 1) * scale + 1))


def _scale_key(scale: float) -> str:
    return f"aux_scale_{scale:g}"


class VGGASPPBranch(nn.Sequential):
    """One ASPP-L branch of the VGG16 model (Fig. 7): fc6 3×3 atrous → fc7 1×1 → fc8 1×1 → K."""

    def __init__(
        self, in_channels: int, width: int, num_classes: int, rate: int, dropout: float
    ) -> None:
        fc6 = nn.Conv2d(in_channels, width, 3, padding=rate, dilation=rate)
        fc7 = nn.Conv2d(width, width, 1)
        fc8 = nn.Conv2d(width, num_classes, 1)
        for conv in (fc6, fc7):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(fc8.weight, std=0.01)
        nn.init.zeros_(fc8.bias)
        super().__init__(
            fc6,
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            fc7,
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            fc8,
        )


class ASPPSum(nn.Module):
    """ASPP-L (§3.2, Fig. 4b): parallel atrous branches on one feature map, scores summed.

    ``branches`` defaults to the ResNet model's single 3×3 atrous convolution to K per rate.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rates: tuple[int, ...],
        branches: list[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if branches is None:
            branches = []
            for rate in rates:
                conv = nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate)
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)
                branches.append(conv)
        self.branches = nn.ModuleList(branches)
        self.rates = tuple(rates)

    def forward(self, features: Tensor) -> Tensor:
        scores = self.branches[0](features)  # (N, K, h, w)
        for branch in self.branches[1:]:
            scores = scores + branch(features)  # (N, K, h, w)
        return scores


class DeepLabV2(nn.Module):
    """DeepLab v2 (TPAMI 2018): atrous backbone + ASPP-L, optional max-fused multi-scale inputs.

    ``forward(images (N, C, H, W)) -> {"out": (N, K, H, W)}``; in training mode with more than
    one scale also ``"aux_scale_<s>": (N, K, H, W)`` for every scale ``s`` (see the module
    docstring).
    """

    def __init__(self, config: DeepLabV2Config) -> None:
        super().__init__()
        self.config = config
        rates = config.atrous_rates
        self.backbone: nn.Module
        if config.backbone in _VGG_BACKBONES:
            self.backbone = VGG16(
                dilate_last=True,
                in_channels=config.in_channels,
                width_divisor=_VGG_BACKBONES[config.backbone],
            )
            self._feature_key = "pool5"
            in_channels = self.backbone.out_channels
            branches: list[nn.Module] | None = [
                VGGASPPBranch(
                    in_channels, config.fc_channels, config.num_classes, rate, config.dropout
                )
                for rate in rates
            ]
        else:
            self.backbone = ResNet(
                config.backbone,
                output_stride=config.output_stride,
                in_channels=config.in_channels,
            )
            self._feature_key = "layer4"
            in_channels = self.backbone.out_channels
            branches = None
        self.aspp = ASPPSum(in_channels, config.num_classes, rates, branches)
        if config.pretrained_backbone:
            load_pretrained(self.backbone, config.pretrained_backbone)

    def loss_weights(self) -> dict[str, float]:
        """``{"out": 1.0}`` plus each scale's output when multi-scale inputs are enabled."""
        weights = {"out": 1.0}
        if len(self.config.scales) > 1:
            for scale in self.config.scales:
                weights[_scale_key(scale)] = self.config.scale_loss_weight
        return weights

    def _logits(self, images: Tensor) -> Tensor:
        features = self.backbone(images)[self._feature_key]  # (N, C, H/8, W/8)
        return self.aspp(features)  # (N, K, H/8, W/8)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        height, width = images.shape[-2:]
        scales = self.config.scales
        if len(scales) == 1:
            if scales[0] != 1.0:
                images = F.interpolate(
                    images,
                    size=(scaled_size(height, scales[0]), scaled_size(width, scales[0])),
                    mode="bilinear",
                    align_corners=True,
                )  # (N, C, sH, sW)
            logits = self._logits(images)  # (N, K, sH/8, sW/8)
            out = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            return {"out": out}  # (N, K, H, W)

        per_scale: list[Tensor] = []
        for scale in scales:
            if scale == 1.0:
                scaled = images
            else:
                size = (scaled_size(height, scale), scaled_size(width, scale))
                scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
            per_scale.append(self._logits(scaled))  # (N, K, sH/8, sW/8)
        # Fuse at the logits size of the largest scale (full scale for the paper's scales, as in
        # the official code), then upsample the fused map to the input.
        largest = max(range(len(scales)), key=lambda i: per_scale[i].shape[-1])
        fuse_size = tuple(per_scale[largest].shape[-2:])
        resized = [
            logits
            if tuple(logits.shape[-2:]) == fuse_size
            else F.interpolate(logits, size=fuse_size, mode="bilinear", align_corners=True)
            for logits in per_scale
        ]  # each (N, K, h, w)
        fused = torch.stack(resized, dim=0).amax(dim=0)  # (N, K, h, w)
        out = F.interpolate(fused, size=(height, width), mode="bilinear", align_corners=False)
        result = {"out": out}  # (N, K, H, W)
        if self.training:
            for scale, logits in zip(scales, per_scale):
                result[_scale_key(scale)] = F.interpolate(
                    logits, size=(height, width), mode="bilinear", align_corners=False
                )  # (N, K, H, W)
        return result
