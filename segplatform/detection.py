"""Dataset rows → torchvision detection targets, for instance models (``mask_rcnn``).

A dataset row carries a semantic ``mask`` (H, W) and, optionally, an ``instances`` map (H, W) of
instance ids (0 = none). ``targets_from_masks`` turns them into the target dict torchvision's
Mask R-CNN trains on: ``boxes`` (N, 4) float32 xyxy in pixel-edge coordinates (a one-pixel object
at column x spans x..x+1), ``labels`` (N,) int64 (our class ids; class 0 is the background and
never an instance) and ``masks`` (N, H, W) uint8.

- With ``instances``: one instance per non-zero id; its label is the most frequent semantic class
  under it, background and ignore pixels not counted (ties: the smaller class id). Ids that cover
  only background/ignore pixels are dropped.
- Without: each connected component of each foreground class is an instance (8-connected by
  default; ``connectivity=1`` for 4-connected), which is how a dataset with only semantic masks
  trains an instance model.

Ignore pixels (``ignore_index``) never belong to an instance mask. Instances smaller than
``min_area`` pixels are dropped. An image without instances gives empty targets of shapes (0, 4),
(0,) and (0, H, W), which torchvision accepts (the image then only teaches "background").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["empty_targets", "targets_from_masks", "targets_from_row"]


def empty_targets(height: int, width: int) -> dict[str, Tensor]:
    """Targets of an image without instances."""
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, height, width), dtype=torch.uint8),
    }


def _as_array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array


def _stack(
    instance_masks: list[np.ndarray], labels: list[int], height: int, width: int
) -> dict[str, Tensor]:
    if not instance_masks:
        return empty_targets(height, width)
    masks = np.stack(instance_masks)  # (N, H, W) bool
    boxes = np.zeros((len(instance_masks), 4), dtype=np.float32)
    for i, instance in enumerate(instance_masks):
        rows = np.flatnonzero(instance.any(axis=1))
        cols = np.flatnonzero(instance.any(axis=0))
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)  # pixel edges: width >= 1
    return {
        "boxes": torch.from_numpy(boxes),  # (N, 4) xyxy
        "labels": torch.tensor(labels, dtype=torch.int64),  # (N,)
        "masks": torch.from_numpy(masks.astype(np.uint8)),  # (N, H, W)
    }


def targets_from_masks(
    mask: Any,
    instances: Any | None = None,
    *,
    ignore_index: int = 255,
    min_area: int = 1,
    connectivity: int = 2,
    background: int = 0,
) -> dict[str, Tensor]:
    """Boxes, labels and masks of the instances in one row (see the module docstring).

    Args:
        mask: (H, W) integer semantic labels (numpy or torch).
        instances: (H, W) integer instance ids, 0 = no instance; None → connected components.
        ignore_index: label of pixels that belong to no class (excluded from every instance).
        min_area: instances with fewer pixels are dropped.
        connectivity: 1 (4-connected) or 2 (8-connected) components when ``instances`` is None.
        background: the background class (never an instance).
    """
    semantic = _as_array("mask", mask)
    height, width = semantic.shape
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1, got {min_area}")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    valid = (semantic != ignore_index) & (semantic != background)  # (H, W) foreground pixels
    instance_masks: list[np.ndarray] = []
    labels: list[int] = []
    if instances is not None:
        ids = _as_array("instances", instances)
        if ids.shape != semantic.shape:
            raise ValueError(
                f"instances has shape {ids.shape} but mask has {semantic.shape}; they must match"
            )
        for instance_id in np.unique(ids):
            if instance_id == 0:
                continue
            region = ids == instance_id  # (H, W)
            classes = semantic[region & valid]
            if classes.size == 0:
                continue
            values, counts = np.unique(classes, return_counts=True)
            instance = region & (semantic != ignore_index)
            if int(instance.sum()) < min_area:
                continue
            instance_masks.append(instance)
            labels.append(int(values[np.argmax(counts)]))
        return _stack(instance_masks, labels, height, width)

    from scipy import ndimage  # in the "data" extra; imported only for component labelling

    structure = ndimage.generate_binary_structure(2, connectivity)
    for class_id in np.unique(semantic[valid]):
        components, count = ndimage.label(semantic == class_id, structure=structure)
        for component in range(1, count + 1):
            instance = components == component  # (H, W)
            if int(instance.sum()) < min_area:
                continue
            instance_masks.append(instance)
            labels.append(int(class_id))
    return _stack(instance_masks, labels, height, width)


def targets_from_row(
    row: dict[str, Any], *, ignore_index: int = 255, min_area: int = 1
) -> dict[str, Tensor]:
    """Targets of a decoded dataset row: its ``mask`` and optional ``instances`` (iter_samples)."""
    if "mask" not in row:
        raise ValueError(f"row {row.get('id', '?')!r} has no 'mask' (keys: {sorted(row)})")
    try:
        return targets_from_masks(
            row["mask"], row.get("instances"), ignore_index=ignore_index, min_area=min_area
        )
    except ValueError as error:
        raise ValueError(f"row {row.get('id', '?')!r}: {error}") from None
