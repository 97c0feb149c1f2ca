"""COCO instances converter on a fixture tree in the official layout."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from segplatform.data import BadSampleError, DatasetError, iter_samples, read_manifest
from segplatform.data.convert.coco import convert_coco, split_specs

CLASS_OF_CATEGORY = {1: 1, 3: 2, 18: 3}  # person, car, dog -> contiguous ids


def _expected(
    layouts: ModuleType, image: dict, annotations: list[dict]
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Semantic mask and {annotation id: instance region} painted as documented."""
    height, width = image["height"], image["width"]
    semantic = np.zeros((height, width), dtype=np.uint8)
    decoded = {a["id"]: layouts.decode_annotation(a, height, width) for a in annotations}
    for annotation in annotations:
        if annotation["iscrowd"]:
            semantic[decoded[annotation["id"]]] = 255
    things = sorted(
        (a for a in annotations if not a["iscrowd"]),
        key=lambda a: (-int(decoded[a["id"]].sum()), a["id"]),
    )
    regions: dict[int, np.ndarray] = {}
    for position, annotation in enumerate(things):
        semantic[decoded[annotation["id"]]] = CLASS_OF_CATEGORY[annotation["category_id"]]
        covered_later = np.zeros((height, width), dtype=bool)
        for later in things[position + 1 :]:
            covered_later |= decoded[later["id"]]
        regions[annotation["id"]] = decoded[annotation["id"]] & ~covered_later
    return semantic, regions


def test_coco_semantic_and_instance_masks(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_coco(tmp_path / "coco")
    dest = tmp_path / "out" / "coco"
    report = convert_coco(tree.root, str(dest))  # splits discovered from annotations/
    assert report.rows == {"train": 2, "val": 1}
    info = read_manifest(str(dest))
    assert info.classes == ("background", "person", "car", "dog")
    assert info.ignore_index == 255 and len(info.palette) == 4
    samples = {s["id"]: s for s in iter_samples(str(dest), "train")}
    assert sorted(samples) == ["000000000009", "000000000025"]
    train = tree.data["train"]
    for image in train["images"]:
        sample = samples[Path(image["file_name"]).stem]
        annotations = [a for a in train["annotations"] if a["image_id"] == image["id"]]
        semantic, regions = _expected(layouts, image, annotations)
        np.testing.assert_array_equal(sample["mask"], semantic)
        np.testing.assert_array_equal(
            sample["image"], layouts.jpeg_decoded(tree.image_paths[Path(image["file_name"]).stem])
        )
        instances = sample["instances"]
        assert instances.dtype == np.uint16 and instances.shape == semantic.shape
        # instance ids 1..n in painting order (largest first); each region is the decoded mask
        # minus the smaller instances painted after it
        assert sorted(np.unique(instances[instances > 0]).tolist()) == list(
            range(1, len(regions) + 1)
        )
        for instance_id, region in enumerate(regions.values(), start=1):
            assert region.any()
            np.testing.assert_array_equal(instances == instance_id, region)
        assert (instances[semantic == 0] == 0).all() and (instances[semantic == 255] == 0).all()
    image9 = samples["000000000009"]
    # hand-checked facts: the car (smaller) lies on the person; the crowd corner is ignored
    assert image9["mask"][15, 25] == 2 and image9["mask"][8, 8] == 1
    assert image9["mask"][35, 45] == 255  # crowd only
    assert image9["mask"][27, 30] == 1  # person painted over the crowd
    assert image9["instances"][15, 25] == 2 and image9["instances"][8, 8] == 1
    assert image9["mask"][0, 0] == 0 and image9["instances"][0, 0] == 0
    (val,) = iter_samples(str(dest), "val")
    assert (val["mask"] == 0).all() and (val["instances"] == 0).all()


def test_coco_explicit_splits_and_skip_empty(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_coco(tmp_path / "coco")
    dest = tmp_path / "out"
    splits = split_specs(["training=annotations/instances_train2017.json:train2017"])
    assert splits == {"training": ("annotations/instances_train2017.json", "train2017")}
    report = convert_coco(tree.root, str(dest), splits=splits, skip_empty=True, name="c")
    assert report.rows == {"training": 2}
    with pytest.raises(ValueError, match=r"NAME=ANNOTATIONS\.json:IMAGE_DIR"):
        split_specs(["train"])


def _rewrite(tree, change) -> None:
    path = tree.root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _break(layouts: ModuleType, tree, case: str) -> tuple[str, str]:
    image_path = tree.image_paths["000000000025"]
    if case == "size_mismatch":
        layouts.save_jpeg(image_path, layouts.random_rgb(30, 33, 5))
        return image_path.name, "declares 30x30"
    if case == "label_outside":
        _rewrite(tree, lambda d: d["annotations"][3].update(category_id=99))
        return "annotation 201", "category_id 99 is not in the JSON's categories"
    if case == "truncated":
        layouts.truncate(image_path)
        return image_path.name, "cannot be decoded"
    if case == "missing_image":
        image_path.unlink()
        return image_path.name, "image file is missing"
    if case == "bad_polygon":
        _rewrite(tree, lambda d: d["annotations"][3].update(segmentation=[[1.0, 2.0, 3.0]]))
        return "annotation 201", "polygon needs an even number >= 6"
    if case == "rle_size":
        rle = layouts.compressed_rle(np.ones((10, 10), dtype=np.uint8))
        _rewrite(tree, lambda d: d["annotations"][3].update(segmentation=rle))
        return "annotation 201", "RLE size 10x10 (WxH) does not match"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["size_mismatch", "label_outside", "truncated", "missing_image", "bad_polygon", "rle_size"],
)
def test_coco_bad_sample_names_file_and_leaves_nothing(
    tmp_path: Path, layouts: ModuleType, case: str
) -> None:
    tree = layouts.write_coco(tmp_path / "coco")
    what, problem = _break(layouts, tree, case)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BadSampleError) as error:
        convert_coco(tree.root, str(out / "coco"))
    message = str(error.value)
    assert what in message and problem in message
    if case in ("label_outside", "bad_polygon", "rle_size"):
        assert "instances_train2017.json" in message
    layouts.assert_nothing_written(out)


