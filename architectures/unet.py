"""U-Net: convolutional networks for biomedical image segmentation, with overlap-tile inference.

Paper: Olaf Ronneberger, Philipp Fischer, Thomas Brox, "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI 2015, arXiv:1505.04597 (https://arxiv.org/abs/1505.04597).
Official code: https://lmb.informatik.uni-freiburg.de/people/ronneber/u-net/ (Caffe model
``phseg_v5``, distributed as an archive, not on GitHub).

What is built (paper §2, Fig. 1-2):
- Contracting path: per level two unpadded 3×3 convolutions + ReLU, then 2×2 max-pool stride 2;
  64, 128, 256, 512, 1024 channels. Dropout at the end of the contracting path (after the
  1024-channel block).
- Expansive path: 2×2 up-convolution (transposed conv, stride 2) halving the channels,
  concatenation with the centre-cropped encoder map of the same level, two 3×3 convs + ReLU; a
  final 1×1 convolution to K classes. 23 convolutional layers in total.
- With valid convolutions a 572×572 tile gives 388×388 logits (``forward_tile``); a tile side s
  is valid when every max-pool sees an even size, i.e. (s − 124) % 16 == 0 (``depth=4``). The
  output is the centre of the tile minus a 92-pixel margin on each side.
- ``forward`` is the paper's overlap-tile strategy (Fig. 2): the image is mirrored by 92 pixels
  at its borders (repeatedly, if the image is smaller than the margin), cut into a grid of tiles
  whose outputs are adjacent and cover it, each tile is run with ``forward_tile``, and the outputs
  are stitched and cropped, so ``"out"`` has the input size for any input size. Tiles are at most
  ``tile_size`` (572) on a side; an image smaller than one tile uses the smallest valid tile
  that covers it. Training mode uses the same tiled forward (gradients flow through every tile),
  so a training crop of any size works; training on single valid tiles is the same computation.
- ``padding="same"`` pads every 3×3 conv by 1 (the common variant); ``forward`` then mirror-pads
  the input to a multiple of 2^depth and crops the logits back.
- Weights are drawn from a Gaussian with standard deviation sqrt(2/N), N = k²·C_in (paper §3).
- ``unet_weight_map`` computes the paper's loss weights (eq. 2) in torch only:
  w(x) = w_c(x) + w0·exp(−(d1(x) + d2(x))² / (2σ²)), with d1, d2 the distances to the nearest and
  second-nearest cell (connected component of a non-background class, or given instance ids).

Deviations from the paper:
- Tile grid: the paper does not fix how tiles are laid out; we use the largest tile up to
  ``tile_size`` and no overlap between tile outputs (the inputs overlap by the 184-pixel context).
- ``unet_weight_map`` adds the border term on background pixels only, as in the paper's Fig. 3d
  (separation borders between touching cells); eq. 2 as printed ranges over all pixels. Without
  ``class_weights``, w_c balances the class frequencies of the given mask (mean weight 1).
- ``base_channels`` and ``depth`` exist to build small test networks; defaults are the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "UNetConfig", "unet_weight_map"]


@dataclass(frozen=True)
class UNetConfig:
    """U-Net configuration; defaults are the paper's network (grey input, 2 classes)."""

    num_classes: int = 2  # K, output channels (cell / background in the paper's datasets)
    in_channels: int = 1  # input channels (grey microscopy images in the paper)
    base_channels: int = 64  # channels of the first level; doubled at each of the `depth` pools
    depth: int = 4  # number of 2×2 max-pools (paper: 4, giving 64..1024 channels)
    padding: str = "valid"  # "valid" (paper: unpadded convs, overlap-tile forward) or "same"
    dropout: float = 0.5  # dropout at the end of the contracting path
    tile_size: int = 572  # largest input tile side of the overlap-tile forward (valid padding)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {self.base_channels}")
        if not 1 <= self.depth <= 6:
            raise ValueError(f"depth must be in 1..6, got {self.depth}")
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {self.padding!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if valid_output_size(self.tile_size, self.depth) is None:
            first = smallest_valid_input(self.depth)
            raise ValueError(
                f"tile_size {self.tile_size} is not a valid U-Net input for depth {self.depth}: "
                f"valid sizes are {first} + {2**self.depth}·k (e.g. 572 for depth 4)"
            )

    @classmethod
    def tiny(cls, **overrides: object) -> Self:
        """A small CPU config: the paper's valid network with 4..64 channels, 252-pixel tiles."""
        params: dict[str, object] = {"num_classes": 3, "in_channels": 3, "base_channels": 4}
        params["tile_size"] = 252  # 68×68 logits per tile
        params.update(overrides)
        return cls(**params)


def valid_output_size(size: int, depth: int = 4) -> int | None:
    """Logit size of the valid network for input side ``size``, or None if not a valid input.

    Each level loses 4 pixels to two unpadded 3×3 convs and needs an even size before its pool;
    each up level doubles and loses 4 again (paper Fig. 1: 572 → 388).
    """
    for _ in range(depth):
        size -= 4
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 4  # bottom block
    if size <= 0:
        return None
    for _ in range(depth):
        size = 2 * size - 4
        if size <= 0:
            return None
    return size


def smallest_valid_input(depth: int = 4) -> int:
    """The smallest valid input side of the valid network (188 for depth 4, giving 4 logits)."""
    size = 1
    while valid_output_size(size, depth) is None:
        size += 1
    return size


def _mirror_pad(x: Tensor, left: int, right: int, top: int, bottom: int) -> Tensor:
    """Mirror (reflect) padding of any width: reflects repeatedly while the image is narrower."""
    while left or right or top or bottom:
        height, width = x.shape[-2:]
        if height == 1 or width == 1:  # a single row/column has nothing to reflect
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        step = (
            min(left, width - 1),
            min(right, width - 1),
            min(top, height - 1),
            min(bottom, height - 1),
        )
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = (a - b for a, b in zip((left, right, top, bottom), step))
    return x


def _center_crop(x: Tensor, height: int, width: int) -> Tensor:
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[:, :, top : top + height, left : left + width]


class _DoubleConv(nn.Sequential):
    """Two 3×3 convolutions, each followed by ReLU (paper Fig. 1, blue arrows)."""

    def __init__(self, in_channels: int, out_channels: int, padding: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=padding),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=padding),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net (paper Fig. 1) with the overlap-tile forward of Fig. 2.

    ``forward(x)`` returns ``{"out": (N, K, H, W)}`` for any H, W; ``forward_tile(x)`` is the raw
    network (valid padding: a 572×572 tile gives 388×388 logits). U-Net has no auxiliary outputs.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(config).__name__}")
        self.config = config
        pad = 0 if config.padding == "valid" else 1
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.down = nn.ModuleList()
        in_width = config.in_channels
        for width in widths:
            self.down.append(_DoubleConv(in_width, width, pad))
            in_width = width
        self.pool = nn.MaxPool2d(2, stride=2)
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(in_width, width, 2, stride=2))
            self.up_convs.append(_DoubleConv(2 * width, width, pad))
            in_width = width
        self.classifier = nn.Conv2d(in_width, config.num_classes, 1)
        first = smallest_valid_input(config.depth)
        # Context pixels lost on each side by the valid network (92 for depth 4).
        self.margin = (first - (valid_output_size(first, config.depth) or 0)) // 2
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                # Paper §3: Gaussian with std sqrt(2/N), N = k²·C_in (incoming nodes).
                fan_in = module.kernel_size[0] * module.kernel_size[1] * module.in_channels
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_in))
                nn.init.zeros_(module.bias)

    def loss_weights(self) -> dict[str, float]:
        """Weights of the outputs returned in training mode: U-Net has only ``out``."""
        return {"out": 1.0}

    def forward_tile(self, x: Tensor) -> Tensor:
        """The network itself on one tile: (N, C, s, s') → logits (N, K, s − 184, s' − 184).

        With ``padding="same"`` the output has the input size; the sides must then be multiples
        of 2^depth.
        """
        depth = self.config.depth
        for side in x.shape[-2:]:
            if self.config.padding == "valid" and valid_output_size(side, depth) is None:
                first = smallest_valid_input(depth)
                raise ValueError(
                    f"U-Net tile side {side} is invalid: valid sides are {first} + "
                    f"{2**depth}·k (e.g. 572); use forward() for other sizes"
                )
            if self.config.padding == "same" and side % 2**depth:
                raise ValueError(
                    f"U-Net tile side {side} must be a multiple of {2**depth} with "
                    "padding='same'; use forward() for other sizes"
                )
        skips: list[Tensor] = []
        h = x
        for level, block in enumerate(self.down):
            if level:
                h = self.pool(h)  # (N, C, S/2, S/2)
            h = block(h)  # (N, 64·2^level, S − 4, S − 4) (valid) or same size
            skips.append(h)
        h = self.dropout(skips.pop())  # end of the contracting path
        for up, block in zip(self.up, self.up_convs):
            h = up(h)  # (N, C/2, 2S, 2S)
            skip = _center_crop(skips.pop(), h.shape[-2], h.shape[-1])  # (N, C/2, 2S, 2S)
            h = block(torch.cat([skip, h], dim=1))  # (N, C/2, 2S − 4, 2S − 4)
        return self.classifier(h)  # (N, K, S_out, S_out)

    def _tile_output_side(self, side: int) -> int:
        """Output side of the tiles for an image side: ``tile_size``'s, or smaller if it covers."""
        depth = self.config.depth
        largest = valid_output_size(self.config.tile_size, depth)
        assert largest is not None
        size = smallest_valid_input(depth)
        while True:
            out = valid_output_size(size, depth)
            assert out is not None
            if out >= side or out >= largest:
                return min(out, largest)
            size += 2**depth

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        height, width = x.shape[-2:]
        if self.config.padding == "same":
            multiple = 2**self.config.depth
            pad_h, pad_w = -height % multiple, -width % multiple
            padded = _mirror_pad(x, 0, pad_w, 0, pad_h)  # (N, C, ⌈H/16⌉·16, ⌈W/16⌉·16)
            return {"out": self.forward_tile(padded)[:, :, :height, :width]}  # (N, K, H, W)
        # Overlap-tile strategy (paper Fig. 2): tiles whose outputs are adjacent and cover x.
        out_h, out_w = self._tile_output_side(height), self._tile_output_side(width)
        rows, cols = math.ceil(height / out_h), math.ceil(width / out_w)
        m = self.margin
        padded = _mirror_pad(x, m, m + cols * out_w - width, m, m + rows * out_h - height)
        row_outputs: list[Tensor] = []
        for i in range(rows):
            tiles: list[Tensor] = []
            for j in range(cols):
                top, left = i * out_h, j * out_w
                tile = padded[:, :, top : top + out_h + 2 * m, left : left + out_w + 2 * m]
                tiles.append(self.forward_tile(tile))  # (N, K, out_h, out_w)
            row_outputs.append(torch.cat(tiles, dim=-1))  # (N, K, out_h, cols·out_w)
        out = torch.cat(row_outputs, dim=-2)  # (N, K, rows·out_h, cols·out_w)
        return {"out": out[:, :, :height, :width]}  # (N, K, H, W)


