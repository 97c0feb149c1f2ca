"""Cityscapes converter on a fixture tree in the official layout."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from segplatform.data import BadSampleError, DatasetError, iter_samples, read_manifest
from segplatform.data.convert.cityscapes import convert_cityscapes

TRAIN_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]  # fmt: skip


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_cityscapes(tmp_path / "cityscapes")
    dest = tmp_path / "out" / "cs"
    report = convert_cityscapes(tree.root, str(dest))
    assert report.rows == {"train": 2, "val": 1}  # test skipped by default
    info = read_manifest(str(dest))
    assert list(info.classes) == TRAIN_CLASSES
    assert info.palette[0] == (128, 64, 128) and info.palette[13] == (0, 0, 142)
    assert info.palette[18] == (119, 11, 32) and info.palette[10] == (70, 130, 180)
    assert info.ignore_index == 255 and set(info.splits) == {"train", "val"}
    seen_ignore = seen_class = False
    for split in ("train", "val"):
        samples = list(iter_samples(str(dest), split))
        assert [s["id"] for s in samples] == tree.splits[split]
        for sample in samples:
            label_ids = tree.label_ids[sample["id"]]
            expected = layouts.cityscapes_train_ids(label_ids)
            np.testing.assert_array_equal(sample["mask"], expected)
            with Image.open(tree.images[sample["id"]]) as image:
                np.testing.assert_array_equal(sample["image"], np.asarray(image))
            seen_ignore |= bool((sample["mask"] == 255).any())
            seen_class |= bool((sample["mask"] == 18).any())
            assert (sample["mask"][label_ids == 9] == 255).all()  # parking -> ignore
            assert (sample["mask"][label_ids == 26] == 13).all()  # car -> 13
    assert seen_ignore and seen_class


def test_cityscapes_test_split_on_request(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_cityscapes(tmp_path / "cityscapes")
    dest = tmp_path / "test-only"
    report = convert_cityscapes(tree.root, str(dest), splits=["test"])
    assert report.rows == {"test": 1}
    (sample,) = iter_samples(str(dest), "test")
    assert (sample["mask"] == 255).all()


def _break(layouts: ModuleType, tree, case: str) -> tuple[str, str]:
    stem = tree.splits["train"][1]
    image_path = tree.images[stem]
    label_path = tree.root / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png"
    if case == "size_mismatch":
        layouts.save_png(image_path, layouts.random_rgb(24, 40, 3))
        return image_path.name, "but mask is"
    if case == "label_outside":
        label_ids = tree.label_ids[stem].copy()
        label_ids[2, 2] = 40
        layouts.save_png(label_path, label_ids)
        return label_path.name, "label id(s) 40 are not in the Cityscapes label table"
    if case == "truncated":
        layouts.truncate(image_path)
        return image_path.name, "cannot be decoded"
    if case == "truncated_label":
        layouts.truncate(label_path)
        return label_path.name, "cannot be decoded"
    if case == "missing_label":
        label_path.unlink()
        return label_path.name, "label file is missing"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["size_mismatch", "label_outside", "truncated", "truncated_label", "missing_label"]
)
def test_cityscapes_bad_sample_names_file_and_leaves_nothing(
    tmp_path: Path, layouts: ModuleType, case: str
) -> None:
    tree = layouts.write_cityscapes(tmp_path / "cityscapes")
    file_name, problem = _break(layouts, tree, case)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BadSampleError) as error:
        convert_cityscapes(tree.root, str(out / "cs"))
    assert file_name in str(error.value) and problem in str(error.value)
    layouts.assert_nothing_written(out)


def test_cityscapes_skip_bad_skips_and_lists_each(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_cityscapes(tmp_path / "cityscapes")
    first, second = tree.splits["train"]
    (tree.root / "gtFine" / "train" / "aachen" / f"{first}_gtFine_labelIds.png").unlink()
    layouts.truncate(tree.images[tree.splits["val"][0]])
    dest = tmp_path / "out"
    report = convert_cityscapes(tree.root, str(dest), skip_bad=True)
    assert report.rows == {"train": 1}
    assert len(report.skipped) == 2
    assert f"{first}_gtFine_labelIds.png" in report.skipped[0][0]
    assert "missing" in report.skipped[0][1]
    assert tree.images[tree.splits["val"][0]].name in report.skipped[1][0]
    assert [s["id"] for s in iter_samples(str(dest), "train")] == [second]


@pytest.mark.parametrize(
    ("remove", "missing"), [("gtFine/val", "gtFine/val/"), ("leftImg8bit", "leftImg8bit/train/")]
)
def test_cityscapes_wrong_layout_names_what_is_missing(
    tmp_path: Path, layouts: ModuleType, remove: str, missing: str
) -> None:
    tree = layouts.write_cityscapes(tmp_path / "cityscapes")
    shutil.rmtree(tree.root / remove)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError) as error:
        convert_cityscapes(tree.root, str(out / "cs"))
    assert "wrong Cityscapes layout" in str(error.value) and missing in str(error.value)
    layouts.assert_nothing_written(out)


def test_cityscapes_no_images_is_a_layout_error(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / "cs" / "leftImg8bit" / split).mkdir(parents=True)
        (tmp_path / "cs" / "gtFine" / split).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no <city>/\*_leftImg8bit\.png images"):
        convert_cityscapes(tmp_path / "cs", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