def test_coco_skip_bad_skips_and_lists_each(tmp_path: Path, layouts: ModuleType) -> None:
    tree = layouts.write_coco(tmp_path / "coco")
    layouts.truncate(tree.image_paths["000000000009"])
    _rewrite(tree, lambda d: d["annotations"][3].update(category_id=42))
    dest = tmp_path / "out"
    report = convert_coco(tree.root, str(dest), skip_bad=True)
    assert report.rows == {"val": 1}
    assert len(report.skipped) == 2
    assert "000000000009.jpg" in report.skipped[0][0]
    assert "annotation 201" in report.skipped[1][0] and "42" in report.skipped[1][1]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_categories", "the 'categories' list is missing"),
        ("not_json", "is not valid JSON"),
        ("no_annotations_dir", "no annotations/instances_<split>.json"),
        ("no_image_dir", "missing image folder"),
    ],
)
def test_coco_wrong_layout(tmp_path: Path, layouts: ModuleType, damage: str, message: str) -> None:
    tree = layouts.write_coco(tmp_path / "coco")
    train_json = tree.root / "annotations" / "instances_train2017.json"
    if damage == "no_categories":
        _rewrite(tree, lambda d: d.pop("categories"))
    elif damage == "not_json":
        train_json.write_text("{ not json")
    elif damage == "no_annotations_dir":
        for path in (tree.root / "annotations").iterdir():
            path.unlink()
        (tree.root / "annotations").rmdir()
    elif damage == "no_image_dir":
        for path in (tree.root / "val2017").iterdir():
            path.unlink()
        (tree.root / "val2017").rmdir()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError) as error:
        convert_coco(tree.root, str(out / "coco"))
    assert message in str(error.value)
    if damage in ("no_categories", "not_json"):
        assert "instances_train2017.json" in str(error.value)
    if damage == "no_image_dir":
        assert "val2017" in str(error.value)
    layouts.assert_nothing_written(out)
