"""Fully connected (dense) CRF post-processing, as DeepLab v1/v2 apply it to the network's output.

The model: Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NIPS 2011 — a Potts model over all pixel pairs with two Gaussian kernels, solved by
mean-field inference:

    k(i, j) = w1 · exp(-|p_i - p_j|² / 2σα² - |I_i - I_j|² / 2σβ²)    (bilateral, "appearance")
            + w2 · exp(-|p_i - p_j|² / 2σγ²)                           (Gaussian, "smoothness")

DeepLab (Chen et al., ICLR 2015, arXiv:1412.7062, §3.2 and §4.1; TPAMI 2018, arXiv:1606.00915,
§3.3 and §4.1) uses the DCNN's probabilities as unary terms (``-log P``), fixes w2 = 3 and
σγ = 3, cross-validates w1, σα and σβ on VOC val, and runs 10 mean-field iterations.

Defaults here (``CRFParams()``) are the cross-validated values published with the official
DeepLab v1 models for DeepLab-LargeFOV on PASCAL VOC 2012: bi_w = 4, bi_xy_std = 121,
bi_rgb_std = 5, pos_w = 3, pos_xy_std = 3, 10 iterations (per-model table of the official
release, http://liangchiehchen.com/projects/DeepLab_Models.html, code at
bitbucket.org/deeplab/deeplab-public; reproduced e.g. in github.com/CoinCheung/Deeplab-Large-FOV,
``utils/crf.py``). ``CRFParams.deeplab_v2_resnet101()`` gives the values
of the official DeepLab v2 ResNet-101 VOC model page
(http://liangchiehchen.com/projects/DeepLabv2_resnet.html): bi_w = 4, bi_xy_std = 67,
bi_rgb_std = 3, pos_w = 3, pos_xy_std = 1 (also in github.com/kazuto1011/deeplab-pytorch,
``configs/voc12.yaml``). Kernel widths are in pixels of the image the CRF runs on (DeepLab: the
full-resolution VOC image, at most 500×500), so rescale σα and σγ for much larger images.

The implementation is ``pydensecrf`` (the PyPI distribution ``pydensecrf2``, which builds
Krähenbühl's C++ code), installed with the optional extra: ``pip install 'segplatform[crf]'``.
This module imports it only when a CRF actually runs, so the rest of the platform works without.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CRFParams", "dense_crf", "dense_crf_probs"]

_INSTALL_HINT = (
    "dense CRF post-processing needs the optional 'crf' extra (the pydensecrf2 package, import "
    "name 'pydensecrf'): pip install 'segplatform[crf]'"
)


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF parameters; defaults: official DeepLab-LargeFOV values for PASCAL VOC."""

    iterations: int = 10  # mean-field iterations (paper: 10)
    gaussian_sxy: float = 3.0  # σγ, pixels: smoothness kernel width (pos_xy_std)
    gaussian_compat: float = 3.0  # w2: smoothness kernel weight (pos_w)
    bilateral_sxy: float = 121.0  # σα, pixels: appearance kernel spatial width (bi_xy_std)
    bilateral_srgb: float = 5.0  # σβ, intensity levels: appearance kernel colour width (bi_rgb_std)
    bilateral_compat: float = 4.0  # w1: appearance kernel weight (bi_w)

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"CRFParams.iterations must be an int >= 0, got {self.iterations!r}")
        for field in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, field) > 0:
                raise ValueError(f"CRFParams.{field} must be > 0, got {getattr(self, field)!r}")
        for field in ("gaussian_compat", "bilateral_compat"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"CRFParams.{field} must be >= 0, got {getattr(self, field)!r}")

    @classmethod
    def deeplab_v1_largefov(cls) -> CRFParams:
        """Official DeepLab-LargeFOV (v1) VOC values; the defaults."""
        return cls()

    @classmethod
    def deeplab_v2_resnet101(cls) -> CRFParams:
        """Official DeepLab v2 ResNet-101 VOC values."""
        return cls(
            gaussian_sxy=1.0,
            gaussian_compat=3.0,
            bilateral_sxy=67.0,
            bilateral_srgb=3.0,
            bilateral_compat=4.0,
        )

    def to_dict(self) -> dict[str, Any]:
        """The keyword arguments of ``dense_crf`` these parameters stand for."""
        return dataclasses.asdict(self)


