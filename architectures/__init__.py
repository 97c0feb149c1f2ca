"""Segmentation architectures: pure PyTorch models, one file per paper.

``ARCHITECTURES`` maps each registry name to its ``(ConfigClass, ModelClass)``; ``build_model``
builds one from keyword parameters whose names and defaults are the paper's (see each config).

    >>> from architectures import build_model
    >>> model = build_model("deeplab_v3", num_classes=21, output_stride=8)

Semantic models return ``{"out": logits}`` at input resolution (plus auxiliary outputs in
training mode only); ``mask_rcnn`` keeps torchvision's detection contract.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

# [imports]
from architectures.deeplab_v1 import DeepLabV1, DeepLabV1Config
from architectures.deeplab_v2 import DeepLabV2, DeepLabV2Config
from architectures.deeplab_v3 import DeepLabV3, DeepLabV3Config
from architectures.fcn import FCN, FCN8sConfig, FCN16sConfig, FCN32sConfig
from architectures.icnet import ICNet, ICNetConfig
from architectures.mask_rcnn import MaskRCNN, MaskRCNNConfig
from architectures.pspnet import PSPNet, PSPNetConfig
from architectures.refinenet import RefineNet, RefineNetConfig
from architectures.segnet import SegNet, SegNetConfig
from architectures.unet import UNet, UNetConfig

ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    # [registry]
    "fcn32s": (FCN32sConfig, FCN),
    "fcn16s": (FCN16sConfig, FCN),
    "fcn8s": (FCN8sConfig, FCN),
    "segnet": (SegNetConfig, SegNet),
    "unet": (UNetConfig, UNet),
    "mask_rcnn": (MaskRCNNConfig, MaskRCNN),
    "deeplab_v1": (DeepLabV1Config, DeepLabV1),
    "deeplab_v2": (DeepLabV2Config, DeepLabV2),
    "deeplab_v3": (DeepLabV3Config, DeepLabV3),
    "pspnet": (PSPNetConfig, PSPNet),
    "refinenet": (RefineNetConfig, RefineNet),
    "icnet": (ICNetConfig, ICNet),
}


def _entry(name: str) -> tuple[type, type[nn.Module]]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(
            f"unknown architecture {name!r}; valid names: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def config_class(name: str) -> type:
    """The frozen config dataclass of architecture ``name``."""
    return _entry(name)[0]


def build_config(name: str, **params: Any) -> Any:
    """The config of ``name`` with ``params`` over the paper's defaults (TypeError if unknown)."""
    cls = config_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise TypeError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(fields)}"
        )
    # JSON and command lines give lists; configs hold tuples.
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return cls(**params)


def build_model(name: str, **params: Any) -> nn.Module:
    """Build architecture ``name``; unknown name → KeyError, unknown parameter → TypeError."""
    config = build_config(name, **params)
    return _entry(name)[1](config)


def build_from_config(name: str, config: Any) -> nn.Module:
    """Build architecture ``name`` from a config object (e.g. ``ConfigClass.tiny()``)."""
    cls, model_cls = _entry(name)
    if not isinstance(config, cls):
        raise TypeError(f"{name}: expected a {cls.__name__}, got {type(config).__name__}")
    return model_cls(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists); inverse of ``build_config``."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


__all__ = [
    "ARCHITECTURES",
    "build_config",
    "build_from_config",
    "build_model",
    "config_class",
    "config_to_dict",
]
