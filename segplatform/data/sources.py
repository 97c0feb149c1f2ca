"""Built-in real datasets that install offline: 2D slices of two labelled brain MRI volumes, and
scenes of real handwritten digits (small objects, each annotated as an instance).

``mni152-tissue`` — tissue segmentation of the MNI ICBM152 2009 nonlinear symmetric T1 template
(1 mm, 197x233x189) with its grey-matter, white-matter and brain-mask maps, as bundled in the
``nilearn`` wheel (``nilearn.datasets.load_mni152_template(resolution=1)``,
``load_mni152_gm_template``, ``load_mni152_wm_template``, ``load_mni152_brain_mask``).
Source: V. Fonov, A. Evans, R. McKinstry, C. Almli, D. Collins, "Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood", NeuroImage 47 (2009) S102;
V. Fonov et al., "Unbiased average age-appropriate atlases for pediatric studies",
NeuroImage 54(1) (2011) 313-327. https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009
Classes: 0 background, 1 grey matter, 2 white matter, 3 other brain. Labelling rule: a voxel
outside the brain mask is background; inside it, the label is the largest of the three
probabilities p(GM), p(WM) and p(other) = 1 - p(GM) - p(WM) (ties go to GM, then WM). Slices:
axial, coronal and sagittal, every ``stride``-th slice (default 2) among those with at least
500 brain voxels, about 240 rows.

``colin27-lobes`` — the Colin27 single-subject T1 scan ("ch2", 1 mm, 181x217x181) with the AAL
atlas on the same grid, from Debian's ``mricron-data`` package
(``/usr/share/mricron/templates/ch2.nii.gz``, ``aal.nii.gz``, names in ``aal.nii.txt``).
Sources: C. J. Holmes et al., "Enhancement of MR images using registration for signal averaging",
J. Comput. Assist. Tomogr. 22(2) (1998) 324-333; N. Tzourio-Mazoyer et al., "Automated anatomical
labeling of activations in SPM using a macroscopic anatomical parcellation of the MNI MRI
single-subject brain", NeuroImage 15(1) (2002) 273-289. The 116 AAL regions are grouped into
9 classes by region number (see :data:`AAL_GROUPS`):

    0 background          everything AAL leaves unlabelled (white matter, CSF, outside the brain)
    1 frontal             1-28 (precentral, frontal gyri, rolandic operculum, SMA, olfactory,
                          rectus), 69-70 (paracentral lobule)
    2 temporal            55-56 (fusiform), 79-90 (Heschl, temporal gyri and poles)
    3 parietal            57-68 (postcentral, parietal, supramarginal, angular, precuneus)
    4 occipital           43-54 (calcarine, cuneus, lingual, occipital gyri)
    5 limbic              29-42 (insula, cingulum, hippocampus, parahippocampal, amygdala)
    6 subcortical grey    71-78 (caudate, putamen, pallidum, thalamus)
    7 cerebellum          91-108 (cerebellar hemispheres)
    8 vermis              109-116

Slices: every axial, coronal and sagittal slice that contains an AAL label (about 470 rows).

Both scans come from one brain each, so neighbouring slices are nearly identical: the split is by
slice range, never at random. For each orientation the slice range is cut into five contiguous
blocks; the middle block (40-60 %) is ``val`` (it contains every class), the rest is ``train``,
and ``margin`` slices (default 3) on each side of the val block are left out so that no train slice
sits right next to a val slice.

``digits-scenes`` — small images with small objects, one instance map per image: the 1,797
handwritten digits of the UCI "Optical Recognition of Handwritten Digits" set (E. Alpaydin,
C. Kaynak, 1998; 8x8 images, 16 grey levels, 43 writers), as bundled in the ``scikit-learn``
wheel (``sklearn.datasets.load_digits``). Each row is a ``size``-pixel square (default 96) RGB
scene: a smooth dark background with noise, and 1-4 digits, each enlarged (bilinear) to 22-34 px,
drawn in a random bright colour at a random place, never overlapping another. A pixel belongs to a
digit where the enlarged digit's ink is at least half its full strength; its class is the digit
(classes ``background``, ``digit 0`` ... ``digit 9``) and its instance id is the digit's order in
the scene.
The split is by digit image: ``train`` scenes (default 600) draw from the first 80 % of the 1,797
digits, ``val`` scenes (default 150) from the rest, so no handwritten sample appears in both.
The scenes are drawn from ``seed`` (default 0): the same arguments build the same rows.

The scans' images are 8-bit grey (L) PNGs, intensities scaled per volume (0 -> 0, 99.5th
percentile of the non-zero voxels -> 255). Slices are oriented for display: anterior or superior
at the top. Axial slices are X x Y, coronal X x Z, sagittal Y x Z, so image sizes differ by
orientation.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segplatform.data.format import (
    ConvertReport,
    DatasetError,
    DatasetInfo,
    Sample,
)

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
ORIENTATIONS: tuple[str, ...] = ("axial", "coronal", "sagittal")
# Fraction of each orientation's slice range held out for validation (start, end).
VAL_BLOCK: tuple[float, float] = (0.4, 0.6)

MNI_CLASSES: tuple[str, ...] = ("background", "grey matter", "white matter", "other brain")
MNI_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
)

COLIN_CLASSES: tuple[str, ...] = (
    "background",
    "frontal",
    "temporal",
    "parietal",
    "occipital",
    "limbic",
    "subcortical grey",
    "cerebellum",
    "vermis",
)
COLIN_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)
# class index -> AAL region numbers (inclusive ranges), as in the module docstring.
AAL_GROUPS: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((1, 28), (69, 70)),
    2: ((55, 56), (79, 90)),
    3: ((57, 68),),
    4: ((43, 54),),
    5: ((29, 42),),
    6: ((71, 78),),
    7: ((91, 108),),
    8: ((109, 116),),
}

SourceFn = Callable[..., tuple[DatasetInfo, Iterator[tuple[str, Sample]]]]


def _require(module: str, install: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DatasetError(
            f"the built-in brain datasets need the Python package {module!r}: {install}"
        ) from exc


def _check_same_grid(image: Any, labels: Any, image_name: str, labels_name: str) -> Any:
    """Return ``labels`` on the grid of ``image``; resample (nearest) if shape/affine differ."""
    if image.shape[:3] == labels.shape[:3] and np.allclose(image.affine, labels.affine, atol=1e-4):
        return labels
    try:
        from nilearn.image import resample_to_img
    except ImportError as exc:
        raise DatasetError(
            f"{labels_name} (shape {labels.shape}) is not on the grid of {image_name} "
            f"(shape {image.shape}) and nilearn is not installed to resample it "
            "(pip install nilearn)"
        ) from exc
    return resample_to_img(
        labels, image, interpolation="nearest", force_resample=True, copy_header=True
    )


def _to_uint8(volume: np.ndarray) -> np.ndarray:
    """Scale a volume to uint8: 0 -> 0, 99.5th percentile of non-zero voxels -> 255."""
    volume = np.nan_to_num(volume.astype(np.float32))
    nonzero = volume[volume > 0]
    top = float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0
    scaled = np.clip(volume / max(top, 1e-6), 0.0, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8)


def _slice(volume: np.ndarray, orientation: str, index: int) -> np.ndarray:
    """One 2D slice of a RAS volume, anterior/superior at the top."""
    if orientation == "axial":
        plane = volume[:, :, index]  # (X, Y)
    elif orientation == "coronal":
        plane = volume[:, index, :]  # (X, Z)
    else:
        plane = volume[index, :, :]  # (Y, Z)
    return np.ascontiguousarray(np.flipud(plane.T))  # (Y|Z, X|Y)


def _axis(orientation: str) -> int:
    return {"axial": 2, "coronal": 1, "sagittal": 0}[orientation]


def split_slices(indices: list[int], margin: int) -> dict[int, str]:
    """Slice index -> "train"/"val": the middle block of the range is val, margins dropped."""
    count = len(indices)
    start, end = round(count * VAL_BLOCK[0]), round(count * VAL_BLOCK[1])
    assignment: dict[int, str] = {}
    for position, index in enumerate(indices):
        if start <= position < end:
            assignment[index] = "val"
        elif position < start - margin or position >= end + margin:
            assignment[index] = "train"
    return assignment


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _slices(
    image: np.ndarray,
    labels: np.ndarray,
    keep: Callable[[np.ndarray], np.ndarray],
    stride: int,
    margin: int,
    source: str,
) -> Iterator[tuple[str, Sample]]:
    """(split, Sample) for every kept slice of every orientation."""
    for orientation in ORIENTATIONS:
        axis = _axis(orientation)
        candidates = [int(i) for i in np.nonzero(keep(np.moveaxis(labels, axis, 0)))[0]]
        chosen = candidates[::stride]
        for index, split in sorted(split_slices(chosen, margin).items()):
            yield (
                split,
                Sample(
                    id=f"{orientation}-{index:03d}",
                    image=_png(_slice(image, orientation, index)),
                    mask=_slice(labels, orientation, index),
                    source=f"{source} [{orientation} slice {index}]",
                ),
            )


def mni152_tissue(
    *, stride: int = 2, margin: int = 3, min_brain_voxels: int = 500
) -> tuple[DatasetInfo, Iterator[tuple[str, Sample]]]:
    """The MNI152 tissue dataset (see the module docstring)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    _require("nibabel", "pip install nibabel (or the project's 'data' extra)")
    datasets = _require("nilearn.datasets", "pip install nilearn (or the project's 'data' extra)")
    template = datasets.load_mni152_template(resolution=1)
    grey = _check_same_grid(
        template, datasets.load_mni152_gm_template(resolution=1), "MNI152 T1", "MNI152 GM map"
    )
    white = _check_same_grid(
        template, datasets.load_mni152_wm_template(resolution=1), "MNI152 T1", "MNI152 WM map"
    )
    brain = _check_same_grid(
        template, datasets.load_mni152_brain_mask(resolution=1), "MNI152 T1", "MNI152 brain mask"
    )
    p_grey = np.asarray(grey.dataobj, dtype=np.float32)
    p_white = np.asarray(white.dataobj, dtype=np.float32)
    p_other = 1.0 - p_grey - p_white
    # The largest probability wins; ties go to GM, then WM.
    grey_wins = (p_grey >= p_white) & (p_grey >= p_other)
    white_wins = ~grey_wins & (p_white >= p_other)
    tissue = np.where(grey_wins, 1, np.where(white_wins, 2, 3)).astype(np.uint8)
    labels = np.where(np.asarray(brain.dataobj) > 0.5, tissue, 0).astype(np.uint8)
    image = _to_uint8(np.asarray(template.dataobj, dtype=np.float32))
    info = DatasetInfo("mni152-tissue", MNI_CLASSES, MNI_PALETTE, ignore_index=255)

    def keep(stack: np.ndarray) -> np.ndarray:
        return (stack > 0).reshape(stack.shape[0], -1).sum(axis=1) >= min_brain_voxels

    source = "nilearn MNI152 2009 template (1 mm)"
    return info, _slices(image, labels, keep, stride, margin, source)


