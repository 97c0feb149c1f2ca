"""PASCAL VOC 2012 converter on a fixture tree in the official layout."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from segplatform.data import BadSampleError, DatasetError, iter_samples, read_manifest
from segplatform.data.convert.voc import VOC_CLASSES, VOC_PALETTE, convert_voc


def test_voc_round_trip_is_pixel_exact(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    dest = tmp_path / "out" / "voc"
    report = convert_voc(tree.root, str(dest))
    assert report.rows == {"train": 3, "val": 2}
    assert report.skipped == []
    info = read_manifest(str(dest))
    assert info.classes == VOC_CLASSES and len(info.classes) == 21
    assert info.classes[15] == "person" and info.classes[20] == "tvmonitor"
    assert info.ignore_index == 255
    for index, colour in layouts.VOC_COLOURS_BY_HAND.items():
        if index < 21:
            assert info.palette[index] == colour
    assert info.palette == VOC_PALETTE
    for split, ids in tree.splits.items():
        samples = list(iter_samples(str(dest), split))
        assert [s["id"] for s in samples] == ids
        for sample in samples:
            expected = tree.masks[sample["id"]]
            assert sample["mask"].dtype == np.uint8
            np.testing.assert_array_equal(sample["mask"], expected)
            assert (sample["mask"] == 255).any()  # the boundaries stay ignore
            jpeg = layouts.jpeg_decoded(tree.voc / "JPEGImages" / f"{sample['id']}.jpg")
            np.testing.assert_array_equal(sample["image"], jpeg)  # stored as is


def test_voc_root_folder_and_split_choice(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    dest = tmp_path / "trainval"
    report = convert_voc(tree.voc, str(dest), splits=["trainval"], name="voc-tv")
    assert report.rows == {"trainval": 5}
    info = read_manifest(str(dest))
    assert info.name == "voc-tv" and info.splits == {"trainval": 5}


def test_voc_rgb_masks_map_through_the_colour_map(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    image_id = tree.splits["train"][0]
    path = tree.voc / "SegmentationClass" / f"{image_id}.png"
    with Image.open(path) as image:
        image.convert("RGB").save(path)  # same colours, no palette
    dest = tmp_path / "out"
    convert_voc(tree.root, str(dest), splits=["train"])
    sample = next(iter_samples(str(dest), "train"))
    np.testing.assert_array_equal(sample["mask"], tree.masks[image_id])


def _break(layouts: ModuleType, tree, case: str) -> tuple[str, str]:
    """Damage one train sample; returns (file name expected in the error, problem words)."""
    voc = tree.voc
    image_id = tree.splits["train"][1]
    image_path = voc / "JPEGImages" / f"{image_id}.jpg"
    mask_path = voc / "SegmentationClass" / f"{image_id}.png"
    if case == "size_mismatch":
        layouts.save_jpeg(image_path, layouts.random_rgb(32, 44, 9))
        return image_path.name, "but mask is"
    if case == "label_outside":
        labels = tree.masks[image_id].copy()
        labels[0, 0] = 30
        layouts.save_palette_png(mask_path, labels)
        return mask_path.name, "label(s) 30 outside"
    if case == "truncated":
        layouts.truncate(image_path)
        return image_path.name, "cannot be decoded"
    if case == "unreadable":
        image_path.write_bytes(b"this is not a jpeg")
        return image_path.name, "cannot be decoded"
    if case == "missing_mask":
        mask_path.unlink()
        return mask_path.name, "mask file is missing"
    if case == "missing_image":
        image_path.unlink()
        return image_path.name, "image file is missing"
    raise AssertionError(case)


BAD_CASES = [
    "size_mismatch",
    "label_outside",
    "truncated",
    "unreadable",
    "missing_mask",
    "missing_image",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_voc_bad_sample_names_file_and_leaves_nothing(
    tmp_path: Path, layouts: ModuleType, case: str
) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    file_name, problem = _break(layouts, tree, case)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BadSampleError) as error:
        convert_voc(tree.root, str(out / "voc"))
    assert file_name in str(error.value) and problem in str(error.value)
    layouts.assert_nothing_written(out)


def test_voc_skip_bad_skips_and_lists_each(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    train, val = tree.splits["train"], tree.splits["val"]
    voc = tree.voc
    layouts.truncate(voc / "JPEGImages" / f"{train[0]}.jpg")
    (voc / "SegmentationClass" / f"{train[2]}.png").unlink()
    labels = tree.masks[val[0]].copy()
    labels[3, 3] = 77
    layouts.save_palette_png(voc / "SegmentationClass" / f"{val[0]}.png", labels)
    dest = tmp_path / "out"
    report = convert_voc(tree.root, str(dest), skip_bad=True)
    assert report.rows == {"train": 1, "val": 1}
    assert len(report.skipped) == 3
    sources = " ".join(source for source, _ in report.skipped)
    for name in (f"{train[0]}.jpg", f"{train[2]}.png", f"{val[0]}.png"):
        assert name in sources
    reasons = [reason for _, reason in report.skipped]
    assert any("cannot be decoded" in r for r in reasons)
    assert any("missing" in r for r in reasons)
    assert any("77" in r for r in reasons)
    assert [s["id"] for s in iter_samples(str(dest), "train")] == [train[1]]


@pytest.mark.parametrize(
    ("remove", "missing"),
    [
        ("SegmentationClass", "SegmentationClass/"),
        ("JPEGImages", "JPEGImages/"),
        ("ImageSets/Segmentation/val.txt", "ImageSets/Segmentation/val.txt"),
        ("ImageSets", "ImageSets/Segmentation/"),
    ],
)
def test_voc_wrong_layout_names_what_is_missing(
    tmp_path: Path, layouts: ModuleType, remove: str, missing: str
) -> None:
    tree = layouts.write_voc(tmp_path / "src")
    target = tree.voc / remove
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError) as error:
        convert_voc(tree.root, str(out / "voc"))
    assert "wrong PASCAL VOC 2012 layout" in str(error.value)
    assert missing in str(error.value)
    layouts.assert_nothing_written(out)


def test_voc_source_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        convert_voc(tmp_path / "nope", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
