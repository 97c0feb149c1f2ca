"""Convert COCO instance annotations to a semantic mask plus an instance-id mask per image.

Input: one COCO "instances" JSON per split (``images``, ``annotations``, ``categories``) and the
folder holding that split's images, e.g.::

    src/annotations/instances_train2017.json   src/train2017/000000000009.jpg
    src/annotations/instances_val2017.json     src/val2017/000000000139.jpg

Splits are given as ``{"train": ("annotations/instances_train2017.json", "train2017")}`` (paths
relative to ``src``; CLI ``--split train=annotations/instances_train2017.json:train2017``). Without
them every ``annotations/instances_<name>.json`` is used, with images in ``<name>/`` (or
``images/<name>/``) and the split named after ``<name>`` without its year (``train2017`` ->
``train``).

Masks, through ``pycocotools.mask`` (polygons, uncompressed and compressed RLE):

- classes: ``background`` (0) then the categories sorted by category id, as 1..K;
- crowd annotations (``iscrowd=1``) are painted first, as the ignore index 255 (no instance id);
- the other annotations are painted in order of decreasing pixel area (ties: lower annotation id
  first), so a smaller object lying on a larger one stays visible; each gets the next instance id
  (1 = largest, n = smallest; uint16, 0 = no instance), and where instances overlap the one painted
  last (the smaller) owns the pixel in both masks. Annotations that cover no pixel get no id.

Images without annotations are kept (all background) unless ``skip_empty=True``. Image bytes are
stored as they are. A wrong layout (missing JSON or image folder, JSON without
``images``/``annotations``/``categories``) raises :class:`DatasetError`; a bad sample (missing or
unreadable image, image size differing from the JSON, malformed segmentation, category not in
``categories``) raises :class:`BadSampleError` naming the file and annotation, or is skipped and
listed with ``skip_bad=True``. Nothing is left at the destination when a conversion fails.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segplatform.data.convert import write_samples
from segplatform.data.format import (
    BadSampleError,
    ConvertReport,
    DatasetError,
    DatasetInfo,
    Sample,
    default_palette,
)

BACKGROUND = "background"  # name of class 0
MAX_INSTANCES = 65535  # instance ids are stored as uint16


@dataclass(frozen=True)
class CocoSplit:
    """One split: its annotation file and image folder."""

    name: str  # split name in the dataset ("train", "val", ...)
    annotations: Path  # the instances JSON
    images: Path  # folder the JSON's file_name entries are relative to


@dataclass(frozen=True)
class CocoImage:
    """One image entry of the JSON with its annotations."""

    image_id: int  # the JSON's image id
    file_name: str  # relative to the split's image folder
    height: int  # height the JSON declares
    width: int  # width the JSON declares
    annotations: tuple[dict[str, Any], ...]  # the image's annotations, in JSON order


def parse_split_spec(spec: str) -> tuple[str, str, str]:
    """``NAME=JSON:IMAGES`` -> (name, json path, image folder); ValueError if malformed."""
    match = re.fullmatch(r"([^=]+)=(.+):([^:]+)", spec)
    if not match:
        raise ValueError(
            f"split {spec!r} must look like NAME=ANNOTATIONS.json:IMAGE_DIR "
            "(e.g. train=annotations/instances_train2017.json:train2017)"
        )
    return match.group(1), match.group(2), match.group(3)


def discover_splits(root: Path) -> list[CocoSplit]:
    """Splits from ``annotations/instances_<name>.json`` + ``<name>/`` or ``images/<name>/``."""
    found = []
    for path in sorted((root / "annotations").glob("instances_*.json")):
        stem = path.stem[len("instances_") :]
        images = root / stem
        if not images.is_dir() and (root / "images" / stem).is_dir():
            images = root / "images" / stem
        found.append(CocoSplit(re.sub(r"\d+$", "", stem) or stem, path, images))
    if not found:
        raise DatasetError(
            f"{root}: wrong COCO layout: no annotations/instances_<split>.json found; "
            "give the splits explicitly (NAME=ANNOTATIONS.json:IMAGE_DIR)"
        )
    return found


def resolve_splits(
    root: Path, splits: Mapping[str, tuple[str | os.PathLike[str], str | os.PathLike[str]]] | None
) -> list[CocoSplit]:
    """Explicit or discovered splits; DatasetError naming each missing file or folder."""
    if splits:
        resolved = [
            CocoSplit(name, root / Path(annotations), root / Path(images))
            for name, (annotations, images) in splits.items()
        ]
    else:
        resolved = discover_splits(root)
    names = [split.name for split in resolved]
    if len(set(names)) != len(names):
        raise DatasetError(f"{root}: split names must be unique, got {names}")
    missing = []
    for split in resolved:
        if not split.annotations.is_file():
            missing.append(f"annotation file {split.annotations} (split {split.name!r})")
        if not split.images.is_dir():
            missing.append(f"image folder {split.images} (split {split.name!r})")
    if missing:
        raise DatasetError(f"wrong COCO layout: missing {'; '.join(missing)}")
    return resolved


def load_annotations(
    path: Path,
) -> tuple[list[dict[str, Any]], list[CocoImage]]:
    """(categories, images with their annotations) of one instances JSON; DatasetError if bad."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: annotation file cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: annotation file is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO instances file must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: wrong COCO layout: the {key!r} list is missing")
    categories = data["categories"]
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise DatasetError(f"{path}: categories[{index}] needs 'id' and 'name'")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            raise DatasetError(f"{path}: annotations[{index}] needs an 'image_id'")
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    images = []
    for index, entry in enumerate(data["images"]):
        try:
            images.append(
                CocoImage(
                    entry["id"],
                    str(entry["file_name"]),
                    int(entry["height"]),
                    int(entry["width"]),
                    tuple(by_image.pop(entry["id"], ())),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                f"{path}: images[{index}] needs 'id', 'file_name', 'height' and 'width' ({exc})"
            ) from exc
    if by_image:
        orphan = next(iter(by_image.values()))[0]
        raise DatasetError(
            f"{path}: annotation {orphan.get('id')!r} refers to image_id "
            f"{orphan['image_id']!r}, which is not in 'images'"
        )
    return sorted(categories, key=lambda c: c["id"]), images


def decode_segmentation(
    annotation: dict[str, Any], height: int, width: int, source: str
) -> np.ndarray:
    """(H, W) uint8 0/1 mask of one annotation (polygons, RLE or compressed RLE)."""
    where = f"{source} annotation {annotation.get('id')!r}"
    segmentation = annotation.get("segmentation")
    try:
        if isinstance(segmentation, list):
            polygons = [list(map(float, polygon)) for polygon in segmentation]
            if not polygons:
                return np.zeros((height, width), dtype=np.uint8)
            for polygon in polygons:
                if len(polygon) < 6 or len(polygon) % 2:
                    raise BadSampleError(
                        where,
                        f"a polygon needs an even number >= 6 of coordinates, got {len(polygon)}",
                    )
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and {"size", "counts"} <= segmentation.keys():
            size = [int(v) for v in segmentation["size"]]
            if size != [height, width]:
                raise BadSampleError(
                    where,
                    f"RLE size {size[1]}x{size[0]} (WxH) does not match the image's "
                    f"{width}x{height}",
                )
            counts = segmentation["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:  # compressed RLE string
                rle = {
                    "size": size,
                    "counts": counts.encode() if isinstance(counts, str) else counts,
                }
        else:
            raise BadSampleError(
                where, "segmentation must be a list of polygons or an RLE {'size', 'counts'}"
            )
        decoded = mask_utils.decode(rle)  # (H, W) uint8
    except BadSampleError:
        raise
    except Exception as exc:  # pycocotools raises TypeError, ValueError, ...
        raise BadSampleError(
            where, f"segmentation cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    if decoded.shape != (height, width):
        raise BadSampleError(where, f"decoded mask has shape {decoded.shape}")
    return decoded


def rasterize(
    image: CocoImage,
    category_to_class: Mapping[Any, int],
    ignore_index: int,
    source: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(semantic (H, W), instance ids (H, W) uint16) of one image (painting order: module doc)."""
    mask_dtype = np.uint8 if ignore_index <= 255 else np.uint16
    semantic = np.zeros((image.height, image.width), dtype=mask_dtype)  # (H, W)
    instances = np.zeros((image.height, image.width), dtype=np.uint16)  # (H, W)
    things: list[tuple[int, int, int, np.ndarray]] = []  # (-area, annotation id, class, mask)
    for order, annotation in enumerate(image.annotations):
        category = annotation.get("category_id")
        if category not in category_to_class:
            raise BadSampleError(
                f"{source} annotation {annotation.get('id')!r}",
                f"category_id {category!r} is not in the JSON's categories "
                f"(known: {sorted(category_to_class)[:20]})",
            )
        decoded = decode_segmentation(annotation, image.height, image.width, source).astype(bool)
        if annotation.get("iscrowd", 0):
            semantic[decoded] = ignore_index
            continue
        area = int(decoded.sum())
        if area:
            annotation_id = annotation.get("id")
            tie = annotation_id if isinstance(annotation_id, int) else order
            things.append((-area, tie, category_to_class[category], decoded))
    if len(things) > MAX_INSTANCES:
        raise BadSampleError(source, f"{len(things)} instances exceed the {MAX_INSTANCES} limit")
    things.sort(key=lambda thing: (thing[0], thing[1]))
    for instance_id, (_, _, class_id, decoded) in enumerate(things, start=1):
        semantic[decoded] = class_id
        instances[decoded] = instance_id
    return semantic, instances


def load_coco_sample(
    split: CocoSplit,
    image: CocoImage,
    category_to_class: Mapping[Any, int],
    ignore_index: int,
) -> Sample:
    """One sample: the image file's bytes plus its semantic and instance masks."""
    image_path = split.images / image.file_name
    json_source = f"{split.annotations} image {image.image_id!r}"
    if not image_path.is_file():
        raise BadSampleError(str(image_path), f"image file is missing ({json_source})")
    try:
        image_bytes = image_path.read_bytes()
        with Image.open(image_path) as opened:  # header only; the writer decodes every pixel
            actual_width, actual_height = opened.size
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise BadSampleError(
            str(image_path), f"image cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    if (actual_height, actual_width) != (image.height, image.width):
        raise BadSampleError(
            str(image_path),
            f"image is {actual_width}x{actual_height} (WxH) but {json_source} declares "
            f"{image.width}x{image.height}",
        )
    semantic, instances = rasterize(image, category_to_class, ignore_index, json_source)
    sample_id = Path(image.file_name).stem
    return Sample(
        sample_id, image_bytes, semantic, instances, source=f"{image_path} + {json_source}"
    )


def convert_coco(
    src: str | os.PathLike[str],
    dest_uri: str,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    splits: Mapping[str, tuple[str | os.PathLike[str], str | os.PathLike[str]]] | None = None,
    skip_empty: bool = False,
    name: str = "coco",
    max_shard_bytes: int = 64 << 20,
    show_progress: bool | None = None,
) -> ConvertReport:
    """Convert COCO instances at ``src`` to the dataset at ``dest_uri`` (see the module doc).

    ``splits`` maps split names to ``(annotation JSON, image folder)`` relative to ``src``.
    """
    root = Path(src)
    if not root.is_dir():
        raise DatasetError(f"{root}: COCO root does not exist or is not a directory")
    resolved = resolve_splits(root, splits)
    loaded = [(split, *load_annotations(split.annotations)) for split in resolved]
    categories = loaded[0][1]
    names = [str(category["name"]) for category in categories]
    for split, other, _ in loaded[1:]:
        if [(c["id"], str(c["name"])) for c in other] != [
            (c["id"], name) for c, name in zip(categories, names)
        ]:
            raise DatasetError(
                f"{split.annotations}: categories differ from those of "
                f"{loaded[0][0].annotations}; all splits must share one category list"
            )
    if not categories:
        raise DatasetError(f"{loaded[0][0].annotations}: the 'categories' list is empty")
    classes = (BACKGROUND, *names)
    ignore_index = 255 if len(classes) <= 255 else 65535
    category_to_class = {category["id"]: index for index, category in enumerate(categories, 1)}
    info = DatasetInfo(name, classes, default_palette(len(classes)), ignore_index)
    work = [
        (split, image)
        for split, _, images in loaded
        for image in images
        if image.annotations or not skip_empty
    ]
    if not work:
        raise DatasetError(f"{root}: the annotation files list no images")
    return write_samples(
        dest_uri,
        info,
        work,
        # item: (CocoSplit, CocoImage)
        lambda item: (item[0].name, load_coco_sample(*item, category_to_class, ignore_index)),
        skip_bad=skip_bad,
        overwrite=overwrite,
        storage_options=storage_options,
        max_shard_bytes=max_shard_bytes,
        show_progress=show_progress,
    )


def split_specs(specs: Sequence[str]) -> dict[str, tuple[str, str]]:
    """CLI ``NAME=JSON:IMAGES`` strings -> the ``splits`` mapping of :func:`convert_coco`."""
    parsed: dict[str, tuple[str, str]] = {}
    for spec in specs:
        name, annotations, images = parse_split_spec(spec)
        if name in parsed:
            raise ValueError(f"split {name!r} is given twice")
        parsed[name] = (annotations, images)
    return parsed