def aal_to_lobes(aal: np.ndarray) -> np.ndarray:
    """Map AAL region numbers (0-116) to the 9 lobe classes of :data:`AAL_GROUPS`."""
    lookup = np.zeros(max(int(aal.max()), 116) + 1, dtype=np.uint8)
    for label, ranges in AAL_GROUPS.items():
        for first, last in ranges:
            lookup[first : last + 1] = label
    return lookup[aal]


def colin27_lobes(
    *, templates_dir: str | os.PathLike[str] | None = None, stride: int = 1, margin: int = 3
) -> tuple[DatasetInfo, Iterator[tuple[str, Sample]]]:
    """The Colin27 lobes dataset (see the module docstring)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    nibabel = _require("nibabel", "pip install nibabel (or the project's 'data' extra)")
    directory = Path(templates_dir) if templates_dir is not None else MRICRON_TEMPLATES
    paths = {name: directory / name for name in ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise DatasetError(
            f"colin27-lobes needs {', '.join(missing)}: install the Debian package mricron-data "
            "(apt-get install mricron-data)"
        )
    names = _aal_names(paths["aal.nii.txt"])
    if len(names) != 116 or names.get(1) != "Precentral_L" or names.get(116) != "Vermis_10":
        raise DatasetError(
            f"{paths['aal.nii.txt']}: expected the 116 AAL regions (1 Precentral_L ... "
            f"116 Vermis_10), found {len(names)}"
        )
    scan = nibabel.load(str(paths["ch2.nii.gz"]))
    atlas = _check_same_grid(
        scan,
        nibabel.load(str(paths["aal.nii.gz"])),
        str(paths["ch2.nii.gz"]),
        str(paths["aal.nii.gz"]),
    )
    aal = np.rint(np.asarray(atlas.dataobj)).astype(np.int32)
    if aal.min() < 0 or aal.max() > 116:
        raise DatasetError(f"{paths['aal.nii.gz']}: labels {aal.min()}..{aal.max()} not in 0..116")
    labels = aal_to_lobes(aal)
    image = _to_uint8(np.asarray(scan.dataobj))
    info = DatasetInfo("colin27-lobes", COLIN_CLASSES, COLIN_PALETTE, ignore_index=255)

    def keep(stack: np.ndarray) -> np.ndarray:
        return (stack > 0).reshape(stack.shape[0], -1).any(axis=1)

    source = f"{paths['ch2.nii.gz']} + {paths['aal.nii.gz']}"
    return info, _slices(image, labels, keep, stride, margin, source)


def _aal_names(path: Path) -> dict[int, str]:
    names: dict[int, str] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


DIGIT_CLASSES: tuple[str, ...] = ("background", *(f"digit {d}" for d in range(10)))
# Background black, then ten colours told apart by hue (Okabe-Ito and Tableau hues).
DIGIT_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (255, 255, 255),
    (140, 86, 75),
    (148, 103, 189),
)


def _boxes_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two squares ``(top, left, side)`` overlap (touching edges do not)."""
    return not (
        a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[2] <= b[1] or b[1] + b[2] <= a[1]
    )


