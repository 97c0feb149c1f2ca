"""SegNet: a deep convolutional encoder-decoder with max-unpooling by stored indices.

Paper: Vijay Badrinarayanan, Alex Kendall, Roberto Cipolla, "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation", IEEE TPAMI 39(12), 2017, arXiv:1511.00561
(https://arxiv.org/abs/1511.00561).
Official code: https://github.com/alexgkendall/caffe-segnet and the reference network
definitions in https://github.com/alexgkendall/SegNet-Tutorial (``Models/segnet_train.prototxt``).

What is built (paper §3, Fig. 2-3; ``segnet_train.prototxt``):
- Encoder: the 13 convolutions of VGG16 (3×3, pad 1, with bias), each followed by batch
  normalisation and ReLU; after each block a 2×2 max-pool with stride 2 that keeps the argmax
  indices. Pooling rounds up (Caffe's pooling), so odd sizes keep their last row/column:
  360×480 → 180×240 → 90×120 → 45×60 → 23×30 → 12×15 (the prototxt's ``upsample_h: 23``).
- Decoder: per block, max-unpooling with the stored indices to the exact pre-pool size, then
  3×3 conv + BN + ReLU with widths 512,512,512 / 512,512,256 / 256,256,128 / 128,64 / 64, then a
  3×3 convolution straight to K classes (``conv1_1_D``; no BN, no ReLU, no extra 1×1).
- Encoder parameters: 14.72M (13 convs 14,714,688 + BN scale/shift 8,448; paper: 14.7M).
  Whole model with K = 11 (CamVid): 29.45M parameters = 117.8 MB in float32 (paper: 117 MB);
  BN running statistics add 0.06 MB.
- Pretrained weights: ``pretrained_backbone`` is the path or URI of a torchvision ``vgg16_bn``
  state dict; its ``features.*`` load into the encoder unchanged (the paper initialises the
  encoder from VGG16 trained on ImageNet).

Deviations from the paper:
- The decoder uses PyTorch's default initialisation; the official prototxt uses MSRA (He) fillers.
- The official model normalises the input with a BN layer on the raw image; here normalisation is
  the caller's (the platform normalises images before the model).
- ``width_divisor`` exists only to build small test networks; the default is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from torch import Tensor, nn

from architectures.backbones import VGG16, load_pretrained

__all__ = ["DECODER_WIDTHS", "SegNet", "SegNetConfig"]

# Decoder conv widths per block, deepest block first (paper Fig. 2, segnet_train.prototxt).
DECODER_WIDTHS: tuple[tuple[int, ...], ...] = (
    (512, 512, 512),
    (512, 512, 256),
    (256, 256, 128),
    (128, 64),
    (64,),
)


@dataclass(frozen=True)
class SegNetConfig:
    """SegNet configuration; defaults are the paper's CamVid network (11 classes)."""

    num_classes: int = 11  # K, output channels (CamVid road-scene classes)
    in_channels: int = 3  # input channels (3 for RGB)
    pretrained_backbone: str | None = None  # path/URI of a torchvision vgg16_bn state dict
    width_divisor: int = 1  # divide all conv widths (1 = paper; >1 only for small test nets)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.width_divisor < 1 or 64 % self.width_divisor:
            raise ValueError(f"width_divisor must divide 64, got {self.width_divisor}")

    @classmethod
    def tiny(cls, **overrides: object) -> Self:
        """A small CPU config with the paper's structure (all widths /16)."""
        params: dict[str, object] = {"num_classes": 3, "width_divisor": 16}
        params.update(overrides)
        return cls(**params)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SegNet(nn.Module):
    """SegNet (paper Fig. 2): VGG16-BN encoder with pooling indices, mirrored unpooling decoder.

    ``forward(x)`` returns ``{"out": (N, K, H, W)}`` for any H, W >= 1; SegNet has no auxiliary
    outputs.
    """

    def __init__(self, config: SegNetConfig) -> None:
        super().__init__()
        if not isinstance(config, SegNetConfig):
            raise TypeError(f"SegNet expects a SegNetConfig, got {type(config).__name__}")
        self.config = config
        div = config.width_divisor
        self.encoder = VGG16(
            batch_norm=True,
            ceil_mode=True,
            return_indices=True,
            in_channels=config.in_channels,
            width_divisor=div,
        )
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        blocks: list[nn.Sequential] = []
        in_width = self.encoder.out_channels
        for widths in DECODER_WIDTHS:
            layers: list[nn.Module] = []
            for width in widths:
                layers += _conv_bn_relu(in_width, width // div)
                in_width = width // div
            blocks.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(blocks)  # decoder[0] follows unpool5, decoder[4] unpool1
        self.classifier = nn.Conv2d(in_width, config.num_classes, 3, padding=1)
        if config.pretrained_backbone:
            load_pretrained(self.encoder, config.pretrained_backbone)

    def loss_weights(self) -> dict[str, float]:
        """Weights of the outputs returned in training mode: SegNet has only ``out``."""
        return {"out": 1.0}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.encoder(x)  # pool5: (N, 512, ⌈H/32⌉, ⌈W/32⌉), plus indices and sizes
        h = feats["pool5"]
        for level, block in zip(range(5, 0, -1), self.decoder):
            size = feats[f"size{level}"]  # the pre-pool (H_l, W_l)
            h = self.unpool(h, feats[f"indices{level}"], output_size=size)  # (N, C, H_l, W_l)
            h = block(h)  # (N, C', H_l, W_l)
        return {"out": self.classifier(h)}  # (N, K, H, W)
