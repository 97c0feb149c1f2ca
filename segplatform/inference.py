"""Inference recipes shared by validation, ``segplatform evaluate``/``predict`` and serving.

A recipe says how a trained network is applied to an image:

- ``whole``: one forward pass over the full image;
- ``slide``: overlapping ``crop_size`` windows with ``stride``, probabilities averaged where
  windows overlap (the PSPNet / DeepLab evaluation protocol for large images);
- ``flip``: the horizontally flipped image is predicted too and the flipped-back probabilities
  averaged in;
- ``scales``: the image is resized by each factor, predicted, and the probabilities resized back
  and averaged (multi-scale testing, DeepLab v2 §4, PSPNet §5);
- ``crf``: the fully connected CRF (``segplatform.crf``) refines the averaged probabilities, as
  DeepLab v1/v2 do (§3.3/§3.2).

Probabilities are softmax outputs at the input's resolution. Instance models (``task ==
"instance"``, Mask R-CNN) go through ``detections_to_semantic``; their "probabilities" are the
one-hot label map, so every recipe step except CRF still composes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("whole", "slide")


@dataclass(frozen=True)
class InferenceRecipe:
    """How to turn a network into a label map (see the module docstring)."""

    mode: str = "whole"  # "whole" or "slide"
    crop_size: tuple[int, int] | None = None  # slide window (H, W); required for "slide"
    stride: tuple[int, int] | None = None  # slide step <= crop_size; default two thirds of it
    flip: bool = False  # add the horizontally flipped prediction
    scales: tuple[float, ...] = (1.0,)  # resize factors, predictions averaged
    crf: bool = False  # dense CRF on the averaged probabilities (needs the `crf` extra)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "slide" and self.crop_size is None:
            raise ValueError("mode 'slide' needs crop_size")
        for name in ("crop_size", "stride"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(int(v) for v in value)
                if len(value) != 2 or min(value) < 1:
                    raise ValueError(f"{name} must be two positive ints, got {value}")
                object.__setattr__(self, name, value)
        crop, stride = self.crop_size, self.stride
        if crop is not None and stride is not None and (stride[0] > crop[0] or stride[1] > crop[1]):
            raise ValueError(
                f"stride {stride} must not exceed crop_size {crop}: "
                "windows would leave pixels between them unpredicted"
            )
        scales = tuple(float(s) for s in self.scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive numbers, got {self.scales}")
        object.__setattr__(self, "scales", scales)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> InferenceRecipe:
        data = dict(data or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown inference option(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)


def is_instance_model(model: nn.Module) -> bool:
    return getattr(model, "task", "semantic") == "instance"


def _forward_probs(model: nn.Module, images: Tensor, num_classes: int) -> Tensor:
    """Softmax probabilities (N, K, H, W) of one forward pass."""
    if is_instance_model(model):
        from architectures.mask_rcnn import detections_to_semantic

        detections = model(list(images))
        maps = [detections_to_semantic(d, tuple(images.shape[-2:])) for d in detections]
        labels = torch.stack(maps).to(images.device)  # (N, H, W)
        return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
    logits = model(images)["out"]  # (N, K, H, W)
    return logits.float().softmax(dim=1)


def _slide_probs(
    model: nn.Module, images: Tensor, num_classes: int, crop: tuple[int, int], stride
) -> Tensor:
    """Average of window probabilities; the image is zero-padded (the mean after normalizing)."""
    n, _, height, width = images.shape
    crop_h, crop_w = crop
    stride_h, stride_w = stride or (max(1, crop_h * 2 // 3), max(1, crop_w * 2 // 3))
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h))
    full_h, full_w = padded.shape[-2:]
    rows = max(math.ceil((full_h - crop_h) / stride_h), 0) + 1
    cols = max(math.ceil((full_w - crop_w) / stride_w), 0) + 1
    total = images.new_zeros((n, num_classes, full_h, full_w))
    count = images.new_zeros((1, 1, full_h, full_w))
    for row in range(rows):
        for col in range(cols):
            top = min(row * stride_h, full_h - crop_h)
            left = min(col * stride_w, full_w - crop_w)
            window = padded[:, :, top : top + crop_h, left : left + crop_w]
            total[:, :, top : top + crop_h, left : left + crop_w] += _forward_probs(
                model, window, num_classes
            )
            count[:, :, top : top + crop_h, left : left + crop_w] += 1
    return (total / count)[:, :, :height, :width]


# Architectures whose inference is slower with channels-last (NHWC) weights, by device type:
# PSPNet R-50 on 2 CPU cores 0.95-0.99x at 256x256 and on an H200 3.4x slower at 1024x2048
# (the layout conversions around its pyramid pooling); ICNet on the H200 fp32 1.1x slower.
# Every other semantic network ran 1.0-1.3x faster on the CPU in a one-off loop over the paper
# configurations at 256x256 (BENCHMARKS.md, P4 notes; the P4 rows time U-Net and DeepLab v3).
CHANNELS_LAST_SLOWER: dict[str, frozenset[str]] = {
    "cpu": frozenset({"pspnet"}),
    "cuda": frozenset({"pspnet", "icnet"}),
}


def inference_memory_format(architecture: str, device: str | torch.device) -> torch.memory_format:
    """The weight layout the inference path gives ``architecture`` on ``device``: channels-last
    where it was measured faster, contiguous (NCHW) elsewhere and for instance models.

    Convolutions take the layout of their weights, so NCHW images need no conversion; the
    numbers only change by float reordering (labels agreed on every pixel of every model).
    """
    slower = CHANNELS_LAST_SLOWER.get(torch.device(device).type)  # None: a device not measured
    if slower is None or architecture in slower or architecture == "mask_rcnn":
        return torch.contiguous_format
    return torch.channels_last


@torch.inference_mode()
def predict_probs(
    model: nn.Module, images: Tensor, recipe: InferenceRecipe, *, num_classes: int
) -> Tensor:
    """Class probabilities (N, K, H, W) for normalized ``images`` (N, C, H, W) under ``recipe``.

    The CRF step is not applied here (it needs the original pixels): see ``segment``.
    """
    height, width = images.shape[-2:]
    total = None
    for scale in recipe.scales:
        scaled = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        variants = [scaled, scaled.flip(-1)] if recipe.flip else [scaled]
        for index, variant in enumerate(variants):
            if recipe.mode == "slide":
                probs = _slide_probs(model, variant, num_classes, recipe.crop_size, recipe.stride)
            else:
                probs = _forward_probs(model, variant, num_classes)
            if index == 1:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (height, width):
                probs = F.interpolate(
                    probs, size=(height, width), mode="bilinear", align_corners=False
                )
            total = probs if total is None else total + probs
    count = len(recipe.scales) * (2 if recipe.flip else 1)
    return total / count


def to_tensor(
    image: np.ndarray, *, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """A uint8 image (H, W) or (H, W, C) as a normalized float tensor (1, in_channels, H, W).

    Grey images are repeated to ``in_channels``; RGB given to a 1-channel model is converted with
    ITU-R 601 luma weights (as Pillow's ``convert("L")``).
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 4:
        array = array[:, :, :3]
    tensor = torch.tensor(array).permute(2, 0, 1).float() / 255.0  # copies: input may be read-only
    channels = tensor.shape[0]
    if channels == 1 and in_channels > 1:
        tensor = tensor.expand(in_channels, -1, -1)
    elif channels == 3 and in_channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        tensor = (tensor * weights).sum(0, keepdim=True)
    elif channels != in_channels:
        raise ValueError(f"image has {channels} channels; the model takes {in_channels}")
    mean_t = torch.tensor(list(mean)[:in_channels], dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(list(std)[:in_channels], dtype=torch.float32).view(-1, 1, 1)
    if mean_t.numel() == 1 and in_channels > 1:
        mean_t, std_t = mean_t.expand(in_channels, 1, 1), std_t.expand(in_channels, 1, 1)
    return ((tensor - mean_t) / std_t).unsqueeze(0)


def segment(
    model: nn.Module,
    image: np.ndarray,
    *,
    recipe: InferenceRecipe,
    num_classes: int,
    in_channels: int,
    normalization: dict[str, Sequence[float]],
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (H, W) uint8/uint16 and probabilities (K, H, W) float32 for one uint8 image."""
    tensor = to_tensor(
        image, in_channels=in_channels, mean=normalization["mean"], std=normalization["std"]
    ).to(device)
    probs = predict_probs(model, tensor, recipe, num_classes=num_classes)[0].cpu().numpy()
    if recipe.crf:
        from segplatform.crf import dense_crf

        rgb = np.asarray(image)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[:, :, None], 3, axis=2)
        labels = dense_crf(np.ascontiguousarray(rgb[:, :, :3]), probs)
    else:
        labels = probs.argmax(axis=0)
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    return labels.astype(dtype), probs.astype(np.float32)
