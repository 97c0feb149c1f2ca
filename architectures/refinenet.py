"""RefineNet: multi-path refinement over the four levels of a ResNet.

Paper: Guosheng Lin, Anton Milan, Chunhua Shen, Ian Reid, "RefineNet: Multi-Path Refinement
Networks for High-Resolution Semantic Segmentation", CVPR 2017, arXiv:1611.06612
(https://arxiv.org/abs/1611.06612).
Official code: https://github.com/guosheng/refinenet (MatConvNet; the network is built in
``main/gen_network_refine_group.m``, ``main/gen_network_pool_block.m``, ``main/My_net_util.m``,
``main/gen_network_loss_group.m``, configured in ``main/gen_net_opts_model_type1.m``).

Structure (paper §3, Fig. 2 and 3; the 4-cascaded RefineNet of Fig. 2c):
- ResNet levels layer1..layer4 at strides 4, 8, 16, 32 (no dilation). Each level is adapted to
  its block width by a 3×3 conv (official ``add_stage_adapt_block``): 512 for the 1/32 level, 256
  for the others.
- RefineNet-4 takes the 1/32 path; RefineNet-3, -2, -1 take the previous block's output and the next
  finer level. In a block:
  1. adaptive convolutions: every input path passes through two residual conv units (RCU: ReLU,
     3×3 conv, ReLU, 3×3 conv, + identity) at the path's own width;
  2. multi-resolution fusion (blocks with two inputs): a 3×3 conv per path to the smallest input
     width, bilinear upsampling to the largest resolution, sum;
  3. chained residual pooling: ReLU, then ``crp_stages`` stages of 5×5 max-pool (stride 1, pad 2)
     followed by a 3×3 conv; each stage reads the previous stage's output and its output is added to
     the running sum (which starts at the ReLU output);
  4. output conv: one RCU.
- RefineNet-1's output (1/4 resolution, 256 channels) → dropout 0.5 → 3×3 conv to K → bilinear
  upsampling to the input (the official loss group: dropout 0.5 and a 3×3 classifier).
- As in the official feature network, dropout 0.5 is applied to layer3 and layer4 (the backbone
  outputs wider than 512 channels in its ResNets; ``add_init_net_dropout``), whatever the backbone.
Convolution biases follow the official code: the first conv of an RCU has a bias; the second RCU
conv and the adaptation, fusion and pooling convs ("dim_reduce" layers) have none.

Published: PASCAL VOC 2012 test 83.4 mIoU (ResNet-152), Cityscapes test
73.6 (ResNet-101). The default backbone here is ResNet-101, the paper's main network; ``backbone``
also takes ``resnet50``/``resnet152`` and the smaller ``resnet18``/``resnet34`` (basic units,
levels of 64/128/256/512 channels; not in the paper). The adaptation convs read the widths the
backbone reports.

Deviations from the paper:
- The released code (``gen_refine_config_basic``) sets ``chained_pool_num = 2`` with 4 as the
  commented alternative, and its "improved" chained pooling puts the 3×3 conv *before* each pool;
  we default to 4 stages (configurable with ``crp_stages``) in the paper's pool-then-conv order.
- The released code uses 3 output RCUs (``refine_block_conv_num_mainflow = 3``) and applies the two
  adaptive RCUs only to the backbone paths (the previous block's output goes straight into the
  fusion conv); we follow the paper's text and Fig. 3: two RCUs on every input path and one output
  RCU (``output_rcus`` selects more).
- The official training feeds the network at 1.2× the image scale and optionally uses two input
  scales (a cascade of 8 paths); that is a data/inference recipe and is not part of the model.
- Backbone: torchvision's ResNet (v1.5 stride placement, 7×7 stem) instead of the MatConvNet
  conversion of the original Caffe ResNets; its batch norm is trained, where the official code
  freezes the BN statistics (``fix_batch_norm_resnet``) — freeze them in training code if wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from architectures.backbones import RESNET_DEPTHS, ResNet, load_pretrained

__all__ = [
    "ChainedResidualPooling",
    "MultiResolutionFusion",
    "RefineNet",
    "RefineNetBlock",
    "RefineNetConfig",
    "ResidualConvUnit",
]

_REFINENET_BACKBONES = tuple(RESNET_DEPTHS)


@dataclass(frozen=True)
class RefineNetConfig:
    """4-cascaded RefineNet hyperparameters; defaults are the paper's (ResNet-101)."""

    num_classes: int = 21  # K output classes (PASCAL VOC 2012: 20 + background)
    in_channels: int = 3  # input image channels
    backbone: str = "resnet101"  # resnet18/34/50/101/152 or resnet_tiny (tests)
    pretrained_backbone: str | None = None  # path/URI of torchvision ResNet weights, or None
    crp_stages: int = 4  # chained residual pooling stages (pool + conv) per block
    widths: tuple[int, int, int, int] = (512, 256, 256, 256)  # RefineNet-4, -3, -2, -1 widths
    adapt_rcus: int = 2  # residual conv units on each input path of a block
    output_rcus: int = 1  # residual conv units after chained pooling (official code: 3)
    backbone_dropout: float = 0.5  # dropout on layer3/layer4 outputs (official code)
    classifier_dropout: float = 0.5  # dropout before the final 3×3 classifier (official code)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.backbone not in _REFINENET_BACKBONES:
            raise ValueError(
                f"backbone must be one of {_REFINENET_BACKBONES}, got {self.backbone!r}"
            )
        if self.crp_stages < 1:
            raise ValueError(f"crp_stages must be >= 1, got {self.crp_stages}")
        if len(self.widths) != 4 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be four positive ints, got {self.widths}")
        if self.adapt_rcus < 0:
            raise ValueError(f"adapt_rcus must be >= 0, got {self.adapt_rcus}")
        if self.output_rcus < 0:
            raise ValueError(f"output_rcus must be >= 0, got {self.output_rcus}")
        for name in ("backbone_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

    @classmethod
    def tiny(cls, **overrides: Any) -> RefineNetConfig:
        """One-unit-per-stage ResNet and 32/16-wide blocks, for CPU tests."""
        return replace(cls(backbone="resnet_tiny", widths=(32, 16, 16, 16)), **overrides)


def _conv3x3(in_channels: int, out_channels: int, *, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """RCU (paper Fig. 2b): ReLU, 3×3 conv, ReLU, 3×3 conv, plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(channels, channels, bias=True)
        self.conv2 = _conv3x3(channels, channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.conv1(F.relu(x))  # not in place: x is the identity path
        residual = self.conv2(F.relu(residual))
        return x + residual  # (N, C, h, w)


class MultiResolutionFusion(nn.Module):
    """Multi-resolution fusion (paper Fig. 2c): 3×3 conv per path to ``out_channels``, bilinear
    upsampling to the largest input resolution, sum. A single path passes through unchanged (as in
    the official code, where RefineNet-4 has no fusion convolution)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        if len(in_channels) == 1 and in_channels[0] != out_channels:
            raise ValueError(
                f"a single path must keep its width: {in_channels[0]} != {out_channels}"
            )
        self.convs = nn.ModuleList(
            _conv3x3(c, out_channels, bias=False) for c in in_channels if len(in_channels) > 1
        )

    def forward(self, paths: Sequence[Tensor]) -> Tensor:
        if not self.convs:
            return paths[0]
        height = max(p.shape[-2] for p in paths)
        width = max(p.shape[-1] for p in paths)
        fused: Tensor | None = None
        for conv, path in zip(self.convs, paths):
            y = conv(path)  # (N, C_out, h_i, w_i)
            if y.shape[-2:] != (height, width):
                y = F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False)
            fused = y if fused is None else fused + y  # (N, C_out, h_max, w_max)
        assert fused is not None
        return fused


class ChainedResidualPooling(nn.Module):
    """Chained residual pooling (paper Fig. 2d): ReLU, then ``stages`` × (5×5 max-pool stride 1 →
    3×3 conv); each stage takes the previous stage's output, and every stage output is added to a
    running sum that starts at the ReLU output."""

    def __init__(self, channels: int, stages: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.convs = nn.ModuleList(_conv3x3(channels, channels, bias=False) for _ in range(stages))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        total = x
        path = x
        for conv in self.convs:
            path = conv(self.pool(path))  # (N, C, h, w)
            total = total + path
        return total


class RefineNetBlock(nn.Module):
    """One RefineNet block (paper Fig. 2a): adaptive RCUs per path → fusion → chained residual
    pooling → output RCU(s). Output width: the smallest input width."""

    def __init__(
        self, in_channels: Sequence[int], *, adapt_rcus: int, crp_stages: int, output_rcus: int
    ) -> None:
        super().__init__()
        self.out_channels = min(in_channels)
        self.adapt = nn.ModuleList(
            nn.Sequential(*(ResidualConvUnit(c) for _ in range(adapt_rcus))) for c in in_channels
        )
        self.fusion = MultiResolutionFusion(in_channels, self.out_channels)
        self.crp = ChainedResidualPooling(self.out_channels, crp_stages)
        self.output = nn.Sequential(
            *(ResidualConvUnit(self.out_channels) for _ in range(output_rcus))
        )

    def forward(self, *paths: Tensor) -> Tensor:
        adapted = [rcus(p) for rcus, p in zip(self.adapt, paths)]
        x = self.fusion(adapted)  # (N, C_out, h_max, w_max)
        return self.output(self.crp(x))


class RefineNet(nn.Module):
    """4-cascaded RefineNet (paper Fig. 2c) over a ResNet's layer1..layer4."""

    def __init__(self, config: RefineNetConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNet(config.backbone, output_stride=32, in_channels=config.in_channels)
        if config.pretrained_backbone:
            load_pretrained(self.backbone, config.pretrained_backbone)
        levels = ("layer4", "layer3", "layer2", "layer1")  # coarse (1/32) to fine (1/4)
        self._dropout_levels = frozenset({"layer4", "layer3"})  # as the official feature network
        channels = {f.name: f.channels for f in self.backbone.feature_info}
        self.levels = levels
        self.level_dropout = nn.Dropout(config.backbone_dropout)
        self.adapters = nn.ModuleList(
            _conv3x3(channels[name], width, bias=False)
            for name, width in zip(levels, config.widths)
        )
        blocks = []
        previous: int | None = None
        for width in config.widths:
            inputs = [width] if previous is None else [previous, width]
            block = RefineNetBlock(
                inputs,
                adapt_rcus=config.adapt_rcus,
                crp_stages=config.crp_stages,
                output_rcus=config.output_rcus,
            )
            blocks.append(block)
            previous = block.out_channels
        self.blocks = nn.ModuleList(blocks)  # RefineNet-4, -3, -2, -1
        assert previous is not None
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout),
            nn.Conv2d(previous, config.num_classes, 3, padding=1),
        )

    def loss_weights(self) -> dict[str, float]:
        """Loss weight per output key returned in training mode (no auxiliary outputs)."""
        return {"out": 1.0}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        refined: Tensor | None = None
        for name, adapter, block in zip(self.levels, self.adapters, self.blocks):
            level = features[name]  # (N, C_l, H/s_l, W/s_l)
            if name in self._dropout_levels:
                level = self.level_dropout(level)
            level = adapter(level)  # (N, width_l, H/s_l, W/s_l)
            refined = block(level) if refined is None else block(refined, level)
        assert refined is not None  # (N, C, H/4, W/4)
        logits = self.classifier(refined)  # (N, K, H/4, W/4)
        return {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