def _digit_scene(
    rng: np.random.Generator,
    digits: np.ndarray,
    targets: np.ndarray,
    pool: np.ndarray,
    size: int,
    sides: tuple[int, int],
    max_digits: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """One scene: (RGB image, class mask, instance map, the digits' indices)."""
    rows, cols = np.indices((size, size), dtype=np.float32) / size
    tilt = rng.uniform(-1.0, 1.0, size=2)
    shade = 40.0 + 35.0 * (1.0 + tilt[0] * rows + tilt[1] * cols) + rng.normal(0, 6, (size, size))
    canvas = np.repeat(np.clip(shade, 0, 255)[..., None], 3, axis=2) * rng.uniform(0.7, 1.0, size=3)
    mask = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.uint16)
    placed: list[tuple[int, int, int]] = []
    used: list[int] = []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        side = int(rng.integers(sides[0], sides[1] + 1))
        for _ in range(30):  # a free place, if there is one
            box = (
                int(rng.integers(0, size - side + 1)),
                int(rng.integers(0, size - side + 1)),
                side,
            )
            if not any(_boxes_overlap(box, other) for other in placed):
                break
        else:
            continue
        index = int(rng.choice(pool))
        ink = Image.fromarray((digits[index] * (255.0 / 16.0)).astype(np.uint8))
        alpha = np.asarray(ink.resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255
        hue = rng.uniform(0, 1)
        colour = 255.0 * (0.55 + 0.45 * np.cos(2 * np.pi * (hue + np.array([0, 1 / 3, 2 / 3]))))
        colour = np.maximum(colour, 150.0)
        top, left, _ = box
        region = canvas[top : top + side, left : left + side]
        region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        ink_mask = alpha >= 0.5
        mask[top : top + side, left : left + side][ink_mask] = int(targets[index]) + 1
        instances[top : top + side, left : left + side][ink_mask] = len(placed) + 1
        placed.append(box)
        used.append(index)
    return np.clip(canvas, 0, 255).astype(np.uint8), mask, instances, used


def digits_scenes(
    *,
    train_rows: int = 600,
    val_rows: int = 150,
    size: int = 96,
    seed: int = 0,
    digit_sides: tuple[int, int] = (22, 34),
    max_digits: int = 4,
) -> tuple[DatasetInfo, Iterator[tuple[str, Sample]]]:
    """The handwritten-digit scenes (see the module docstring)."""
    if min(train_rows, val_rows) < 1:
        raise ValueError(f"train_rows and val_rows must be >= 1, got {train_rows}, {val_rows}")
    if not 8 <= digit_sides[0] <= digit_sides[1] <= size:
        raise ValueError(f"digit_sides must be 8 <= low <= high <= size, got {digit_sides}")
    datasets = _require(
        "sklearn.datasets", "pip install scikit-learn (or the project's 'data' extra)"
    )
    loaded = datasets.load_digits()
    digits, targets = np.asarray(loaded.images), np.asarray(loaded.target)
    cut = int(len(digits) * 0.8)
    pools = {"train": np.arange(cut), "val": np.arange(cut, len(digits))}
    info = DatasetInfo("digits-scenes", DIGIT_CLASSES, DIGIT_PALETTE, ignore_index=255)

    def rows() -> Iterator[tuple[str, Sample]]:
        for split, count in (("train", train_rows), ("val", val_rows)):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1])
            for row in range(count):
                image, mask, instances, used = _digit_scene(
                    rng, digits, targets, pools[split], size, digit_sides, max_digits
                )
                yield (
                    split,
                    Sample(
                        id=f"{split}-{row:04d}",
                        image=_png(image),
                        mask=mask,
                        instances=instances,
                        source=f"scikit-learn digits {used}",
                    ),
                )

    return info, rows()


BUILTIN_SOURCES: dict[str, SourceFn] = {
    "mni152-tissue": mni152_tissue,
    "colin27-lobes": colin27_lobes,
    "digits-scenes": digits_scenes,
}


def convert_builtin(
    name: str,
    dest_uri: str,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    show_progress: bool | None = None,
    **options: Any,
) -> ConvertReport:
    """Build the built-in source ``name`` and write it to ``dest_uri``."""
    from segplatform.data.convert import write_samples

    if name not in BUILTIN_SOURCES:
        raise KeyError(f"unknown built-in source {name!r}; valid: {', '.join(BUILTIN_SOURCES)}")
    info, samples = BUILTIN_SOURCES[name](**options)
    return write_samples(
        dest_uri,
        info,
        samples,
        lambda pair: pair,  # the source yields (split, sample) already
        description=f"building {name}",
        skip_bad=skip_bad,
        overwrite=overwrite,
        storage_options=storage_options,
        show_progress=show_progress,
    )
