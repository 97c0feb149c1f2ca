"""Colour label maps, overlays and indexed PNG masks, shared by previews, MLflow and serving."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE_COLOUR = (255, 255, 255)  # ignored pixels in a colour-coded label map
IGNORE_STRIPES = ((255, 255, 255), (255, 0, 255))  # ignored pixels in overlays: stripes


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
    background: int | None = None,
) -> np.ndarray:
    """``image`` blended with the palette colour of each label: (H, W, 3) uint8.

    Pixel = round((1 - alpha) * image + alpha * colour). Ignored pixels are drawn opaque in
    diagonal white/magenta stripes; labels without a palette entry, and ``background`` pixels
    when ``background`` is given, are left unblended.
    """
    rgb = as_rgb(image)
    labels = labels.astype(np.intp)
    table = np.zeros((max(len(palette), int(labels.max(initial=0)) + 1), 3), np.float32)
    table[: len(palette)] = np.asarray(palette, np.float32).reshape(-1, 3)
    colours = table[labels]  # (H, W, 3)
    out = np.rint((1.0 - alpha) * rgb.astype(np.float32) + alpha * colours)
    out = out.clip(0, 255).astype(np.uint8)  # (H, W, 3)
    clear = labels >= len(palette)
    if background is not None:
        clear |= labels == background
    out[clear] = rgb[clear]
    ignore = labels == ignore_index
    if ignore.any():
        rows, cols = np.indices(labels.shape)
        stripe = ((rows + cols) // 4) % 2 == 0  # (H, W)
        out[ignore & stripe] = IGNORE_STRIPES[0]
        out[ignore & ~stripe] = IGNORE_STRIPES[1]
    return out


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
