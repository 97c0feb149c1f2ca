"""Response bodies of ``POST /v1/segment``: indexed PNG, JSON with areas and RLE, overlay PNG.

- ``png``: an 8-bit palette PNG of the label map at the input's size, palette from the model
  (``segplatform.visualize.indexed_png``): viewers show colours, readers get class ids.
- ``json``: model name and version, image size, per-class pixel counts and fractions, and one
  COCO run-length encoding per class present (``pycocotools.mask.encode``: column-major runs,
  ``counts`` as the compressed ASCII string; ``pycocotools.mask.decode`` reads it back).
- ``overlay``: the image blended with the class colours (``segplatform.visualize.overlay``)
  above a legend of the classes present (``segplatform.visualize.legend``), its text in
  proportion to the picture's width (at least 14 px). An image narrower than ``DISPLAY_WIDTH``
  is enlarged first by a whole factor (each pixel a sharp square; at most
  ``MAX_DISPLAY_PIXELS`` in all), so that a small image and its legend read at the same scale
  wherever the picture is shown.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from segplatform.serve.model import ServedModel
from segplatform.visualize import indexed_png, legend, overlay, png_bytes

FORMATS = ("png", "json", "overlay")
DISPLAY_WIDTH = 512  # overlays of narrower images are enlarged to about this width
MAX_DISPLAY_PIXELS = 4 << 20  # ... but never past this many pixels


def mask_png(served: ServedModel, labels: np.ndarray) -> bytes:
    return indexed_png(labels, served.meta.palette)


def areas_json(served: ServedModel, labels: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as coco_mask

    meta = served.meta
    height, width = labels.shape
    total = float(height * width)
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=meta.num_classes)
    classes = []
    masks = []
    for class_id, name in enumerate(meta.classes):
        pixels = int(counts[class_id])
        classes.append({"id": class_id, "name": name, "pixels": pixels, "fraction": pixels / total})
        if pixels:
            binary = np.asfortranarray((labels == class_id).astype(np.uint8))
            rle = coco_mask.encode(binary)
            masks.append(
                {
                    "id": class_id,
                    "name": name,
                    "rle": {
                        "size": [int(v) for v in rle["size"]],
                        "counts": rle["counts"].decode(),
                    },
                }
            )
    return {
        "model": {
            "name": served.ref.name,
            "version": served.version,
            "architecture": meta.architecture,
        },
        "width": int(width),
        "height": int(height),
        "classes": classes,
        "masks": masks,
    }


def display_scale(height: int, width: int) -> int:
    """The whole factor an overlay of ``height`` x ``width`` pixels is enlarged by (1: none)."""
    wanted = math.ceil(DISPLAY_WIDTH / max(width, 1))
    room = math.isqrt(MAX_DISPLAY_PIXELS // max(height * width, 1))
    return max(1, min(wanted, room))


def overlay_png(served: ServedModel, image: np.ndarray, labels: np.ndarray) -> bytes:
    meta = served.meta
    blended = overlay(image, labels, meta.palette, ignore_index=meta.ignore_index)
    scale = display_scale(*blended.shape[:2])
    if scale > 1:  # (H * scale, W * scale, 3): nearest neighbour, the pixels stay sharp
        blended = np.repeat(np.repeat(blended, scale, axis=0), scale, axis=1)
    present = [int(c) for c in np.unique(labels) if int(c) < meta.num_classes]
    names = [meta.classes[c] for c in present] or list(meta.classes)
    colours = [meta.palette[c] for c in present] or list(meta.palette)
    width = max(blended.shape[1], 160)
    # Text in proportion to the picture: as legible as the image wherever it is scaled to fit.
    band = legend(names, colours, width, font_size=max(14, width // 40))
    if band.shape[1] != blended.shape[1]:  # a narrow image: pad it to the legend's width
        padded = np.full((blended.shape[0], band.shape[1], 3), 255, np.uint8)
        padded[:, : blended.shape[1]] = blended
        blended = padded
    return png_bytes(np.concatenate([blended, band], axis=0))
