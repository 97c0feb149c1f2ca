"""Dense CRF post-processing: it snaps a blurred, shifted, noisy prediction to a sharp colour edge;
grey images, input validation, and the message when the optional extra is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from segplatform.crf import CRFParams, dense_crf, dense_crf_probs

SIZE = 64


def _blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge replication."""
    radius = int(3 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(array, radius, mode="edge")
    rows = np.apply_along_axis(lambda r: np.convolve(r, taps, mode="valid"), 1, padded)
    return np.apply_along_axis(lambda c: np.convolve(c, taps, mode="valid"), 0, rows)


def _edge_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A slanted two-colour edge, its ground truth, and a poor prediction of it.

    The prediction's edge is shifted by 6 pixels, blurred (σ = 4) and noisy, so its argmax is
    wrong on a band along the true edge.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    truth = (xx + 0.5 * yy > 40).astype(np.int64)
    colours = np.where(truth[..., None] == 1, [200, 60, 40], [30, 90, 200]).astype(np.float64)
    image = np.clip(colours + rng.normal(0, 8, colours.shape), 0, 255).astype(np.uint8)
    shifted = (xx + 0.5 * yy > 46).astype(np.float64)
    foreground = _blur(shifted, 4) + rng.normal(0, 0.15, shifted.shape)
    foreground = np.clip(foreground, 0.02, 0.98)
    probs = np.stack([1 - foreground, foreground]).astype(np.float32)
    return image, truth, probs


def test_crf_moves_a_noisy_prediction_onto_the_sharp_edge() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    image, truth, probs = _edge_scene()
    before = (probs.argmax(axis=0) == truth).mean()
    labels = dense_crf(image, probs)  # the paper's defaults
    after = (labels == truth).mean()
    assert labels.shape == truth.shape and labels.dtype == np.int64
    assert before < 0.92  # the input really is wrong along the edge
    assert after > 0.97
    assert after - before > 0.05
    # The errors that remain are near the edge, not scattered noise.
    band = np.abs(np.mgrid[:SIZE, :SIZE][1] + 0.5 * np.mgrid[:SIZE, :SIZE][0] - 40) < 4
    assert (labels != truth)[~band].sum() == 0


def test_crf_without_the_image_term_cannot_find_the_edge() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    image, truth, probs = _edge_scene()
    with_image = (dense_crf(image, probs) == truth).mean()
    smoothing_only = (dense_crf(image, probs, bilateral_compat=0.0) == truth).mean()
    assert with_image > smoothing_only + 0.04


def test_grey_images_and_tensors_are_accepted() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    image, truth, probs = _edge_scene(seed=1)
    grey = image.mean(axis=2).astype(np.uint8)  # (H, W): replicated to three channels
    before = (probs.argmax(axis=0) == truth).mean()
    for variant in (grey, grey[:, :, None], torch.from_numpy(grey)):
        labels = dense_crf(variant, torch.from_numpy(probs), **CRFParams().to_dict())
        assert (labels == truth).mean() > before + 0.05
    marginals = dense_crf_probs(grey, probs, iterations=5)
    assert marginals.shape == probs.shape
    assert np.allclose(marginals.sum(axis=0), 1.0, atol=1e-4)


def test_bad_inputs_raise_value_errors_that_say_what_is_wrong() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    image, _, probs = _edge_scene()
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match=r"64x64 but probs are 32x64"):
        dense_crf(image, probs[:, :32])
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        dense_crf(image, probs[0])
    with pytest.raises(ValueError, match="non-negative"):
        dense_crf(image, -probs)


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, _, probs = _edge_scene()
    with pytest.raises(ImportError, match=r"pip install 'segplatform\[crf\]'"):
        dense_crf(image, probs)


def test_params_defaults_are_deeplabs_and_validated() -> None:
    defaults = CRFParams()
    assert defaults == CRFParams.deeplab_v1_largefov()
    assert (defaults.gaussian_sxy, defaults.gaussian_compat, defaults.iterations) == (3, 3, 10)
    assert (defaults.bilateral_sxy, defaults.bilateral_srgb, defaults.bilateral_compat) == (
        121,
        5,
        4,
    )
    v2 = CRFParams.deeplab_v2_resnet101()
    assert (v2.gaussian_sxy, v2.bilateral_sxy, v2.bilateral_srgb) == (1, 67, 3)
    with pytest.raises(ValueError, match="bilateral_srgb"):
        CRFParams(bilateral_srgb=0)
    with pytest.raises(ValueError, match="iterations"):
        CRFParams(iterations=-1)