def _import_densecrf() -> Any:
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as error:  # also raised when sys.modules["pydensecrf"] is None
        raise ImportError(_INSTALL_HINT) from error
    return densecrf


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _prepare_image(image: Any, height: int, width: int) -> np.ndarray:
    image = _as_numpy(image)
    if image.dtype != np.uint8:
        raise ValueError(f"dense_crf: image must be uint8 (H, W, 3) or (H, W), got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:  # grey: the bilateral kernel needs three channels
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"dense_crf: image must have shape (H, W, 3), (H, W, 1) or (H, W), got {image.shape}"
        )
    if image.shape[:2] != (height, width):
        raise ValueError(
            f"dense_crf: image is {image.shape[0]}x{image.shape[1]} but probs are "
            f"{height}x{width} (probs must be (K, H, W) at image resolution)"
        )
    return np.ascontiguousarray(image)


def dense_crf_probs(
    image: Any,
    probs: Any,
    *,
    iterations: int = CRFParams.iterations,
    gaussian_sxy: float = CRFParams.gaussian_sxy,
    gaussian_compat: float = CRFParams.gaussian_compat,
    bilateral_sxy: float = CRFParams.bilateral_sxy,
    bilateral_srgb: float = CRFParams.bilateral_srgb,
    bilateral_compat: float = CRFParams.bilateral_compat,
) -> np.ndarray:
    """Mean-field marginals (K, H, W) float32 of the dense CRF; see ``dense_crf``."""
    params = CRFParams(
        iterations=iterations,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
    )
    densecrf = _import_densecrf()
    probs = _as_numpy(probs)
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"dense_crf: probs must have shape (K, H, W), got {probs.shape}")
    num_classes, height, width = probs.shape
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise ValueError("dense_crf: probs must be finite and non-negative (softmax output)")
    rgb = _prepare_image(image, height, width)

    unary = -np.log(np.clip(probs.astype(np.float32), 1e-8, 1.0))  # (K, H, W)
    unary = np.ascontiguousarray(unary.reshape(num_classes, height * width), dtype=np.float32)
    crf = densecrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=rgb,
        compat=params.bilateral_compat,
    )
    marginals = np.asarray(crf.inference(params.iterations), dtype=np.float32)  # (K, H*W)
    return marginals.reshape(num_classes, height, width)


def dense_crf(
    image: Any,
    probs: Any,
    *,
    iterations: int = CRFParams.iterations,
    gaussian_sxy: float = CRFParams.gaussian_sxy,
    gaussian_compat: float = CRFParams.gaussian_compat,
    bilateral_sxy: float = CRFParams.bilateral_sxy,
    bilateral_srgb: float = CRFParams.bilateral_srgb,
    bilateral_compat: float = CRFParams.bilateral_compat,
) -> np.ndarray:
    """Refine a soft segmentation with the fully connected CRF; return labels (H, W) int64.

    Args:
        image: the image the probabilities belong to, uint8, (H, W, 3) RGB, or (H, W) /
            (H, W, 1) grey (replicated to three channels). NumPy array or CPU/GPU tensor.
        probs: class probabilities (K, H, W) at the image's resolution (softmax of the logits).
        iterations, gaussian_*, bilateral_*: see ``CRFParams``; pass ``**params.to_dict()``.

    Raises ``ImportError`` naming the ``crf`` extra when pydensecrf is not installed, and
    ``ValueError`` for inputs of the wrong type or shape.
    """
    marginals = dense_crf_probs(
        image,
        probs,
        iterations=iterations,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
    )
    return marginals.argmax(axis=0).astype(np.int64)