# --------------------------------------------------------------------------------------------
# Loss weights (paper eq. 2), torch only.
# --------------------------------------------------------------------------------------------


def _shift(x: Tensor, dy: int, dx: int, fill: float | int) -> Tensor:
    """``x`` moved by (dy, dx) on its last two dims, with ``fill`` entering at the border."""
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    height, width = x.shape[-2:]
    return padded[..., 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


def _connected_components(mask: Tensor, foreground: Tensor) -> Tensor:
    """4-connected components of equal-class foreground pixels: (H, W) ids, 0 = none."""
    height, width = mask.shape
    ids = torch.arange(1, height * width + 1, dtype=torch.float64).view(height, width)
    ids = ids * foreground  # (H, W), 0 on background
    mask_f = mask.to(torch.float64)
    while True:
        new = ids
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            same = (_shift(mask_f, dy, dx, -1.0) == mask_f) & foreground
            new = torch.maximum(new, _shift(ids, dy, dx, 0.0) * same)
        if torch.equal(new, ids):
            return ids.to(torch.int64)
        ids = new


def _two_nearest_distances(labels: Tensor, chunk: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Per pixel, Euclidean distances to the nearest and second-nearest labelled region."""
    height, width = labels.shape
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    points = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1).to(torch.float32)  # (HW, 2)
    d1 = torch.full((height * width,), math.inf)
    d2 = torch.full((height * width,), math.inf)
    inside = labels > 0
    # Boundary pixels of each region: those with a 4-neighbour outside it.
    boundary = torch.zeros_like(inside)
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        boundary |= inside & (_shift(labels, dy, dx, 0) != labels)
    for region in labels.unique():
        if region == 0:
            continue
        border = points[(boundary & (labels == region)).reshape(-1)]  # (B, 2)
        dist = torch.empty(height * width)
        step = max(1, chunk // max(1, border.shape[0]))
        for start in range(0, height * width, step):
            block = points[start : start + step]
            dist[start : start + step] = torch.cdist(block, border).amin(dim=1)
        dist[(labels == region).reshape(-1)] = 0.0
        d2 = torch.minimum(d2, torch.maximum(d1, dist))
        d1 = torch.minimum(d1, dist)
    return d1.view(height, width), d2.view(height, width)


def unet_weight_map(
    mask: Tensor,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | Tensor | None = None,
    ignore_index: int = 255,
    *,
    background_index: int = 0,
    instances: Tensor | None = None,
) -> Tensor:
    """Per-pixel loss weights of U-Net (paper eq. 2): w = w_c + w0·exp(−(d1 + d2)² / 2σ²).

    Args:
        mask: class labels, (H, W) or (N, H, W) integers.
        w0, sigma: the border term's scale and width (paper: w0 = 10, σ ≈ 5 pixels).
        class_weights: w_c per class id (length > every label); None balances the frequencies of
            the classes present in ``mask`` (so the mean weight over labelled pixels is 1).
        ignore_index: label whose pixels get weight 0.
        background_index: the class between cells; the border term is added on its pixels.
        instances: optional instance ids of the same shape (0 = none); default: the 4-connected
            components of each non-background class.

    Returns:
        float32 weights with the shape of ``mask``.
    """
    if mask.dim() == 3:
        inst = [None] * mask.shape[0] if instances is None else list(instances)
        return torch.stack(
            [
                unet_weight_map(
                    m,
                    w0,
                    sigma,
                    class_weights,
                    ignore_index,
                    background_index=background_index,
                    instances=i,
                )
                for m, i in zip(mask, inst)
            ]
        )
    if mask.dim() != 2:
        raise ValueError(f"mask must be (H, W) or (N, H, W), got shape {tuple(mask.shape)}")
    if instances is not None and instances.shape != mask.shape:
        raise ValueError(
            f"instances shape {tuple(instances.shape)} differs from mask {tuple(mask.shape)}"
        )
    mask = mask.to(torch.int64).cpu()
    valid = mask != ignore_index
    if class_weights is None:
        labels, counts = mask[valid].unique(return_counts=True)
        table = torch.zeros(int(labels.max()) + 1 if labels.numel() else 1)
        table[labels] = valid.sum() / (labels.numel() * counts.to(torch.float32))
    else:
        table = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
        top = int(mask[valid].max()) if valid.any() else -1
        if top >= table.numel():
            raise ValueError(
                f"class_weights has {table.numel()} entries but the mask has label {top}"
            )
    weights = torch.zeros(mask.shape)
    weights[valid] = table[mask[valid]]
    if instances is None:
        regions = _connected_components(mask, valid & (mask != background_index))
    else:
        regions = instances.to(torch.int64).cpu() * valid
    if w0 and int((regions.unique() > 0).sum()) >= 2:
        d1, d2 = _two_nearest_distances(regions)
        border = w0 * torch.exp(-((d1 + d2) ** 2) / (2 * sigma**2))  # (H, W)
        on_background = valid & (mask == background_index)
        weights[on_background] += border[on_background]
    return weights
