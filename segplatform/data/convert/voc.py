"""Convert the PASCAL VOC 2012 segmentation layout to the dataset format.

Layout (``src`` is ``VOCdevkit``, or the ``VOC2012`` folder itself)::

    VOC2012/JPEGImages/2007_000032.jpg
    VOC2012/SegmentationClass/2007_000032.png      palette PNG: index = class id, 255 = boundary
    VOC2012/ImageSets/Segmentation/train.txt        one image id per line
    VOC2012/ImageSets/Segmentation/val.txt
    VOC2012/ImageSets/Segmentation/trainval.txt

The palette index of each mask pixel is its class id (0 = background ... 20 = tvmonitor); index 255
marks object boundaries and "difficult" regions and becomes the ignore index. Grey (mode L) masks
are read the same way; RGB masks are mapped back through the VOC colour map (the boundary colour
(224, 224, 192) -> 255). JPEG bytes are stored as they are (no re-encoding).

Splits come from ``ImageSets/Segmentation/<split>.txt``: ``train`` and ``val`` by default
(``trainval`` is their union). A wrong layout (missing folders or split files) raises
:class:`DatasetError` naming everything that is missing; a bad sample (missing or unreadable file,
image/mask size mismatch, mask index outside 0..20 and 255) raises :class:`BadSampleError` naming
the file, or is skipped and listed with ``skip_bad=True``. Nothing is left at the destination when
a conversion fails.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segplatform.data.convert import write_samples
from segplatform.data.convert.folder import ClassMap, colors_to_labels
from segplatform.data.format import (
    BadSampleError,
    ConvertReport,
    DatasetError,
    DatasetInfo,
    Sample,
    default_palette,
)

# The 21 PASCAL VOC classes; label i is VOC_CLASSES[i].
VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
VOC_IGNORE_INDEX = 255  # palette index of boundaries and difficult regions
DEFAULT_SPLITS: tuple[str, ...] = ("train", "val")


# The VOC devkit colour map (``labelcolormap``: bit 3k of the label -> bit 7-k of red,
# 3k+1 -> green, 3k+2 -> blue); index 255, the boundary, is (224, 224, 192).
VOC_PALETTE: tuple[tuple[int, int, int], ...] = default_palette(len(VOC_CLASSES))
VOC_IGNORE_COLOR: tuple[int, int, int] = default_palette(256)[VOC_IGNORE_INDEX]


def find_voc_root(src: Path) -> Path:
    """The ``VOC2012`` folder inside ``src`` (``VOCdevkit``, its parent, or the folder itself)."""
    for candidate in (src / "VOC2012", src / "VOCdevkit" / "VOC2012"):
        if candidate.is_dir():
            return candidate
    return src


def check_layout(root: Path, splits: Sequence[str]) -> dict[str, Path]:
    """Split name -> split file; DatasetError listing every missing folder and split file."""
    missing = [
        f"{name}/"
        for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
        if not (root / name).is_dir()
    ]
    split_files = {split: root / "ImageSets" / "Segmentation" / f"{split}.txt" for split in splits}
    if (root / "ImageSets" / "Segmentation").is_dir():
        missing += [
            f"ImageSets/Segmentation/{path.name}"
            for path in split_files.values()
            if not path.is_file()
        ]
    if missing:
        raise DatasetError(
            f"{root}: wrong PASCAL VOC 2012 layout: missing {', '.join(missing)} "
            "(expected VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass/ and "
            "ImageSets/Segmentation/<split>.txt)"
        )
    return split_files


def read_split_ids(path: Path) -> list[str]:
    """Image ids listed in a split file (one per line; blank lines ignored)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: split file cannot be read ({exc})") from exc
    return [line.split()[0] for line in lines if line.strip()]


def read_voc_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 class ids of a VOC mask; BadSampleError naming the file if unusable."""
    if not path.is_file():
        raise BadSampleError(str(path), "mask file is missing")
    try:
        with Image.open(path) as image:
            image.load()  # truncated files fail here
            if image.mode in ("P", "L"):
                labels = np.array(image)  # (H, W) palette indices = class ids
            elif image.mode in ("RGB", "RGBA"):
                class_map = ClassMap(
                    VOC_CLASSES, VOC_PALETTE, VOC_IGNORE_INDEX, (VOC_IGNORE_COLOR,)
                )
                labels = colors_to_labels(np.asarray(image.convert("RGB")), class_map, str(path))
            else:
                raise BadSampleError(
                    str(path), f"unsupported mask mode {image.mode!r} (expected a palette PNG)"
                )
    except BadSampleError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise BadSampleError(
            str(path), f"mask cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    values = np.unique(labels)
    bad = values[(values >= len(VOC_CLASSES)) & (values != VOC_IGNORE_INDEX)]
    if bad.size:
        raise BadSampleError(
            str(path),
            f"mask has label(s) {', '.join(str(int(v)) for v in bad[:10])} outside the "
            f"{len(VOC_CLASSES)} VOC classes 0..{len(VOC_CLASSES) - 1} and ignore "
            f"{VOC_IGNORE_INDEX}",
        )
    return labels.astype(np.uint8)


def load_voc_sample(root: Path, image_id: str) -> Sample:
    """One VOC sample: JPEG bytes as stored plus the mask's class ids."""
    image_path = root / "JPEGImages" / f"{image_id}.jpg"
    mask_path = root / "SegmentationClass" / f"{image_id}.png"
    if not image_path.is_file():
        raise BadSampleError(str(image_path), "image file is missing")
    try:
        image_bytes = image_path.read_bytes()
    except OSError as exc:
        raise BadSampleError(str(image_path), f"image cannot be read ({exc})") from exc
    labels = read_voc_mask(mask_path)
    return Sample(image_id, image_bytes, labels, source=f"{image_path} + {mask_path}")


def convert_voc(
    src: str | os.PathLike[str],
    dest_uri: str,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    name: str = "voc2012",
    max_shard_bytes: int = 64 << 20,
    show_progress: bool | None = None,
) -> ConvertReport:
    """Convert PASCAL VOC 2012 segmentation at ``src`` to the dataset at ``dest_uri``.

    ``splits`` names the ``ImageSets/Segmentation`` files to convert (default train and val).
    """
    if isinstance(splits, str):
        splits = (splits,)
    if not splits:
        raise DatasetError("give at least one VOC split (train, val, trainval)")
    src_path = Path(src)
    if not src_path.is_dir():
        raise DatasetError(f"{src_path}: VOC source folder does not exist or is not a directory")
    root = find_voc_root(src_path)
    split_files = check_layout(root, splits)
    work = [
        (split, image_id) for split in splits for image_id in read_split_ids(split_files[split])
    ]
    if not work:
        raise DatasetError(f"{root}: the split files {list(splits)} list no images")
    return write_samples(
        dest_uri,
        DatasetInfo(name, VOC_CLASSES, VOC_PALETTE, VOC_IGNORE_INDEX),
        work,
        # item: (split, image id)
        lambda item: (item[0], load_voc_sample(root, item[1])),
        skip_bad=skip_bad,
        overwrite=overwrite,
        storage_options=storage_options,
        max_shard_bytes=max_shard_bytes,
        show_progress=show_progress,
    )
