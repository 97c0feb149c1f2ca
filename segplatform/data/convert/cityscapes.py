"""Convert the Cityscapes layout (fine annotations) to the dataset format.

Layout (``src`` is the Cityscapes root)::

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The ``labelIds`` masks hold the 34 ids of the official label table (``cityscapesScripts``
``helpers/labels.py``, ids 0..33). They are mapped to the 19 ``trainId`` classes used for training
and evaluation; every other id (unlabeled, ego vehicle, parking, guard rail, ...) becomes the ignore
index 255. The ``test`` split's public masks carry no labels, so only ``train`` and ``val`` are
converted unless asked for. PNG bytes of the images are stored as they are.

A wrong layout (missing ``leftImg8bit/<split>`` or ``gtFine/<split>``) raises :class:`DatasetError`
naming what is missing; a bad sample (missing label file, unreadable or truncated image, size
mismatch, label id outside 0..33) raises :class:`BadSampleError` naming the file, or is skipped and
listed with ``skip_bad=True``. Nothing is left at the destination when a conversion fails.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segplatform.data.convert import write_samples
from segplatform.data.format import (
    BadSampleError,
    ConvertReport,
    DatasetError,
    DatasetInfo,
    Sample,
)

IGNORE_INDEX = 255  # train id of every label that is not evaluated
# (label id, name, train id) of the official label table; train id 255 = ignored.
LABEL_TABLE: tuple[tuple[int, str, int], ...] = (
    (0, "unlabeled", 255),
    (1, "ego vehicle", 255),
    (2, "rectification border", 255),
    (3, "out of roi", 255),
    (4, "static", 255),
    (5, "dynamic", 255),
    (6, "ground", 255),
    (7, "road", 0),
    (8, "sidewalk", 1),
    (9, "parking", 255),
    (10, "rail track", 255),
    (11, "building", 2),
    (12, "wall", 3),
    (13, "fence", 4),
    (14, "guard rail", 255),
    (15, "bridge", 255),
    (16, "tunnel", 255),
    (17, "pole", 5),
    (18, "polegroup", 255),
    (19, "traffic light", 6),
    (20, "traffic sign", 7),
    (21, "vegetation", 8),
    (22, "terrain", 9),
    (23, "sky", 10),
    (24, "person", 11),
    (25, "rider", 12),
    (26, "car", 13),
    (27, "truck", 14),
    (28, "bus", 15),
    (29, "caravan", 255),
    (30, "trailer", 255),
    (31, "train", 16),
    (32, "motorcycle", 17),
    (33, "bicycle", 18),
)
# The 19 training classes (train ids 0..18) and their official colours.
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    name for _, name, train_id in sorted(LABEL_TABLE, key=lambda row: row[2]) if train_id != 255
)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),  # road
    (244, 35, 232),  # sidewalk
    (70, 70, 70),  # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),  # traffic light
    (220, 220, 0),  # traffic sign
    (107, 142, 35),  # vegetation
    (152, 251, 152),  # terrain
    (70, 130, 180),  # sky
    (220, 20, 60),  # person
    (255, 0, 0),  # rider
    (0, 0, 142),  # car
    (0, 0, 70),  # truck
    (0, 60, 100),  # bus
    (0, 80, 100),  # train
    (0, 0, 230),  # motorcycle
    (119, 11, 32),  # bicycle
)
NUM_LABEL_IDS = len(LABEL_TABLE)  # 34 valid label ids, 0..33
# Lookup label id -> train id, for every 8-bit value (ids past 33 are caught before use).
ID_TO_TRAIN_ID: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _name, _train_id in LABEL_TABLE:
    ID_TO_TRAIN_ID[_label_id] = _train_id
DEFAULT_SPLITS: tuple[str, ...] = ("train", "val")
IMAGE_SUFFIX = "_leftImg8bit.png"


def check_layout(root: Path, splits: Sequence[str], annotations: str) -> None:
    """DatasetError listing every missing image or annotation folder of the requested splits."""
    missing = [
        f"{top}/{split}/"
        for split in splits
        for top in ("leftImg8bit", annotations)
        if not (root / top / split).is_dir()
    ]
    if missing:
        raise DatasetError(
            f"{root}: wrong Cityscapes layout: missing {', '.join(missing)} (expected "
            f"leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} and "
            f"{annotations}/<split>/<city>/*_{annotations}_labelIds.png)"
        )


def labels_to_train_ids(path: Path) -> np.ndarray:
    """Read a ``*_labelIds.png`` and map it to (H, W) uint8 train ids; BadSampleError if bad."""
    if not path.is_file():
        raise BadSampleError(str(path), "label file is missing")
    try:
        with Image.open(path) as image:
            image.load()  # truncated files fail here
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise BadSampleError(
                    str(path), f"unsupported label mode {image.mode!r} (expected grey label ids)"
                )
            label_ids = np.array(image)  # (H, W)
    except BadSampleError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise BadSampleError(
            str(path), f"label file cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    values = np.unique(label_ids)
    bad = values[(values < 0) | (values >= NUM_LABEL_IDS)]
    if bad.size:
        raise BadSampleError(
            str(path),
            f"label id(s) {', '.join(str(int(v)) for v in bad[:10])} are not in the Cityscapes "
            f"label table (ids 0..{NUM_LABEL_IDS - 1})",
        )
    return ID_TO_TRAIN_ID[label_ids.astype(np.intp)]  # (H, W) uint8


def find_images(root: Path, split: str) -> list[Path]:
    """Every ``*_leftImg8bit.png`` of a split, sorted by city then name."""
    return sorted((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}"))


def load_cityscapes_sample(root: Path, split: str, image_path: Path, annotations: str) -> Sample:
    """One sample: the image's PNG bytes and the mapped train-id mask."""
    stem = image_path.name[: -len(IMAGE_SUFFIX)]
    label_path = (
        root / annotations / split / image_path.parent.name / (f"{stem}_{annotations}_labelIds.png")
    )
    try:
        image_bytes = image_path.read_bytes()
    except OSError as exc:
        raise BadSampleError(str(image_path), f"image cannot be read ({exc})") from exc
    mask = labels_to_train_ids(label_path)
    return Sample(stem, image_bytes, mask, source=f"{image_path} + {label_path}")


