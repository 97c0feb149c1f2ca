"""Segmentation losses: cross-entropy (class and per-pixel weights), OHEM, Dice, U-Net borders.

- ``cross_entropy``: pixels equal to ``ignore_index`` count nowhere; optional class weights
  (``median_frequency_weights``: Eigen & Fergus, ICCV 2015, as used by SegNet §3.4 —
  ``w_c = median_freq / freq_c`` with ``freq_c`` the pixels of class ``c`` divided by the pixels
  of the images where ``c`` is present) and optional per-pixel weights (weighted mean).
- ``ohem_cross_entropy``: online hard example mining as in the PSPNet/OCNet code
  (``OhemCrossEntropy2d``): pixels whose target-class probability exceeds ``thresh`` are dropped,
  unless fewer than ``min_kept`` would remain, in which case the threshold rises to the
  ``min_kept``-th smallest probability.
- ``dice_loss``: soft multi-class Dice over the valid pixels, averaged over the classes present in
  the target (Milletari et al., V-Net, 3DV 2016, generalised to K classes).
- ``unet_border_weights``: U-Net eq. 2 (Ronneberger et al., MICCAI 2015, §3),
  ``w(x) = w_c(x) + w0 · exp(-(d1(x) + d2(x))² / 2σ²)`` with ``d1``/``d2`` the distances to the
  nearest and second-nearest object; computed with SciPy distance transforms on the CPU (in the
  data pipeline) and passed to the loss as per-pixel weights.
- ``total_loss``: the weighted sum over a model's outputs (``model.loss_weights()``); outputs at
  their own resolution (ICNet's cascade at 1/16, 1/8, 1/4) are compared with the label
  downsampled by nearest neighbour, never with upsampled logits.

Deviations: the U-Net class-balancing term ``w_c`` is 1 here (use ``class_weights`` for class
balance), and the border term applies to background pixels only, as in the paper's Fig. 3d.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SegmentationLoss",
    "class_pixel_statistics",
    "cross_entropy",
    "dice_loss",
    "median_frequency_weights",
    "ohem_cross_entropy",
    "resize_labels",
    "total_loss",
    "unet_border_weights",
]


# ---- class weights -----------------------------------------------------------------------------


def class_pixel_statistics(
    masks: Iterable[np.ndarray], num_classes: int, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Per class: pixels of that class, and pixels of the images in which it appears.

    Returns two int64 arrays ``(K,)``. Ignored pixels count in neither; a label outside
    ``[0, K)`` that is not ``ignore_index`` raises ValueError.
    """
    class_pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    for index, mask in enumerate(masks):
        labels = np.asarray(mask).reshape(-1)
        labels = labels[labels != ignore_index].astype(np.int64)
        if labels.size == 0:
            continue
        if labels.max() >= num_classes or labels.min() < 0:
            raise ValueError(
                f"mask {index}: label {int(labels.max())} outside [0, {num_classes}) and not "
                f"ignore_index {ignore_index}"
            )
        counts = np.bincount(labels, minlength=num_classes)
        class_pixels += counts
        image_pixels[counts > 0] += labels.size
    return class_pixels, image_pixels


def median_frequency_weights(class_pixels: np.ndarray, image_pixels: np.ndarray) -> list[float]:
    """Median frequency balancing: ``median(freq) / freq_c``; classes never seen get 1.0."""
    class_pixels = np.asarray(class_pixels, np.float64)
    image_pixels = np.asarray(image_pixels, np.float64)
    present = (class_pixels > 0) & (image_pixels > 0)
    if not present.any():
        raise ValueError("median frequency weights: no labelled pixel in the dataset")
    freq = np.zeros_like(class_pixels)
    freq[present] = class_pixels[present] / image_pixels[present]
    median = float(np.median(freq[present]))
    weights = np.ones_like(freq)
    weights[present] = median / freq[present]
    return [float(w) for w in weights]


# ---- pixel losses ------------------------------------------------------------------------------


