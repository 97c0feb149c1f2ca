"""Joint image + mask augmentation (torchvision.transforms.v2 with ``tv_tensors.Mask``).

Training (``TrainTransform``), in order:

1. random rescale by a factor drawn uniformly from ``scale_range`` (image bilinear with
   antialiasing, mask nearest: v2 picks the kernel from the tensor type);
2. random crop to ``crop_size``; an image smaller than the crop is padded first, the image with 0
   and the mask with ``ignore_index``, so padding never counts in the loss or the metrics;
3. horizontal flip with probability 0.5;
4. colour jitter of brightness, contrast and saturation (the image only; masks pass through);
5. conversion to float in [0, 1] and per-channel normalization.

Evaluation (``EvalTransform``) only converts and normalizes: no resizing, so metrics are counted
at the label's own resolution.

Inputs are decoded uint8 arrays ``(H, W)`` or ``(H, W, C)`` and label maps ``(H, W)``; grey images
are repeated to the model's ``in_channels`` and RGB images given to a 1-channel model become luma
(ITU-R 601, as ``segplatform.inference.to_tensor``). An optional instance-id map (Mask R-CNN)
goes through the same geometry; padded pixels get instance 0 (none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["EvalTransform", "RandomScale", "TrainTransform", "image_to_tensor"]

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def image_to_tensor(image: np.ndarray, in_channels: int, *, source: str = "image") -> Tensor:
    """A uint8 ``(H, W)`` / ``(H, W, C)`` array as a uint8 ``(in_channels, H, W)`` tensor."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"{source}: expected an (H, W) or (H, W, C) image, got {array.shape}")
    if array.shape[2] == 4:  # RGBA: the alpha channel carries no class information
        array = array[:, :, :3]
    tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)  # (C, H, W)
    channels = tensor.shape[0]
    if channels == in_channels:
        return tensor
    if channels == 1:
        return tensor.expand(in_channels, -1, -1).contiguous()  # (in_channels, H, W)
    if channels == 3 and in_channels == 1:
        luma = (tensor.float() * _LUMA).sum(0, keepdim=True)  # (1, H, W)
        return luma.round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"{source}: image has {channels} channels; the model takes {in_channels}")


class RandomScale(v2.Transform):
    """Resize every input by one factor drawn uniformly from ``scale_range``."""

    def __init__(self, scale_range: Sequence[float]) -> None:
        super().__init__()
        self.low, self.high = float(scale_range[0]), float(scale_range[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"] == list(inpt.shape[-2:]):
            return inpt
        return TF.resize(inpt, params["size"], antialias=True)  # masks: nearest


class _Base:
    """Shared conversion: numpy inputs → tv_tensors, and the final dtype + normalization."""

    def __init__(
        self,
        *,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        ignore_index: int,
    ) -> None:
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"normalization has {len(mean)} means / {len(std)} stds for {in_channels} channels"
            )
        self.in_channels = in_channels
        self.ignore_index = ignore_index
        self.finish = v2.Compose(
            [
                v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )

    def _inputs(
        self, image: np.ndarray, mask: np.ndarray, instances: np.ndarray | None, source: str
    ) -> list[Any]:
        tensor = image_to_tensor(image, self.in_channels, source=source)
        mask_array = np.asarray(mask)
        if mask_array.shape != tuple(tensor.shape[-2:]):
            raise ValueError(
                f"{source}: mask {mask_array.shape} and image {tuple(tensor.shape[-2:])} differ"
            )
        inputs: list[Any] = [
            tv_tensors.Image(tensor),
            tv_tensors.Mask(torch.from_numpy(mask_array.astype(np.int64))),  # (H, W)
        ]
        if instances is not None:
            inputs.append(tv_tensors.Mask(torch.from_numpy(np.asarray(instances, np.int64))))
        return inputs


class TrainTransform(_Base):
    """Training augmentation (see the module docstring); returns float image and int64 mask."""

    def __init__(
        self,
        *,
        crop_size: Sequence[int],
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: bool = True,
        color_jitter: float = 0.0,
        in_channels: int = 3,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        ignore_index: int = 255,
    ) -> None:
        super().__init__(in_channels=in_channels, mean=mean, std=std, ignore_index=ignore_index)
        steps: list[v2.Transform] = []
        if tuple(scale_range) != (1.0, 1.0):
            steps.append(RandomScale(scale_range))
        steps.append(
            v2.RandomCrop(
                tuple(crop_size),
                pad_if_needed=True,
                fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index},
            )
        )
        if hflip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        if color_jitter > 0:
            jitter = color_jitter
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        self.geometry = v2.Compose(steps)

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        instances: np.ndarray | None = None,
        *,
        source: str = "sample",
    ) -> tuple[Tensor, ...]:
        """``(image (C, h, w) float, mask (h, w) int64[, instances (h, w) int64])``."""
        outputs = self.geometry(*self._inputs(image, mask, instances, source))
        image_t = self.finish(outputs[0]).as_subclass(Tensor)  # (C, h, w) float32
        mask_t = outputs[1].as_subclass(Tensor)
        if instances is None:
            return image_t, mask_t
        # Padding filled the instance map with ignore_index like the mask: no instance there.
        instances_t = outputs[2].as_subclass(Tensor)
        instances_t = torch.where(mask_t == self.ignore_index, 0, instances_t)
        return image_t, mask_t, instances_t


class EvalTransform(_Base):
    """Evaluation: conversion and normalization only (the label keeps its resolution)."""

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        instances: np.ndarray | None = None,
        *,
        source: str = "sample",
    ) -> tuple[Tensor, ...]:
        inputs = self._inputs(image, mask, instances, source)
        image_t = self.finish(inputs[0]).as_subclass(Tensor)  # (C, H, W) float32
        rest = tuple(t.as_subclass(Tensor) for t in inputs[1:])
        return (image_t, *rest)
