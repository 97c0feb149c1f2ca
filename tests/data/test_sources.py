"""The built-in brain datasets: classes, slice-range splits, label frequencies, bad installs."""

from __future__ import annotations

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
    assert set(BUILTIN_SOURCES) == {"mni152-tissue", "colin27-lobes"}


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
