"""ICNet: an image cascade network for real-time semantic segmentation.

Paper: Hengshuang Zhao, Xiaojuan Qi, Xiaoyong Shen, Jianping Shi, Jiaya Jia, "ICNet for Real-Time
Semantic Segmentation on High-Resolution Images", ECCV 2018, arXiv:1704.08545
(https://arxiv.org/abs/1704.08545).
Official code: https://github.com/hszhao/ICNet (Caffe; the released Cityscapes network is
``evaluation/prototxt/icnet_cityscapes_bnnomerge.prototxt``, which this module follows layer by
layer).

Structure (paper §3.2–3.4, Fig. 2 and 3; prototxt layer names in brackets), for an H×W input:
- Half-resolution branch: the input downsampled ×2 [data_sub2] through a ResNet-50 trunk up to
  conv3_1: three-conv stem [conv1_1..conv1_3], 3×3 max-pool, layer1 [conv2_x] and the first unit of
  layer2 [conv3_1], stride 2 → features at H/16.
- Quarter-resolution branch: conv3_1's features downsampled ×2 [conv3_1_sub4] (H/32) through the
  rest of the ResNet-50 with dilation instead of striding: layer2's remaining units [conv3_2..4],
  layer3 at rate 2 [conv4_x], layer4 at rate 4 [conv5_x]; then pyramid pooling in the released
  model's form: each level is adaptive average pooling to b×b upsampled back and *summed* into the
  features [conv5_3_sum]; then a 1×1 conv + BN + ReLU to 256 channels (at width 0.5) [conv5_4_k1].
- Full-resolution branch: three 3×3 stride-2 conv + BN + ReLU (32, 32, 64 channels at width 0.5)
  [conv1_sub1..conv3_sub1] → H/8.
- Cascade feature fusion (CFF, Fig. 3): the low-resolution input upsampled ×2 → 3×3 conv rate 2 to
  128 + BN; the high-resolution input → 1×1 conv to 128 + BN; sum; ReLU. CFF(1/32 → 1/16)
  [conv_sub4 + conv3_1_sub2_proj = sub24_sum], CFF(1/16 → 1/8) [conv_sub2 + conv3_sub1_proj =
  sub12_sum].
- Output: sub12 upsampled ×2 → 1×1 classifier at H/4 [conv6_cls] → bilinear ×4 to H×W.
- Cascade label guidance (§3.4): each CFF has a 1×1 classifier on its upsampled low-resolution
  input.

Training outputs (``self.training`` only; eval returns just ``"out"``):
- ``"out"``: the H/4 logits bilinearly upsampled to (H, W) — the contract's main output.
- ``"aux_1_16"``: CFF(1/32→1/16) auxiliary logits on the upsampled 1/32 features,
  (N, K, H/16, W/16).
- ``"aux_1_8"``: CFF(1/16→1/8) auxiliary logits on the upsampled 1/16 features, (N, K, H/8, W/8).
- ``"aux_1_4"``: the final logits before upsampling, (N, K, H/4, W/4).
(Sizes are those of the branches, e.g. ceil-rounded for inputs not divisible by 32.)
The paper weights the 1/16, 1/8 and 1/4 losses λ1 = λ2 = 0.4, λ3 = 1 (``cascade_weights``).
``loss_weights()`` gives ``aux_1_16`` λ1, ``aux_1_8`` λ2 and ``out`` λ3 — "out" carries the 1/4 term
(the same logits, so the loss is taken at full label resolution) and ``aux_1_4`` gets weight 0 so
the term is not counted twice; training code that prefers the paper's 1/4-resolution labels can move
λ3 to ``aux_1_4``.

Widths (``width_multiplier``): the released model is the compressed network, "width 0.5"; every
trunk width is 0.5× ResNet-50's (stem 32/32/64, units 32→128 … 256→1024), as is the full-resolution
branch (32/32/64) and the 1×1 reduction after pyramid pooling (256). Width 1.0 doubles all of them
(stem 64/64/128 — PSPNet's deep ResNet-50 — units of torchvision's ResNet-50, full branch 64/64/128,
reduction 512). The CFF width (128) does not scale.

Published (Cityscapes, width 0.5 model): 67.7 val / 69.5 test mIoU, 33 ms (30.3 fps) per 1024×2048
image on a Titan X, about 5× faster than PSPNet-50 in the same framework.

Deviations from the paper / released model:
- Bottleneck units are torchvision's (``torchvision.models.resnet.Bottleneck``: stride on the 3×3
  conv, ResNet v1.5); the Caffe units stride their first 1×1 conv. Module names follow torchvision
  (``trunk.layer1`` … ``trunk.layer4``), so at width 1.0 a torchvision ResNet-50 state dict loads
  into the units through ``pretrained_backbone`` (all but the stem and layer1's first unit,
  which reads the deep stem's 128 channels; tensors whose shapes differ are skipped).
- Pooling is adaptive (bins of the feature map); the prototxt uses fixed kernels and strides sized
  for a 1025×2049 input (33×65 features), equivalent to adaptive pooling at that size.
- Resizes go to the size of the branch being fused (the prototxt's zoom/shrink factors give the same
  sizes for inputs of the form 32k + 1, e.g. 1025×2049); bilinear with ``align_corners=True`` like
  Caffe's Interp layer.
- The paper's ICNet (§3.2) describes PSPNet's concatenating pyramid pooling; the released model sums
  the pooled levels (no extra parameters), which is what is built here.
- ``backbone="resnet18"`` / ``"resnet34"`` build the trunk from basic units (torchvision's
  ``BasicBlock`` layout, dilated as ``architectures.backbones.DilatedBasicBlock``: both 3×3 convs
  at the stage's rate), not in the paper: stage outputs are w64 … w512 instead of 4·w64 … 4·w512
  (conv3_1 64 and conv5_3 256 channels at width 0.5, 128 and 512 at width 1.0), and the CFF units
  and the reduction read those widths. layer1's first unit reads the stem's 2·w64 channels
  through a projection shortcut, as in semseg's deep-base ResNet-18/34.
- ``backbone="resnet_tiny"`` (one unit per stage) exists for CPU tests only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from architectures.backbones import (
    RESNET_DEPTHS,
    DilatedBasicBlock,
    load_pretrained,
    resnet_block,
)

__all__ = [
    "CascadeFeatureFusion",
    "ICNet",
    "ICNetConfig",
    "ICNetTrunk",
    "SumPyramidPooling",
]

_ICNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet_tiny")


@dataclass(frozen=True)
class ICNetConfig:
    """ICNet hyperparameters; defaults are the released Cityscapes model."""

    num_classes: int = 19  # K output classes (Cityscapes: 19)
    in_channels: int = 3  # input image channels
    backbone: str = "resnet50"  # trunk units: resnet18/34/50/101 or resnet_tiny (tests)
    pretrained_backbone: str | None = None  # path/URI of a torchvision ResNet state dict, or None
    width_multiplier: float = 0.5  # trunk/full-branch width w.r.t. ResNet-50 (0.5 released, 1.0)
    bins: tuple[int, ...] = (1, 2, 3, 6)  # pyramid bin sizes, summed into the 1/32 features
    cff_channels: int = 128  # output width of each cascade feature fusion unit
    cascade_weights: tuple[float, float, float] = (0.4, 0.4, 1.0)  # λ for 1/16, 1/8, 1/4 losses

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.backbone not in _ICNET_BACKBONES:
            raise ValueError(f"backbone must be one of {_ICNET_BACKBONES}, got {self.backbone!r}")
        if not 1 / 64 <= self.width_multiplier <= 4:
            raise ValueError(f"width_multiplier must be in [1/64, 4], got {self.width_multiplier}")
        if not self.bins or any(not isinstance(b, int) or b < 1 for b in self.bins):
            raise ValueError(f"bins must be a non-empty tuple of positive ints, got {self.bins}")
        if self.cff_channels < 1:
            raise ValueError(f"cff_channels must be >= 1, got {self.cff_channels}")
        if len(self.cascade_weights) != 3 or any(w < 0 for w in self.cascade_weights):
            raise ValueError(
                f"cascade_weights must be three non-negative floats, got {self.cascade_weights}"
            )

    @classmethod
    def tiny(cls, **overrides: Any) -> ICNetConfig:
        """One unit per stage at 1/8 of ResNet-50's width and 32-wide fusion, for CPU tests."""
        return replace(
            cls(backbone="resnet_tiny", width_multiplier=0.125, cff_channels=32), **overrides
        )