def _check(logits: Tensor, target: Tensor, pixel_weights: Tensor | None) -> None:
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError(
            f"expected logits (N, K, H, W) and target (N, H, W), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if logits.shape[0] != target.shape[0] or logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in N, H or W"
        )
    if pixel_weights is not None and pixel_weights.shape != target.shape:
        raise ValueError(
            f"pixel_weights {tuple(pixel_weights.shape)} must match target {tuple(target.shape)}"
        )


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = 255,
    pixel_weights: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy over valid pixels, weighted by class and (optionally) pixel weights.

    The normaliser is the sum of the weights of the valid pixels (PyTorch's convention for class
    weights), so a constant pixel weight changes nothing. All-ignored targets give 0 with a
    gradient path (never NaN).
    """
    _check(logits, target, pixel_weights)
    logits = logits.float()
    target = target.long()
    valid = target != ignore_index  # (N, H, W)
    if pixel_weights is None:
        if not bool(valid.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction="none"
    )  # (N, H, W), class-weighted, 0 where ignored
    pixel_weights = pixel_weights.float() * valid
    if weight is not None:
        class_w = weight.float()[target.clamp(0, logits.shape[1] - 1)]  # (N, H, W)
        norm = (pixel_weights * class_w).sum()
    else:
        norm = pixel_weights.sum()
    if float(norm) <= 0:
        return logits.sum() * 0.0
    return (per_pixel * pixel_weights).sum() / norm


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    weight: Tensor | None = None,
    ignore_index: int = 255,
    pixel_weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over the hard pixels only (see the module docstring)."""
    _check(logits, target, pixel_weights)
    target = target.long()
    valid = target != ignore_index  # (N, H, W)
    num_valid = int(valid.sum())
    kept = valid
    if 0 < min_kept < num_valid or (min_kept == 0 and num_valid > 0):
        with torch.no_grad():
            probs = logits.detach().float().softmax(dim=1)  # (N, K, H, W)
            safe_target = target.masked_fill(~valid, 0)
            target_prob = probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # (N, H, W)
            threshold = thresh
            if min_kept > 0:
                kth = float(target_prob[valid].kthvalue(min(num_valid, min_kept)).values)
                threshold = max(threshold, kth)
            kept = valid & (target_prob <= threshold)
    hard_target = target.masked_fill(~kept, ignore_index)
    return cross_entropy(
        logits, hard_target, weight=weight, ignore_index=ignore_index, pixel_weights=pixel_weights
    )


def dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    smooth: float = 1.0,
    pixel_weights: Tensor | None = None,
) -> Tensor:
    """``1 - mean_c dice_c`` over the classes present in the target; ignored pixels excluded."""
    _check(logits, target, pixel_weights)
    num_classes = logits.shape[1]
    target = target.long()
    valid = (target != ignore_index).unsqueeze(1).float()  # (N, 1, H, W)
    if pixel_weights is not None:
        valid = valid * pixel_weights.float().unsqueeze(1)
    probs = logits.float().softmax(dim=1) * valid  # (N, K, H, W)
    safe_target = target.masked_fill(target == ignore_index, 0)
    one_hot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)  # (K,)
    cardinality = probs.sum(dims) + one_hot.sum(dims)  # (K,)
    dice = (2 * intersection + smooth) / (cardinality + smooth)  # (K,)
    present = one_hot.sum(dims) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    return 1.0 - dice[present].mean()


# ---- U-Net border weights ----------------------------------------------------------------------


