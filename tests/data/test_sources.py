"""The built-in datasets: classes, splits (slice ranges for the scans, digit images for the
digit scenes), label frequencies, instances, bad installs."""

from __future__ import annotations

import io
import shutil
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segplatform.data import DatasetError, validate_dataset
from segplatform.data.sources import (
    BUILTIN_SOURCES,
    MRICRON_TEMPLATES,
    colin27_lobes,
    convert_builtin,
    digits_scenes,
    mni152_tissue,
)


def collect(samples) -> tuple[dict[str, dict[str, list[int]]], dict[str, np.ndarray], int]:
    """Slice indices per (split, orientation), pixel counts per split, row count."""
    indices: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(256, np.int64))
    rows = 0
    for split, sample in samples:
        orientation, index = sample.id.split("-")
        indices[split][orientation].append(int(index))
        counts[split] += np.bincount(sample.mask.ravel(), minlength=256)
        rows += 1
    return indices, counts, rows


def assert_split_by_slice_range(indices: dict[str, dict[str, list[int]]]) -> None:
    for orientation in ("axial", "coronal", "sagittal"):
        train, val = sorted(indices["train"][orientation]), sorted(indices["val"][orientation])
        assert train and val
        assert not set(train) & set(val)
        # val is one contiguous block with train on both sides, never next to a val slice
        assert all(not (val[0] - 3 <= t <= val[-1] + 3) for t in train), orientation
        assert min(train) < val[0] and max(train) > val[-1]


def test_builtin_registry() -> None:
    assert set(BUILTIN_SOURCES) == {"mni152-tissue", "colin27-lobes", "digits-scenes"}


def test_digits_scenes_are_small_images_of_separate_digit_instances(tmp_path: Path) -> None:
    from PIL import Image

    info, samples = digits_scenes(train_rows=60, val_rows=20)
    assert info.classes[0] == "background" and info.classes[1:] == tuple(
        f"digit {d}" for d in range(10)
    )
    rows = list(samples)
    assert [split for split, _ in rows].count("val") == 20 and len(rows) == 80
    used: dict[str, set[str]] = defaultdict(set)
    sides = []
    for split, sample in rows:
        with Image.open(io.BytesIO(sample.image)) as image:
            assert image.size == (96, 96) and image.mode == "RGB"
        mask, instances = sample.mask, sample.instances
        assert mask.shape == instances.shape == (96, 96)
        assert ((mask > 0) == (instances > 0)).all()  # every digit pixel is one instance's
        for instance in np.unique(instances[instances > 0]):
            pixels = instances == instance
            (label,) = np.unique(mask[pixels])  # one digit per instance
            assert 1 <= label <= 10
            rr, cc = np.nonzero(pixels)
            sides.append(max(rr.max() - rr.min(), cc.max() - cc.min()) + 1)
        used[split].update(sample.source.split("[", 1)[1].rstrip("]").split(", "))
    # Small objects (drawn 22-34 px), and no handwritten sample in both splits.
    assert 12 <= np.median(sides) <= 34
    assert not used["train"] & used["val"]
    # The same arguments build the same rows.
    again = list(digits_scenes(train_rows=60, val_rows=20)[1])
    assert all(a[1].image == b[1].image for a, b in zip(rows, again))
    report = convert_builtin("digits-scenes", str(tmp_path / "digits"), train_rows=8, val_rows=4)
    assert report.rows == {"train": 8, "val": 4}
    validate_dataset(str(tmp_path / "digits"))


def test_mni152_tissue() -> None:
    info, samples = mni152_tissue()
    assert info.classes == ("background", "grey matter", "white matter", "other brain")
    indices, counts, rows = collect(samples)
    assert 150 <= rows <= 400
    assert_split_by_slice_range(indices)
    for split in ("train", "val"):
        frequency = counts[split][:4] / counts[split].sum()
        assert counts[split][4:].sum() == 0
        assert 0.4 < frequency[0] < 0.9  # background
        assert frequency[1] > frequency[2] > frequency[3] > 0.005  # GM > WM > other


def test_colin27_lobes_written_and_validated(tmp_path: Path) -> None:
    report = convert_builtin("colin27-lobes", str(tmp_path / "colin"))
    info = validate_dataset(str(tmp_path / "colin"))
    assert info.num_classes == 9 and info.classes[1] == "frontal" and info.classes[8] == "vermis"
    assert 420 <= report.total_rows <= 500 and report.rows["val"] >= 60
    _, samples = colin27_lobes()
    indices, counts, _ = collect(samples)
    assert_split_by_slice_range(indices)
    for split in ("train", "val"):
        frequency = counts[split][:9] / counts[split].sum()
        assert counts[split][9:].sum() == 0
        assert (frequency > 0.001).all(), (split, frequency)  # every class present
        assert frequency[0] > 0.5 and frequency[1] == frequency[1:].max()  # frontal largest lobe


def test_colin27_missing_package_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"mricron-data \(apt-get install mricron-data\)"):
        colin27_lobes(templates_dir=tmp_path)


def test_colin27_resamples_an_atlas_on_another_grid(tmp_path: Path) -> None:
    for name in ("ch2.nii.gz", "aal.nii.txt"):
        shutil.copy(MRICRON_TEMPLATES / name, tmp_path / name)
    atlas = nib.load(MRICRON_TEMPLATES / "aal.nii.gz")
    data = np.asarray(atlas.dataobj)[::2, ::2, ::2]  # 2 mm grid
    affine = atlas.affine.copy()
    affine[:3, :3] *= 2
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "aal.nii.gz")
    _, samples = colin27_lobes(templates_dir=tmp_path, stride=20)
    reference = {s.id: s.mask for _, s in colin27_lobes(stride=20)[1]}
    resampled = {s.id: s.mask for _, s in samples}
    common = sorted(set(reference) & set(resampled))
    assert common
    for sample_id in common:
        assert resampled[sample_id].shape == reference[sample_id].shape
        agreement = (resampled[sample_id] == reference[sample_id]).mean()
        assert agreement > 0.85, (sample_id, agreement)
