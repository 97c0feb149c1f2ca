"""convert_folder: layouts, class maps, splits, and every bad-input case (abort or --skip-bad)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segplatform.data import BadSampleError, DatasetError, iter_samples, validate_dataset
from segplatform.data.convert import get_converter
from segplatform.data.convert.folder import convert_folder, split_for


def read_back(uri: Path, split: str = "train") -> dict[str, dict]:
    return {row["id"]: row for row in iter_samples(str(uri), split)}


def test_round_trip_is_pixel_identical(tmp_path: Path, folder_tree, class_map_file) -> None:
    expected = folder_tree(tmp_path / "src", 4)
    dest = tmp_path / "out"
    report = convert_folder(
        tmp_path / "src", str(dest), class_map=class_map_file, show_progress=True
    )
    assert report.rows == {"train": 4} and report.skipped == []
    info = validate_dataset(str(dest), check_samples=True)
    assert info.classes == ("background", "road", "car") and info.palette[1] == (128, 64, 128)
    rows = read_back(dest)
    assert sorted(rows) == sorted(expected)
    for stem, (image, labels) in expected.items():
        np.testing.assert_array_equal(rows[stem]["image"], image)
        np.testing.assert_array_equal(rows[stem]["mask"], labels)
    assert get_converter("folder") is convert_folder


def test_colour_masks_map_through_the_class_map(tmp_path: Path, folder_tree, class_map_file):
    expected = folder_tree(tmp_path / "src", 3, colour_masks=True)
    convert_folder(tmp_path / "src", str(tmp_path / "out"), class_map=class_map_file)
    rows = read_back(tmp_path / "out")
    for stem, (_, labels) in expected.items():
        np.testing.assert_array_equal(rows[stem]["mask"], labels)  # white -> 255 (ignore)


def test_palette_mode_masks_are_label_ids(tmp_path: Path, folder_tree) -> None:
    expected = folder_tree(tmp_path / "src", 2)
    for stem, (_, labels) in expected.items():
        paletted = Image.fromarray(labels, mode="L").convert("P")
        paletted.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255] * 759)
        paletted.save(tmp_path / "src" / "masks" / f"{stem}.png")
    convert_folder(tmp_path / "src", str(tmp_path / "out"), classes=["a", "b", "c"])
    rows = read_back(tmp_path / "out")
    for stem, (_, labels) in expected.items():
        np.testing.assert_array_equal(rows[stem]["mask"], labels)


def test_splits_from_subfolders_and_val_fraction(tmp_path: Path, folder_tree, class_map_file):
    folder_tree(tmp_path / "split", 5, splits=("train", "val"))
    report = convert_folder(tmp_path / "split", str(tmp_path / "a"), class_map=class_map_file)
    assert report.rows == {"train": 3, "val": 2}

    folder_tree(tmp_path / "flat", 12)
    report = convert_folder(
        tmp_path / "flat", str(tmp_path / "b"), class_map=class_map_file, val_fraction=0.5
    )
    stems = [f"img{i:02d}" for i in range(12)]
    expected_val = {s for s in stems if split_for(s, 0.5) == "val"}
    assert 0 < len(expected_val) < 12  # both splits used
    assert set(read_back(tmp_path / "b", "val")) == expected_val
    assert report.rows == {"train": 12 - len(expected_val), "val": len(expected_val)}


def make_bad_cases(src: Path) -> dict[str, str]:
    """Break one sample per bad-input kind; returns file name -> expected reason."""
    images, masks = src / "images", src / "masks"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(masks / "img00.png")  # size mismatch
    Image.fromarray(np.full((21, 28), 7, np.uint8)).save(masks / "img01.png")  # label 7
    (images / "img02.png").write_bytes(b"this is not a png")  # unreadable
    data = (images / "img03.png").read_bytes()
    (images / "img03.png").write_bytes(data[: len(data) // 2])  # truncated
    (masks / "img04.png").unlink()  # missing mask
    Image.fromarray(np.zeros((20, 28), np.uint8)).save(masks / "orphan.png")  # mask, no image
    return {
        "img00.png": "image is 28x20 (WxH) but mask is 5x5",
        "img01.png": "mask has label(s) 7 outside the 3 classes",
        "img02.png": "image cannot be decoded",
        "img03.png": "image cannot be decoded",
        "img04.png": "mask file is missing",
        "orphan.png": "no image with stem 'orphan'",
    }


@pytest.mark.parametrize("broken", [0, 1, 2, 3, 4, 5])
def test_each_bad_sample_aborts_and_leaves_nothing(
    tmp_path: Path, folder_tree, class_map_file, broken: int
) -> None:
    src = tmp_path / "src"
    folder_tree(src, 7)
    cases = make_bad_cases(src)
    name, reason = list(cases.items())[broken]
    # repair every case except the one under test
    clean = tmp_path / "clean"
    folder_tree(clean, 7)
    for other in cases:
        if other != name:
            for sub in ("images", "masks"):
                (src / sub / other).unlink(missing_ok=True)
                if (clean / sub / other).exists():
                    (src / sub / other).write_bytes((clean / sub / other).read_bytes())
    dest = tmp_path / "out"
    with pytest.raises(BadSampleError) as error:
        convert_folder(src, str(dest), class_map=class_map_file, max_shard_bytes=1)
    assert name in str(error.value) and reason in str(error.value)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.json", "clean", "src"]


def test_skip_bad_lists_each_case(tmp_path: Path, folder_tree, class_map_file) -> None:
    src = tmp_path / "src"
    folder_tree(src, 7)
    cases = make_bad_cases(src)
    report = convert_folder(src, str(tmp_path / "out"), class_map=class_map_file, skip_bad=True)
    assert report.rows == {"train": 2}  # img05, img06 are good
    assert len(report.skipped) == len(cases)
    for (source, reason), (name, expected) in zip(
        sorted(report.skipped, key=lambda s: Path(s[0].split(" + ")[0]).name), sorted(cases.items())
    ):
        assert name in source and expected in reason
    assert sorted(read_back(tmp_path / "out")) == ["img05", "img06"]


def test_colour_outside_the_class_map(tmp_path: Path, folder_tree, class_map_file) -> None:
    folder_tree(tmp_path / "src", 2, colour_masks=True)
    mask_path = tmp_path / "src" / "masks" / "img01.png"
    colours = np.asarray(Image.open(mask_path)).copy()
    colours[3, 3] = (1, 2, 3)
    Image.fromarray(colours).save(mask_path)
    with pytest.raises(BadSampleError, match=r"img01.png: mask colour\(s\) \(1, 2, 3\) are not"):
        convert_folder(tmp_path / "src", str(tmp_path / "out"), class_map=class_map_file)
    assert not (tmp_path / "out").exists()


def test_wrong_layouts(tmp_path: Path, folder_tree, class_map_file) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        convert_folder(tmp_path / "nope", str(tmp_path / "o"), class_map=class_map_file)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"wrong layout: expected images/ and masks/"):
        convert_folder(tmp_path / "flat", str(tmp_path / "o"), class_map=class_map_file)
    folder_tree(tmp_path / "split", 2, splits=("train", "val"))
    for path in (tmp_path / "split" / "masks" / "val").iterdir():
        path.unlink()
    (tmp_path / "split" / "masks" / "val").rmdir()
    with pytest.raises(DatasetError, match="masks folder for split 'val' is missing"):
        convert_folder(tmp_path / "split", str(tmp_path / "o"), class_map=class_map_file)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DatasetError, match="no image files found"):
        convert_folder(tmp_path / "empty", str(tmp_path / "o"), class_map=class_map_file)
    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps({"classes": ["a", "b"], "palette": [[0, 0, 0]]}))
    with pytest.raises(DatasetError, match=r"bad\.json: palette has 1 colours for 2 classes"):
        convert_folder(tmp_path / "split", str(tmp_path / "o"), class_map=bad_map)
    assert not (tmp_path / "o").exists()
