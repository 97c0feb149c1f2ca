"""FCN-32s, FCN-16s and FCN-8s: fully convolutional networks on VGG16.

Paper: Jonathan Long, Evan Shelhamer, Trevor Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015, arXiv:1411.4038 (https://arxiv.org/abs/1411.4038).
Official code: https://github.com/shelhamer/fcn.berkeleyvision.org (``voc-fcn32s/net.py``,
``voc-fcn16s/net.py``, ``voc-fcn8s/net.py``, ``voc-fcn8s-atonce/net.py``, ``surgery.py``).

What is built (paper §3-§4.2, official ``net.py``):
- VGG16 (configuration D) with Caffe's ceil-mode pooling and the official 100-pixel zero padding
  on conv1_1, so that every input size gives a score map large enough to crop back to the input.
- ``fc6`` as a 7×7 convolution with 4096 channels and no padding, ``fc7`` as a 1×1 convolution
  with 4096 channels, each followed by ReLU and dropout 0.5; ``score_fr`` 1×1 → K.
- Skip layers ``score_pool4`` and ``score_pool3`` (1×1 → K) fused by a sum after cropping.
- Upsampling by transposed convolutions without bias, initialised to bilinear interpolation
  (``surgery.interp``): FCN-32s k64 s32; FCN-16s k4 s2 then k32 s16; FCN-8s k4 s2, k4 s2, k16 s8.
- Crops with the official offsets (computed by Caffe's ``coord_map``): 19 (32s); 5 and 27 (16s);
  5, 9 and 31 (8s).
- ``score_fr``, ``score_pool4`` and ``score_pool3`` are zero-initialised (the official nets give
  them no filler, and Caffe's default filler is the constant 0), so training starts from the
  coarser net's prediction.
- Pretrained weights: ``pretrained_backbone`` is the path or URI of a torchvision ``vgg16`` state
  dict; ``features.*`` load into the backbone unchanged, and ``classifier.0`` / ``classifier.3``
  become ``fc6`` / ``fc7`` by reshaping (4096×25088 → 4096×512×7×7, 4096×4096 → 4096×4096×1×1),
  which is the paper's "convolutionalization".

Deviations from the paper:
- The paper (§4.2) learns the intermediate ×2 upsampling layers and fixes the last one to bilinear;
  the released code fixes all of them (``lr_mult: 0``). We follow the paper by default
  (``learn_upsampling=True``); ``learn_upsampling=False`` gives the released code's behaviour. The
  fixed layers have ``requires_grad=False``; they are not counted in the paper's 134M parameters
  (trainable parameters of FCN-32s with K=21: 134.35M; with the fixed k64 layer: 136.15M).
- The "at-once" FCN-8s of the released code scales pool4 by 0.01 and pool3 by 0.0001 before the
  score layers (``voc-fcn8s-atonce``); this is off by default (the paper's staged training) and on
  with ``skip_scaling=True``.
- Caffe's VGG16 input is BGR with the mean subtracted and no scaling; this module takes whatever the
  caller normalises (torchvision's weights expect RGB in [0, 1] normalised by ImageNet mean/std).
- ``width_divisor`` and ``fc_channels`` exist only to build small test networks; the defaults are
  the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

import torch
from torch import Tensor, nn

from architectures.backbones import VGG16, read_state_dict

__all__ = ["FCN", "FCN8sConfig", "FCN16sConfig", "FCN32sConfig", "FCNConfig", "bilinear_kernel"]


@dataclass(frozen=True)
class FCNConfig:
    """Fields shared by the three FCN variants; defaults are the paper's (VOC, K = 21)."""

    num_classes: int = 21  # K, output channels (PASCAL VOC: 20 classes + background)
    in_channels: int = 3  # input channels (3 for RGB)
    pretrained_backbone: str | None = None  # path/URI of a torchvision vgg16 state dict, or None
    fc_channels: int = 4096  # width of fc6 (7×7 conv) and fc7 (1×1 conv)
    dropout: float = 0.5  # dropout after fc6 and after fc7
    learn_upsampling: bool = (
        True  # learn the intermediate ×2 deconvs (paper); False = released code
    )
    skip_scaling: bool = False  # scale pool4 by 0.01 and pool3 by 1e-4 (released "at-once" FCN-8s)
    width_divisor: int = 1  # divide VGG16's conv widths (1 = paper; >1 only for small test nets)

    # Output stride of the variant: 32, 16 or 8 (set by each subclass, not a parameter).
    stride: ClassVar[int] = 32

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.fc_channels < 1:
            raise ValueError(f"fc_channels must be >= 1, got {self.fc_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.width_divisor < 1 or 64 % self.width_divisor:
            raise ValueError(f"width_divisor must divide 64, got {self.width_divisor}")

    @classmethod
    def tiny(cls, **overrides: object) -> Self:
        """A small CPU config with the paper's structure (VGG widths /16, fc width 32)."""
        # No dropout: on 32 fc channels, dropout 0.5 leaves too little signal to fit small data.
        params: dict[str, object] = {
            "num_classes": 3,
            "width_divisor": 16,
            "fc_channels": 32,
            "dropout": 0.0,
        }
        params.update(overrides)
        return cls(**params)


@dataclass(frozen=True)
class FCN32sConfig(FCNConfig):
    """FCN-32s: one ×32 upsampling of the fc7 scores (paper §4.1)."""

    stride: ClassVar[int] = 32


@dataclass(frozen=True)
class FCN16sConfig(FCNConfig):
    """FCN-16s: fc7 scores ×2, summed with pool4 scores, then ×16 (paper §4.2, Fig. 3)."""

    stride: ClassVar[int] = 16


@dataclass(frozen=True)
class FCN8sConfig(FCNConfig):
    """FCN-8s: FCN-16s fusion ×2 more, summed with pool3 scores, then ×8 (paper §4.2, Fig. 3)."""

    stride: ClassVar[int] = 8


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """The (C, C, k, k) weight of a transposed conv doing bilinear upsampling per channel.

    Same as the official ``surgery.upsample_filt`` / ``surgery.interp``: channel ``c`` maps only to
    channel ``c``, with the separable tent filter centred on the kernel.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float64) - center).abs() / factor  # (k,)
    filt = (taps[:, None] * taps[None, :]).float()  # (k, k)
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt
    return weight


def _upsampling(
    channels: int, kernel_size: int, stride: int, trainable: bool
) -> nn.ConvTranspose2d:
    layer = nn.ConvTranspose2d(channels, channels, kernel_size, stride=stride, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, kernel_size))
    layer.weight.requires_grad_(trainable)
    return layer


def _score_layer(in_channels: int, num_classes: int) -> nn.Conv2d:
    layer = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _crop(x: Tensor, offset: int, height: int, width: int) -> Tensor:
    """Caffe's ``Crop`` layer: ``x[..., offset:offset+height, offset:offset+width]``."""
    return x[:, :, offset : offset + height, offset : offset + width]


class FCN(nn.Module):
    """FCN-32s / 16s / 8s (paper Fig. 3); the variant follows the config class.

    ``forward(x)`` returns ``{"out": (N, K, H, W)}`` aligned with the input pixel for pixel (no
    interpolation: the official pad-and-crop). FCN has no auxiliary outputs.
    """

    # Official crop offsets (Caffe coord_map) per variant: the skip crops, then the final crop.
    CROP_OFFSETS: ClassVar[dict[int, tuple[int, ...]]] = {32: (19,), 16: (5, 27), 8: (5, 9, 31)}

    def __init__(self, config: FCNConfig) -> None:
        super().__init__()
        if not isinstance(config, FCNConfig):
            raise TypeError(f"FCN expects an FCNConfig, got {type(config).__name__}")
        self.config = config
        self.stride = config.stride
        k, fc = config.num_classes, config.fc_channels
        self.backbone = VGG16(
            first_padding=100,
            ceil_mode=True,
            in_channels=config.in_channels,
            width_divisor=config.width_divisor,
        )
        c3, c4, c5 = (info.channels for info in self.backbone.feature_info[2:])
        self.fc6 = nn.Conv2d(c5, fc, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(config.dropout)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(config.dropout)
        self.score_fr = _score_layer(fc, k)
        learn = config.learn_upsampling
        if self.stride == 32:
            self.upscore = _upsampling(k, 64, 32, trainable=False)
        elif self.stride == 16:
            self.upscore2 = _upsampling(k, 4, 2, trainable=learn)
            self.score_pool4 = _score_layer(c4, k)
            self.upscore16 = _upsampling(k, 32, 16, trainable=False)
        else:
            self.upscore2 = _upsampling(k, 4, 2, trainable=learn)
            self.score_pool4 = _score_layer(c4, k)
            self.upscore_pool4 = _upsampling(k, 4, 2, trainable=learn)
            self.score_pool3 = _score_layer(c3, k)
            self.upscore8 = _upsampling(k, 16, 8, trainable=False)
        self.pool4_scale = 0.01 if config.skip_scaling else 1.0
        self.pool3_scale = 1e-4 if config.skip_scaling else 1.0
        if config.pretrained_backbone:
            self.load_vgg16(config.pretrained_backbone)

    def load_vgg16(self, uri: str) -> None:
        """Load a torchvision ``vgg16`` state dict: features as is, fc6/fc7 reshaped (§3.1)."""
        state = read_state_dict(uri)
        own = self.backbone.state_dict()
        features = {k: v for k, v in state.items() if k in own and k.startswith("features.")}
        mismatched = [k for k, v in features.items() if own[k].shape != v.shape]
        # conv1_1 differs only when in_channels != 3; it then keeps its random init.
        if any(k != "features.0.weight" for k in mismatched) or not features:
            raise ValueError(
                f"{uri}: not a VGG16 state dict for this network "
                f"(matched {len(features)} feature tensors; wrong shapes: {mismatched[:3]})"
            )
        self.backbone.load_state_dict(
            {k: v for k, v in features.items() if k not in mismatched}, strict=False
        )
        for fc_name, key in (("fc6", "classifier.0"), ("fc7", "classifier.3")):
            conv: nn.Conv2d = getattr(self, fc_name)
            weight, bias = state.get(f"{key}.weight"), state.get(f"{key}.bias")
            if weight is None or bias is None or weight.numel() != conv.weight.numel():
                found = None if weight is None else tuple(weight.shape)
                raise ValueError(
                    f"{uri}: {key}.weight must have {conv.weight.numel()} values to become "
                    f"{fc_name} {tuple(conv.weight.shape)}, found {found}"
                )
            with torch.no_grad():
                # (out, in*k*k) → (out, in, k, k): torchvision flattens pool5 as (C, 7, 7).
                conv.weight.copy_(weight.reshape(conv.weight.shape))
                conv.bias.copy_(bias)

    def loss_weights(self) -> dict[str, float]:
        """Weights of the outputs returned in training mode: FCN has only ``out``."""
        return {"out": 1.0}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        height, width = x.shape[-2:]
        feats = self.backbone(x)  # pool_i: (N, C_i, ~(H+198)/2^i, ~(W+198)/2^i)
        h = self.drop6(self.relu6(self.fc6(feats["pool5"])))  # (N, 4096, (H+198)/32 - 6, ...)
        h = self.drop7(self.relu7(self.fc7(h)))  # (N, 4096, same)
        score = self.score_fr(h)  # (N, K, same)
        offsets = self.CROP_OFFSETS[self.stride]
        if self.stride == 32:
            up = self.upscore(score)  # (N, K, 32·s + 32, ...)
            return {"out": _crop(up, offsets[0], height, width)}  # (N, K, H, W)
        up2 = self.upscore2(score)  # (N, K, 2·s + 2, ...)
        pool4 = self.score_pool4(feats["pool4"] * self.pool4_scale)  # (N, K, H4, W4)
        fuse4 = up2 + _crop(pool4, offsets[0], up2.shape[-2], up2.shape[-1])
        if self.stride == 16:
            up = self.upscore16(fuse4)  # (N, K, 16·s4 + 16, ...)
            return {"out": _crop(up, offsets[1], height, width)}  # (N, K, H, W)
        up4 = self.upscore_pool4(fuse4)  # (N, K, 2·s4 + 2, ...)
        pool3 = self.score_pool3(feats["pool3"] * self.pool3_scale)  # (N, K, H3, W3)
        fuse3 = up4 + _crop(pool3, offsets[1], up4.shape[-2], up4.shape[-1])
        up = self.upscore8(fuse3)  # (N, K, 8·s3 + 8, ...)
        return {"out": _crop(up, offsets[2], height, width)}  # (N, K, H, W)
