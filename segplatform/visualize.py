"""Colour label maps, overlays and indexed PNG masks, shared by previews, MLflow and serving."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def legend(
    classes: Sequence[str], palette: Sequence[Sequence[int]], width: int, *, font_size: int = 14
) -> np.ndarray:
    """A white band (h, width, 3) of colour swatches with the class names, wrapped to ``width``."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch, gap, pad = font_size, 6, 8
    entries = [(name, int(probe.textlength(name, font=font))) for name in classes]
    lines: list[list[tuple[int, str]]] = [[]]
    x = pad
    for index, (name, text_width) in enumerate(entries):
        item = swatch + 4 + text_width + 3 * gap
        if lines[-1] and x + item > width - pad:
            lines.append([])
            x = pad
        lines[-1].append((index, name))
        x += item
    line_height = font_size + 2 * gap
    band = Image.new("RGB", (width, pad + line_height * len(lines)), "white")
    draw = ImageDraw.Draw(band)
    for row, line in enumerate(lines):
        x, y = pad, pad // 2 + row * line_height + gap
        for index, name in line:
            colour = tuple(int(c) for c in palette[index])
            draw.rectangle([x, y, x + swatch, y + swatch], fill=colour, outline=(0, 0, 0))
            draw.text((x + swatch + 4, y - 1), name, fill=(0, 0, 0), font=font)
            x += swatch + 4 + int(probe.textlength(name, font=font)) + 3 * gap
    return np.asarray(band)


def comparison_grid(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    *,
    ignore_index: int = 255,
    min_height: int = 256,
    titles: Sequence[str] = ("image", "ground truth", "prediction"),
) -> np.ndarray:
    """Rows of image | ground truth overlay | prediction overlay, titled, with a class legend.

    Each row is ``(image, truth labels, predicted labels)``. Small images are enlarged by an
    integer factor (nearest neighbour: label edges stay sharp) to at least ``min_height`` pixels.
    Returns an RGB (H, W, 3) uint8 picture.
    """
    cells = []
    for image, truth, predicted in rows:
        rgb = as_rgb(image)
        cells.append(
            [
                rgb,
                overlay(rgb, truth, palette, ignore_index=ignore_index),
                overlay(rgb, predicted, palette, ignore_index=ignore_index),
            ]
        )
    height = max(cell[0].shape[0] for cell in cells)
    factor = max(1, -(-min_height // max(height, 1)))  # ceil
    cell_h = factor * height
    cell_w = factor * max(cell[0].shape[1] for cell in cells)
    gap = 4
    strips = []
    for cell in cells:
        parts = []
        for part in cell:
            big = np.kron(part, np.ones((factor, factor, 1), np.uint8))
            top, left = (cell_h - big.shape[0]) // 2, (cell_w - big.shape[1]) // 2
            framed = np.full((cell_h, cell_w + gap, 3), 255, np.uint8)  # columns line up
            framed[top : top + big.shape[0], left : left + big.shape[1]] = big
            parts.append(framed)
        strip = np.concatenate(parts, axis=1)
        strips.append(np.pad(strip, ((0, gap), (0, 0), (0, 0)), constant_values=255))
    width = strips[0].shape[1]
    header = Image.new("RGB", (width, 24), "white")
    draw = ImageDraw.Draw(header)
    for i, title in enumerate(titles):
        draw.text((i * (cell_w + gap) + 6, 4), title, fill=(0, 0, 0), font=_font(14))
    return np.concatenate([np.asarray(header), *strips, legend(classes, palette, width)], axis=0)