def _scaled(channels: int, multiplier: float) -> int:
    return max(1, round(channels * multiplier))


def _conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm_layer: Callable[..., nn.Module],
    *,
    stride: int = 1,
    dilation: int = 1,
    relu: bool = True,
) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
        ),
        norm_layer(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _half(x: Tensor) -> Tensor:
    """Bilinear ×0.5 like Caffe's Interp ``shrink_factor: 2``: (h - 1) // 2 + 1 rows."""
    height, width = x.shape[-2:]
    return _resize(x, ((height - 1) // 2 + 1, (width - 1) // 2 + 1))


def _make_stage(
    block: type[Bottleneck] | type[DilatedBasicBlock],
    inplanes: int,
    planes: int,
    blocks: int,
    *,
    stride: int,
    dilation: int,
    norm_layer: Callable[..., nn.Module],
) -> nn.Sequential:
    """A torchvision-layout ResNet stage of ``block`` units (downsample: 1×1 conv + BN)."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out_channels, 1, stride=stride, bias=False),
            norm_layer(out_channels),
        )
    units = [block(inplanes, planes, stride, downsample, dilation=dilation, norm_layer=norm_layer)]
    for _ in range(1, blocks):
        units.append(block(out_channels, planes, dilation=dilation, norm_layer=norm_layer))
    return nn.Sequential(*units)


class ICNetTrunk(nn.Module):
    """The width-scaled, dilated ResNet shared by the 1/2 and 1/4 branches (paper Fig. 2).

    ``stem`` (three 3×3 convs) → max-pool → ``layer1`` → ``layer2[0]`` (conv3_1, stride 2) is the
    half branch; ``layer2[1:]`` → ``layer3`` (rate 2) → ``layer4`` (rate 4) is the quarter branch.
    Units are ``block`` (``Bottleneck``, expansion e = 4, or ``DilatedBasicBlock``, e = 1);
    ``half_channels`` and ``out_channels`` report the widths the heads read.
    """

    def __init__(
        self,
        depths: Sequence[int],
        width_multiplier: float,
        in_channels: int,
        norm_layer: Callable[..., nn.Module],
        block: type[Bottleneck] | type[DilatedBasicBlock] = Bottleneck,
    ) -> None:
        super().__init__()
        stem_width = _scaled(64, width_multiplier)
        self.stem = nn.Sequential(
            _conv_bn(in_channels, stem_width, 3, norm_layer, stride=2),
            _conv_bn(stem_width, stem_width, 3, norm_layer),
            _conv_bn(stem_width, 2 * stem_width, 3, norm_layer),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        planes = [_scaled(p, width_multiplier) for p in (64, 128, 256, 512)]
        inplanes = 2 * stem_width
        stages = []
        for i, (units, width) in enumerate(zip(depths, planes)):
            stride, dilation = ((1, 1), (2, 1), (1, 2), (1, 4))[i]
            stages.append(
                _make_stage(
                    block,
                    inplanes,
                    width,
                    units,
                    stride=stride,
                    dilation=dilation,
                    norm_layer=norm_layer,
                )
            )
            inplanes = width * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.half_channels = planes[1] * block.expansion  # conv3_1 output width
        self.out_channels = planes[3] * block.expansion  # conv5_3 output width

    def forward_half(self, x_half: Tensor) -> Tensor:
        """Half-resolution input (H/2) → conv3_1 features at H/16."""
        x = self.maxpool(self.stem(x_half))  # (N, 2·w64, H/8, W/8)
        x = self.layer1(x)  # (N, e·w64, H/8, W/8)
        return self.layer2[0](x)  # (N, e·w128, H/16, W/16)

    def forward_quarter(self, conv3_1: Tensor) -> Tensor:
        """conv3_1 features → downsampled ×2 → rest of the dilated ResNet, at H/32."""
        x = _half(conv3_1)  # (N, e·w128, H/32, W/32)
        x = self.layer2[1:](x)  # (N, e·w128, H/32, W/32)
        x = self.layer3(x)  # (N, e·w256, H/32, W/32)
        return self.layer4(x)  # (N, e·w512, H/32, W/32)


class SumPyramidPooling(nn.Module):
    """Pyramid pooling of the released ICNet [conv5_3_sum]: ``x + Σ_b up(avgpool_b(x))``."""

    def __init__(self, bins: Sequence[int]) -> None:
        super().__init__()
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(b) for b in bins)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for pool in self.pools:
            out = out + _resize(pool(x), x.shape[-2:])  # (N, C, h, w)
        return out


class CascadeFeatureFusion(nn.Module):
    """CFF unit (paper §3.3, Fig. 3).

    low (N, C1, h, w) → bilinear up to the high input's size → 3×3 conv rate 2 + BN;
    high (N, C2, 2h, 2w) → 1×1 conv + BN; sum → ReLU → (N, C3, 2h, 2w).
    The auxiliary classifier (label guidance) reads the upsampled low input.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        out_channels: int,
        num_classes: int,
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.low = _conv_bn(low_channels, out_channels, 3, norm_layer, dilation=2, relu=False)
        self.high = _conv_bn(high_channels, out_channels, 1, norm_layer, relu=False)
        self.classifier = nn.Conv2d(low_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        low_up = _resize(low, high.shape[-2:])  # (N, C1, 2h, 2w)
        fused = F.relu(self.low(low_up) + self.high(high))  # (N, C3, 2h, 2w)
        return fused, low_up


class ICNet(nn.Module):
    """ICNet (paper Fig. 2): three resolutions, two CFF units, cascade label guidance."""

    def __init__(
        self, config: ICNetConfig, *, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.config = config
        width = config.width_multiplier
        depths = RESNET_DEPTHS[config.backbone]
        block = resnet_block(config.backbone)
        self.trunk = ICNetTrunk(depths, width, config.in_channels, norm_layer, block)
        if config.pretrained_backbone:
            load_pretrained(self.trunk, config.pretrained_backbone)
        self.pyramid = SumPyramidPooling(config.bins)
        reduced = _scaled(512, width)
        self.reduce = _conv_bn(self.trunk.out_channels, reduced, 1, norm_layer)  # conv5_4_k1
        full_width = _scaled(64, width)
        self.full_branch = nn.Sequential(
            _conv_bn(config.in_channels, full_width, 3, norm_layer, stride=2),  # conv1_sub1
            _conv_bn(full_width, full_width, 3, norm_layer, stride=2),  # conv2_sub1
            _conv_bn(full_width, 2 * full_width, 3, norm_layer, stride=2),  # conv3_sub1
        )
        cff = config.cff_channels
        self.cff_quarter_half = CascadeFeatureFusion(
            reduced, self.trunk.half_channels, cff, config.num_classes, norm_layer
        )
        self.cff_half_full = CascadeFeatureFusion(
            cff, 2 * full_width, cff, config.num_classes, norm_layer
        )
        self.classifier = nn.Conv2d(cff, config.num_classes, 1)  # conv6_cls

    def loss_weights(self) -> dict[str, float]:
        """Loss weight per training output: λ1, λ2 on the CFF outputs, λ3 on ``out``.

        ``aux_1_4`` holds the logits of ``out`` before upsampling; it is weighted 0 so the 1/4
        term counts once.
        """
        w_16, w_8, w_4 = self.config.cascade_weights
        return {"out": w_4, "aux_1_16": w_16, "aux_1_8": w_8, "aux_1_4": 0.0}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        conv3_1 = self.trunk.forward_half(_half(x))  # (N, C_h, H/16, W/16)
        quarter = self.pyramid(self.trunk.forward_quarter(conv3_1))  # (N, C_q, H/32, W/32)
        quarter = self.reduce(quarter)  # (N, C_r, H/32, W/32)
        full = self.full_branch(x)  # (N, 2·w64, H/8, W/8)
        sub24, low_1_16 = self.cff_quarter_half(quarter, conv3_1)  # (N, 128, H/16, W/16)
        sub12, low_1_8 = self.cff_half_full(sub24, full)  # (N, 128, H/8, W/8)
        sub12 = _resize(sub12, (2 * sub12.shape[-2], 2 * sub12.shape[-1]))  # (N, 128, H/4, W/4)
        logits = self.classifier(sub12)  # (N, K, H/4, W/4)
        out = {"out": _resize(logits, size)}  # (N, K, H, W)
        if self.training:
            out["aux_1_16"] = self.cff_quarter_half.classifier(low_1_16)  # (N, K, H/16, W/16)
            out["aux_1_8"] = self.cff_half_full.classifier(low_1_8)  # (N, K, H/8, W/8)
            out["aux_1_4"] = logits
        return out
