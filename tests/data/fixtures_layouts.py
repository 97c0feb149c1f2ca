"""Small dataset trees in the official VOC, Cityscapes and COCO layouts, written by the tests.

Tests get this module from the ``layouts`` fixture of ``conftest.py`` (tests run with
``--import-mode=importlib``, so this folder is not on ``sys.path``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# The first VOC colours, written out by hand (devkit labelcolormap).
VOC_COLOURS_BY_HAND: dict[int, tuple[int, int, int]] = {
    0: (0, 0, 0),
    1: (128, 0, 0),
    2: (0, 128, 0),
    3: (128, 128, 0),
    15: (192, 128, 128),
    20: (0, 64, 128),
    255: (224, 224, 192),
}
# Cityscapes label id -> train id, from the official table (helpers/labels.py), by hand.
CITYSCAPES_BY_HAND: dict[int, int] = {
    0: 255,
    1: 255,
    4: 255,
    7: 0,
    8: 1,
    9: 255,
    11: 2,
    14: 255,
    17: 5,
    23: 10,
    24: 11,
    26: 13,
    29: 255,
    31: 16,
    33: 18,
}


def voc_palette_bytes() -> list[int]:
    """The full 256-colour VOC palette, flat, as a palette PNG carries it."""
    flat = []
    for index in range(256):
        red = green = blue = 0
        label = index
        for shift in range(7, -1, -1):
            red |= (label & 1) << shift
            green |= ((label >> 1) & 1) << shift
            blue |= ((label >> 2) & 1) << shift
            label >>= 3
        flat += [red, green, blue]
    return flat


def random_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 noise."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_jpeg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def save_palette_png(path: Path, labels: np.ndarray) -> None:
    """A real VOC-style palette PNG (mode P) whose indices are ``labels``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="L")
    image.putpalette(voc_palette_bytes())
    assert image.mode == "P"
    image.save(path, format="PNG")
    with Image.open(path) as check:
        assert check.mode == "P"


def truncate(path: Path) -> None:
    """Cut a file to its first half (a truncated download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def jpeg_decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------------------- VOC
@dataclass
class VocTree:
    root: Path  # the VOCdevkit folder
    voc: Path  # VOCdevkit/VOC2012
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # id -> expected class ids
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> ids


def voc_mask(height: int, width: int, classes: tuple[int, int]) -> np.ndarray:
    """Background with two objects, each outlined by a 255 boundary like VOC's."""
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[4:16, 4:20] = 255
    labels[5:15, 5:19] = classes[0]
    labels[18 : height - 2, 22 : width - 3] = 255
    labels[19 : height - 3, 23 : width - 4] = classes[1]
    return labels


def write_voc(root: Path, height: int = 32, width: int = 40) -> VocTree:
    """VOCdevkit/VOC2012 with 3 train and 2 val images (JPEG) and palette masks."""
    voc = root / "VOCdevkit" / "VOC2012"
    tree = VocTree(root / "VOCdevkit", voc)
    tree.splits = {
        "train": ["2007_000032", "2007_000039", "2008_000008"],
        "val": ["2007_000033", "2009_000001"],
    }
    class_pairs = [(1, 15), (20, 3), (2, 7), (15, 15), (8, 12)]
    all_ids = tree.splits["train"] + tree.splits["val"]
    for index, image_id in enumerate(all_ids):
        save_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", random_rgb(height, width, index))
        labels = voc_mask(height, width, class_pairs[index])
        save_palette_png(voc / "SegmentationClass" / f"{image_id}.png", labels)
        tree.masks[image_id] = labels
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, ids in tree.splits.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (sets / "trainval.txt").write_text("".join(f"{i}\n" for i in all_ids))
    return tree


# ---------------------------------------------------------------------------------- Cityscapes
@dataclass
class CityscapesTree:
    root: Path
    images: dict[str, Path] = field(default_factory=dict)  # id -> leftImg8bit PNG
    label_ids: dict[str, np.ndarray] = field(default_factory=dict)  # id -> labelIds array
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> ids


