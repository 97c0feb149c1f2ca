"""Fixtures for the data tests: a folder of images and masks in the layout convert_folder reads,
and ``layouts``, the module of VOC, Cityscapes and COCO tree writers (``fixtures_layouts.py``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

CLASSES = ["background", "road", "car"]
PALETTE = [[0, 0, 0], [128, 64, 128], [0, 0, 142]]
LAYOUTS_MODULE = "segplatform_test_fixtures_layouts"  # sys.modules name of fixtures_layouts.py


def write_tree(
    root: Path, count: int = 4, *, splits: tuple[str, ...] = (), colour_masks: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """images/ + masks/ (or images/SPLIT + masks/SPLIT); returns id -> (image, labels)."""
    rng = np.random.default_rng(7)
    expected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for index in range(count):
        split = splits[index % len(splits)] if splits else ""
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        height, width = 20 + index, 28
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        labels = rng.integers(0, 3, (height, width)).astype(np.uint8)
        labels[0, 0] = 255
        stem = f"img{index:02d}"
        Image.fromarray(image).save(image_dir / f"{stem}.png")
        if colour_masks:
            lut = np.array(PALETTE + [[255, 255, 255]] * 253, dtype=np.uint8)
            Image.fromarray(lut[labels]).save(mask_dir / f"{stem}.png")
        else:
            Image.fromarray(labels).save(mask_dir / f"{stem}.png")
        expected[stem] = (image, labels)
    return expected


@pytest.fixture
def folder_tree() -> Callable[..., dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Factory: ``folder_tree(root, count, splits=(), colour_masks=False)``."""
    return write_tree


@pytest.fixture
def class_map_file(tmp_path: Path) -> Path:
    """A class-map JSON with three classes and white as the ignore colour."""
    path = tmp_path / "classes.json"
    path.write_text(
        json.dumps({"classes": CLASSES, "palette": PALETTE, "ignore_colors": [[255, 255, 255]]})
    )
    return path


@pytest.fixture(scope="session")
def layouts() -> ModuleType:
    """``fixtures_layouts.py``, loaded by path (``--import-mode=importlib``: not on sys.path)."""
    if LAYOUTS_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            LAYOUTS_MODULE, Path(__file__).with_name("fixtures_layouts.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[LAYOUTS_MODULE] = module  # dataclasses look their module up while defined
        spec.loader.exec_module(module)
    return sys.modules[LAYOUTS_MODULE]
