"""Convert a folder of images and masks, matched by file stem, to the dataset format.

Accepted layouts (``src`` is the folder)::

    src/images/a.jpg  src/masks/a.png                 one split ("train", or --val-fraction)
    src/images/train/a.jpg  src/masks/train/a.png     splits from subfolders
    src/train/images/a.jpg  src/train/masks/a.png     splits from subfolders

or explicit ``images_dir`` and ``masks_dir``. Masks are PNGs holding either label ids (grey
8/16-bit, or palette-mode PNGs whose indices are the ids, as in PASCAL VOC) or colours (RGB PNGs)
mapped to ids through the class map. The class map is a JSON file::

    {"classes": ["background", "road", ...], "palette": [[0, 0, 0], [128, 64, 128], ...],
     "ignore_index": 255, "ignore_colors": [[255, 255, 255]]}

(``ignore_index`` and ``ignore_colors`` optional). With ``val_fraction`` the split of each sample is
fixed by a hash of its id (the same id always lands in the same split). Bad samples (unreadable or
truncated image, size mismatch, labels or colours outside the class map, missing mask or image)
stop the conversion, naming the file, and nothing is left at the destination; with
``skip_bad=True`` they are skipped and listed in the report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from segplatform.data.convert import write_samples
from segplatform.data.format import (
    BadSampleError,
    ConvertReport,
    DatasetError,
    DatasetInfo,
    Sample,
    default_palette,
)

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)
MASK_SUFFIXES: frozenset[str] = frozenset({".png"})
MaskMode = Literal["auto", "ids", "colors"]


@dataclass(frozen=True)
class ClassMap:
    """Class names, their colours and how unlabelled pixels are marked."""

    classes: tuple[str, ...]  # class names; label i is classes[i]
    palette: tuple[tuple[int, int, int], ...]  # colour of each class (colour masks map through it)
    ignore_index: int = 255  # label of unlabelled pixels
    ignore_colors: tuple[tuple[int, int, int], ...] = ()  # colours mapped to ignore_index


def load_class_map(path: str | os.PathLike[str]) -> ClassMap:
    """Read a class-map JSON file; DatasetError naming the file and field if it is bad."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DatasetError(f"{path}: class map cannot be read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: class map is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise DatasetError(f"{path}: class map needs a 'classes' list")
    classes = tuple(data["classes"])
    palette = data.get("palette")
    if palette is None:
        palette = default_palette(len(classes))
    try:
        palette = tuple(tuple(int(v) for v in colour) for colour in palette)
        ignore_colors = tuple(tuple(int(v) for v in c) for c in data.get("ignore_colors", []))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: 'palette'/'ignore_colors' must be lists of [r, g, b]") from exc
    if len(set(palette)) != len(palette):
        raise DatasetError(f"{path}: palette colours must be unique (colour masks map by colour)")
    class_map = ClassMap(classes, palette, int(data.get("ignore_index", 255)), ignore_colors)
    try:  # the same checks the manifest gets
        DatasetInfo("check", class_map.classes, class_map.palette, class_map.ignore_index)
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from exc
    return class_map


def colors_to_labels(rgb: np.ndarray, class_map: ClassMap, source: str) -> np.ndarray:
    """Map a (H, W, 3) colour mask to (H, W) labels; BadSampleError on a colour not in the map."""
    packed = (
        rgb[..., 0].astype(np.uint32) << 16 | rgb[..., 1].astype(np.uint32) << 8 | rgb[..., 2]
    )  # (H, W)
    lookup = {(r << 16) | (g << 8) | b: index for index, (r, g, b) in enumerate(class_map.palette)}
    for r, g, b in class_map.ignore_colors:
        lookup[(r << 16) | (g << 8) | b] = class_map.ignore_index
    colours, inverse = np.unique(packed, return_inverse=True)
    unknown = [int(c) for c in colours if int(c) not in lookup]
    if unknown:
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown[:5])
        raise BadSampleError(
            source,
            f"mask colour(s) {shown}{' ...' if len(unknown) > 5 else ''} are not in the class map",
        )
    dtype = np.uint8 if class_map.ignore_index <= 255 else np.uint16
    mapped = np.array([lookup[int(c)] for c in colours], dtype=dtype)
    return mapped[inverse.reshape(packed.shape)]  # (H, W)