def unet_border_weights(
    mask: np.ndarray,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    background: int = 0,
    ignore_index: int = 255,
    instances: np.ndarray | None = None,
    max_objects: int = 256,
) -> np.ndarray:
    """U-Net eq. 2 weight map ``(H, W)`` float32 for one label map (see the module docstring).

    Objects are the instances (``instances`` > 0) when given, else the connected components of
    each non-background class. With fewer than two objects the map is all ones. At most
    ``max_objects`` objects (the largest) are used to bound the cost.
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if instances is not None:
        objects = np.where((mask != ignore_index), np.asarray(instances), 0).astype(np.int64)
    else:
        objects = np.zeros(mask.shape, np.int64)
        next_id = 0
        for cls in np.unique(mask):
            if cls in (background, ignore_index):
                continue
            labelled, count = ndimage.label(mask == cls)
            objects[labelled > 0] = labelled[labelled > 0] + next_id
            next_id += count
    ids, sizes = np.unique(objects[objects > 0], return_counts=True)
    weights = np.ones(mask.shape, np.float32)
    if len(ids) < 2:
        return weights
    ids = ids[np.argsort(-sizes)[:max_objects]]
    nearest = np.full(mask.shape, np.inf)
    second = np.full(mask.shape, np.inf)
    for object_id in ids:
        distance = ndimage.distance_transform_edt(objects != object_id)  # (H, W)
        second = np.minimum(second, np.maximum(nearest, distance))
        nearest = np.minimum(nearest, distance)
    border = w0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma**2))
    is_background = (objects == 0) & (mask != ignore_index)
    weights += np.where(is_background, border, 0.0).astype(np.float32)
    return weights


# ---- combining outputs -------------------------------------------------------------------------


def resize_labels(labels: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of ``(N, H, W)`` labels or weights to ``size``."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest")
    return resized.squeeze(1).to(labels.dtype)  # (N, h, w)


class SegmentationLoss:
    """One pixel loss by name (``ce``, ``ohem``, ``dice``, ``ce+dice``), called per output."""

    def __init__(
        self,
        kind: str = "ce",
        *,
        ignore_index: int = 255,
        class_weights: Tensor | None = None,
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 100_000,
        dice_weight: float = 1.0,
    ) -> None:
        if kind not in ("ce", "ohem", "dice", "ce+dice"):
            raise ValueError(f"unknown loss {kind!r}; valid: ce, ohem, dice, ce+dice")
        self.kind = kind
        self.ignore_index = ignore_index
        self.class_weights = class_weights
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.dice_weight = dice_weight

    def __call__(
        self, logits: Tensor, target: Tensor, pixel_weights: Tensor | None = None
    ) -> Tensor:
        weight = self.class_weights
        if weight is not None and weight.device != logits.device:
            weight = self.class_weights = weight.to(logits.device)
        kw = {"ignore_index": self.ignore_index, "pixel_weights": pixel_weights}
        if self.kind == "ohem":
            return ohem_cross_entropy(
                logits,
                target,
                thresh=self.ohem_thresh,
                min_kept=self.ohem_min_kept,
                weight=weight,
                **kw,
            )
        if self.kind == "dice":
            return dice_loss(logits, target, **kw)
        loss = cross_entropy(logits, target, weight=weight, **kw)
        if self.kind == "ce+dice":
            loss = loss + self.dice_weight * dice_loss(logits, target, **kw)
        return loss


def total_loss(
    outputs: Mapping[str, Tensor],
    target: Tensor,
    loss_weights: Mapping[str, float],
    criterion: Callable[..., Tensor] | None = None,
    *,
    pixel_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of ``criterion`` over the model's outputs, and each term's value.

    Every key of ``loss_weights`` with a non-zero weight must be in ``outputs``. An output whose
    spatial size differs from the target's is compared with the target (and pixel weights)
    resized by nearest neighbour to that output's size.
    """
    criterion = criterion or SegmentationLoss()
    total: Tensor | None = None
    terms: dict[str, float] = {}
    for key, weight in loss_weights.items():
        if weight == 0:
            continue
        if key not in outputs:
            raise KeyError(
                f"loss weight for output {key!r}, but the model returned {sorted(outputs)}"
            )
        logits = outputs[key]
        size = logits.shape[-2:]
        term = criterion(
            logits,
            resize_labels(target, size),
            None if pixel_weights is None else resize_labels(pixel_weights, size),
        )
        terms[key] = float(term.detach())
        total = weight * term if total is None else total + weight * term
    if total is None:
        raise ValueError(f"no output has a non-zero loss weight ({dict(loss_weights)})")
    return total, terms
