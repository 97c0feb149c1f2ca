"""Colour label maps, overlays and indexed PNG masks, shared by previews, MLflow and serving."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE_COLOUR = (255, 255, 255)  # how ignored pixels are drawn


def palette_array(palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """A (max(K, ignore_index + 1), 3) uint8 lookup table; unused ids are black."""
    size = max(len(palette), ignore_index + 1, 256)
    table = np.zeros((size, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    if ignore_index >= len(palette):
        table[ignore_index] = IGNORE_COLOUR
    return table


def colorize(
    labels: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255
) -> np.ndarray:
    """RGB image (H, W, 3) uint8 of a label map (H, W)."""
    table = palette_array(palette, ignore_index)
    return table[np.clip(labels.astype(np.int64), 0, len(table) - 1)]


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as RGB (H, W, 3)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3].astype(np.uint8))


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: Sequence[Sequence[int]],
    *,
    alpha: float = 0.5,
    ignore_index: int = 255,
    background: int | None = 0,
) -> np.ndarray:
    """The label colours blended over ``image`` (RGB uint8); ``background`` pixels stay clear."""
    rgb = as_rgb(image).astype(np.float32)
    colours = colorize(labels, palette, ignore_index).astype(np.float32)
    weight = np.full(labels.shape, alpha, np.float32)
    if background is not None:
        weight[labels == background] = 0.0
    weight = weight[:, :, None]
    return (rgb * (1 - weight) + colours * weight).round().astype(np.uint8)


def indexed_png(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """An 8-bit palette PNG of a label map (ids < 256): viewers show colours, readers get ids."""
    if labels.size and int(labels.max()) > 255:
        # More than 256 classes: a 16-bit grey PNG of the ids (no palette possible).
        image = Image.fromarray(labels.astype(np.uint16))
    else:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        flat = palette_array(palette)[:256].reshape(-1).tolist()
        image.putpalette(flat)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(as_rgb(image)).save(buffer, format="PNG")
    return buffer.getvalue()