def read_mask(path: Path, class_map: ClassMap, mask_mode: MaskMode = "auto") -> np.ndarray:
    """Decode a mask PNG to (H, W) labels; BadSampleError naming the file if it cannot be used."""
    try:
        with Image.open(path) as image:
            image.load()  # truncated files fail here
            mode = image.mode
            if mask_mode == "colors" or (mask_mode == "auto" and mode in ("RGB", "RGBA")):
                rgb = np.asarray(image.convert("RGB"))  # (H, W, 3)
                return colors_to_labels(rgb, class_map, str(path))
            if mode in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                labels = np.asarray(image)  # (H, W)
            elif mode in ("RGB", "RGBA"):
                raise BadSampleError(
                    str(path), f"mask is a colour ({mode}) PNG but mask_mode is {mask_mode!r}"
                )
            else:
                raise BadSampleError(str(path), f"unsupported mask mode {mode!r}")
    except BadSampleError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise BadSampleError(
            str(path), f"mask cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    if labels.dtype not in (np.uint8, np.uint16):
        if labels.min() < 0 or labels.max() > 65535:
            raise BadSampleError(str(path), f"mask labels {labels.min()}..{labels.max()} overflow")
        labels = labels.astype(np.uint16)
    return labels


def split_for(sample_id: str, val_fraction: float) -> str:
    """ "val" for a stable ``val_fraction`` share of ids (by SHA-1 of the id), else "train"."""
    digest = hashlib.sha1(sample_id.encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _files(directory: Path, suffixes: frozenset[str]) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover(
    src: Path | None, images_dir: Path | None, masks_dir: Path | None
) -> list[tuple[str | None, Path, Path]]:
    """(split or None, images dir, masks dir) per split; DatasetError for a wrong layout."""
    if images_dir is not None or masks_dir is not None:
        if images_dir is None or masks_dir is None:
            raise DatasetError("give both images_dir and masks_dir (or neither)")
        pairs = [(None, Path(images_dir), Path(masks_dir))]
    else:
        if src is None:
            raise DatasetError("give a source folder or images_dir and masks_dir")
        src = Path(src)
        if not src.is_dir():
            raise DatasetError(f"{src}: source folder does not exist or is not a directory")
        images, masks = src / "images", src / "masks"
        if images.is_dir() and masks.is_dir():
            image_splits = _subdirs(images)
            if image_splits and not _files(images, IMAGE_SUFFIXES):
                pairs = [(d.name, d, masks / d.name) for d in image_splits]
            else:
                pairs = [(None, images, masks)]
        else:
            split_dirs = [d for d in _subdirs(src) if (d / "images").is_dir()]
            if not split_dirs:
                raise DatasetError(
                    f"{src}: wrong layout: expected images/ and masks/ subfolders "
                    "(or SPLIT/images and SPLIT/masks); found "
                    f"{sorted(p.name for p in src.iterdir()) or 'nothing'}"
                )
            pairs = [(d.name, d / "images", d / "masks") for d in split_dirs]
    for split, image_path, mask_path in pairs:
        for what, path in (("images", image_path), ("masks", mask_path)):
            if not path.is_dir():
                where = f" for split {split!r}" if split else ""
                raise DatasetError(f"{path}: wrong layout: {what} folder{where} is missing")
        if split is not None and _subdirs(image_path):
            raise DatasetError(f"{image_path}: wrong layout: unexpected nested folders")
    return pairs


def _pairs(
    image_dir: Path, mask_dir: Path
) -> Iterator[tuple[str, Path | None, Path | None, str | None]]:
    """(stem, image, mask, problem) for every stem found in either folder."""
    images: dict[str, list[Path]] = {}
    for path in _files(image_dir, IMAGE_SUFFIXES):
        images.setdefault(path.stem, []).append(path)
    masks: dict[str, list[Path]] = {}
    for path in _files(mask_dir, MASK_SUFFIXES):
        masks.setdefault(path.stem, []).append(path)
    for stem in sorted(set(images) | set(masks)):
        image_paths, mask_paths = images.get(stem, []), masks.get(stem, [])
        image = image_paths[0] if image_paths else None
        mask = mask_paths[0] if mask_paths else None
        problem = None
        if len(image_paths) > 1:
            problem = f"several images share the stem {stem!r}: {[p.name for p in image_paths]}"
        elif image is None:
            problem = f"no image with stem {stem!r} in {image_dir}"
        elif mask is None:
            problem = f"mask file is missing (expected {mask_dir / (stem + '.png')})"
        yield stem, image, mask, problem


def load_folder_sample(
    split: str | None,
    stem: str,
    image: Path | None,
    mask: Path | None,
    problem: str | None,
    class_map: ClassMap,
    mask_mode: MaskMode,
    val_fraction: float | None,
) -> tuple[str, Sample]:
    """(target split, sample) of one stem found by :func:`_pairs`; BadSampleError if unusable."""
    if problem is not None:
        raise BadSampleError(str(image or mask), problem)
    assert image is not None and mask is not None
    try:
        image_bytes = image.read_bytes()
    except OSError as exc:
        raise BadSampleError(str(image), f"cannot be read ({exc})") from exc
    labels = read_mask(mask, class_map, mask_mode)
    target = split or (split_for(stem, val_fraction) if val_fraction else "train")
    return target, Sample(stem, image_bytes, labels, source=f"{image} + {mask}")


def convert_folder(
    src: str | os.PathLike[str] | None,
    dest_uri: str,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    class_map: str | os.PathLike[str] | ClassMap | None = None,
    classes: list[str] | tuple[str, ...] | None = None,
    images_dir: str | os.PathLike[str] | None = None,
    masks_dir: str | os.PathLike[str] | None = None,
    mask_mode: MaskMode = "auto",
    val_fraction: float | None = None,
    name: str | None = None,
    max_shard_bytes: int = 64 << 20,
    show_progress: bool | None = None,
) -> ConvertReport:
    """Convert a folder of images and masks (see the module docstring) to ``dest_uri``."""
    if mask_mode not in ("auto", "ids", "colors"):
        raise DatasetError(f"mask_mode must be 'auto', 'ids' or 'colors', got {mask_mode!r}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(class_map, ClassMap):
        mapping = class_map
    elif class_map is not None:
        mapping = load_class_map(class_map)
    elif classes:
        mapping = ClassMap(tuple(classes), default_palette(len(classes)))
    else:
        raise DatasetError("give a class map JSON file (--class-map) or the class names")
    layout = discover(
        Path(src) if src is not None else None,
        Path(images_dir) if images_dir is not None else None,
        Path(masks_dir) if masks_dir is not None else None,
    )
    if val_fraction and any(split is not None for split, _, _ in layout):
        raise DatasetError("val_fraction cannot be combined with split subfolders")
    work = [
        (split, stem, image, mask, problem)
        for split, image_dir, mask_dir in layout
        for stem, image, mask, problem in _pairs(image_dir, mask_dir)
    ]
    if not work:
        raise DatasetError(f"{layout[0][1]}: wrong layout: no image files found")
    dataset_name = name or Path(src or images_dir or "dataset").resolve().name
    return write_samples(
        dest_uri,
        DatasetInfo(dataset_name, mapping.classes, mapping.palette, mapping.ignore_index),
        work,
        # item: (split, stem, image, mask, problem)
        lambda item: load_folder_sample(*item, mapping, mask_mode, val_fraction),
        skip_bad=skip_bad,
        overwrite=overwrite,
        storage_options=storage_options,
        max_shard_bytes=max_shard_bytes,
        show_progress=show_progress,
    )


def encode_image(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode a (H, W) or (H, W, 3) uint8 array (a helper for tools and tests)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()