def write_cityscapes(root: Path, height: int = 24, width: int = 48) -> CityscapesTree:
    """train (aachen: 2 images), val (frankfurt: 1) and test (berlin: 1, all zeros)."""
    tree = CityscapesTree(root)
    ids_used = sorted(CITYSCAPES_BY_HAND)
    plan = {
        "train": [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019")],
        "val": [("frankfurt", "frankfurt_000000_000294")],
        "test": [("berlin", "berlin_000000_000019")],
    }
    seed = 0
    for split, entries in plan.items():
        tree.splits[split] = []
        for city, stem in entries:
            seed += 1
            rng = np.random.default_rng(seed)
            if split == "test":
                label_ids = np.zeros((height, width), dtype=np.uint8)
            else:
                label_ids = rng.choice(ids_used, size=(height, width)).astype(np.uint8)
                label_ids[: height // 2, : width // 2] = 7  # a block of road
            image_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            save_png(image_path, random_rgb(height, width, seed))
            save_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
            # the other files of the official gtFine download, which the converter ignores
            save_png(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", label_ids)
            tree.images[stem] = image_path
            tree.label_ids[stem] = label_ids
            tree.splits[split].append(stem)
    return tree


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Expected train ids, from the hand-written table."""
    out = np.full(label_ids.shape, 255, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_BY_HAND.items():
        out[label_ids == label_id] = train_id
    return out


# ---------------------------------------------------------------------------------------- COCO
@dataclass
class CocoTree:
    root: Path
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> JSON content
    image_paths: dict[str, Path] = field(default_factory=dict)  # sample id -> image file


def uncompressed_rle(binary: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (counts as a list, column-major, starting with zeros)."""
    flat = binary.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(binary.shape), "counts": counts}


def compressed_rle(binary: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE via pycocotools, counts as a string (as in the JSON files)."""
    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def write_coco(root: Path) -> CocoTree:
    """annotations/instances_{train,val}2017.json with train2017/ and val2017/ image folders.

    train image 1 (40x50): a person polygon, an overlapping car (compressed RLE), a crowd of
    people (uncompressed RLE) overlapping the person's corner. train image 2 (30x30): a dog
    made of two polygons. val image (20x24): no annotations.
    """
    tree = CocoTree(root)
    car = np.zeros((40, 50), dtype=np.uint8)
    car[12:22, 20:32] = 1
    crowd = np.zeros((40, 50), dtype=np.uint8)
    crowd[25:38, 28:48] = 1
    train = {
        "info": {"description": "fixture"},
        "images": [
            {"id": 9, "file_name": "000000000009.jpg", "height": 40, "width": 50},
            {"id": 25, "file_name": "000000000025.jpg", "height": 30, "width": 30},
        ],
        "annotations": [
            {
                "id": 101,
                "image_id": 9,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[4.0, 3.0, 36.0, 3.0, 36.0, 30.0, 4.0, 30.0]],
                "area": 864.0,
                "bbox": [4, 3, 32, 27],
            },
            {
                "id": 102,
                "image_id": 9,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": compressed_rle(car),
                "area": 120.0,
                "bbox": [20, 12, 12, 10],
            },
            {
                "id": 103,
                "image_id": 9,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": uncompressed_rle(crowd),
                "area": 260.0,
                "bbox": [28, 25, 20, 13],
            },
            {
                "id": 201,
                "image_id": 25,
                "category_id": 18,
                "iscrowd": 0,
                "segmentation": [
                    [2.0, 2.0, 14.0, 2.0, 14.0, 14.0, 2.0, 14.0],
                    [16.0, 16.0, 27.0, 16.0, 20.0, 27.0],
                ],
                "area": 200.0,
                "bbox": [2, 2, 25, 25],
            },
        ],
        "categories": COCO_CATEGORIES,
    }
    val = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": 20, "width": 24}],
        "annotations": [],
        "categories": COCO_CATEGORIES,
    }
    tree.data = {"train": train, "val": val}
    (root / "annotations").mkdir(parents=True)
    seed = 100
    for split, data in tree.data.items():
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        for entry in data["images"]:
            seed += 1
            path = root / f"{split}2017" / entry["file_name"]
            save_jpeg(path, random_rgb(entry["height"], entry["width"], seed))
            tree.image_paths[Path(entry["file_name"]).stem] = path
    return tree


def decode_annotation(annotation: dict[str, Any], height: int, width: int) -> np.ndarray:
    """The annotation's binary mask, decoded with pycocotools directly."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_nothing_written(out_dir: Path) -> None:
    """The destination's parent holds nothing: no dataset, no temporary or half-written files."""
    assert out_dir.is_dir()
    assert sorted(p.name for p in out_dir.iterdir()) == []