def convert_cityscapes(
    src: str | os.PathLike[str],
    dest_uri: str,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    annotations: str = "gtFine",
    name: str = "cityscapes",
    max_shard_bytes: int = 64 << 20,
    show_progress: bool | None = None,
) -> ConvertReport:
    """Convert Cityscapes at ``src`` to the dataset at ``dest_uri`` (19 train-id classes).

    ``splits`` chooses among train, val and test (default train and val); ``annotations`` is the
    annotation folder (``gtFine``, or ``gtCoarse`` for the coarse set, same file naming).
    """
    if isinstance(splits, str):
        splits = (splits,)
    if not splits:
        raise DatasetError("give at least one Cityscapes split (train, val, test)")
    root = Path(src)
    if not root.is_dir():
        raise DatasetError(f"{root}: Cityscapes root does not exist or is not a directory")
    check_layout(root, splits, annotations)
    work = [(split, image) for split in splits for image in find_images(root, split)]
    if not work:
        raise DatasetError(
            f"{root}: wrong Cityscapes layout: no <city>/*{IMAGE_SUFFIX} images under "
            f"{', '.join(f'leftImg8bit/{split}' for split in splits)}"
        )
    return write_samples(
        dest_uri,
        DatasetInfo(name, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX),
        work,
        # item: (split, image path)
        lambda item: (item[0], load_cityscapes_sample(root, *item, annotations)),
        skip_bad=skip_bad,
        overwrite=overwrite,
        storage_options=storage_options,
        max_shard_bytes=max_shard_bytes,
        show_progress=show_progress,
    )
