"""The model a replica serves: resolving registry URIs, loading, probing, batched inference.

A model URI is a package directory, an fsspec URI (``s3://...``) or an MLflow registry URI:
``models:/NAME@ALIAS`` (resolved to the version the alias points at now, which is then loaded as
``models:/NAME/VERSION`` so that the version reported is the version loaded), or
``models:/NAME/VERSION``. Packages load through ``segplatform.package.load_package``: the
network is rebuilt with ``architectures.build_model`` and the safetensors weights are read without
unpickling.

Inference is ``segplatform.inference.segment`` called as ``segplatform.evaluate.segment_image``
calls it (the package's classes, channels, normalization and recipe; ``recipe_for`` likewise),
so the endpoint returns what ``segplatform evaluate`` measured; ``segplatform.evaluate`` itself
is not imported because its dataset reader brings pyarrow and pandas into every replica.
``segment_batch`` runs several images of one size and recipe in one forward pass and gives the
same labels as ``segment_image`` on each (images of different sizes or recipes run as separate
groups: padding them to a common size would change the logits near the borders of networks with
zero-padded convolutions and global pooling).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from segplatform.inference import InferenceRecipe, predict_probs, segment, to_tensor
from segplatform.package import ModelPackage, load_package

logger = logging.getLogger(__name__)

REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
# Image sides tried when probing the smallest input a network takes (whole-image recipes).
PROBE_SIDES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# Images above this many pixels return their freed memory to the system after inference.
TRIM_PIXELS = 1 << 20


def recipe_for(meta: ModelPackage, **overrides: Any) -> InferenceRecipe:
    """``segplatform.evaluate.recipe_for``: the package's recipe with ``overrides``."""
    base = InferenceRecipe.from_dict(meta.inference).to_dict()
    base.update({k: v for k, v in overrides.items() if v is not None})
    return InferenceRecipe.from_dict(base)


def segment_image(
    model: nn.Module, meta: ModelPackage, image: np.ndarray, recipe: InferenceRecipe, device: str
) -> np.ndarray:
    """The label map of ``segplatform.evaluate.segment_image(model, meta, image, recipe=...)``."""
    return segment(
        model,
        image,
        recipe=recipe,
        num_classes=meta.num_classes,
        in_channels=meta.in_channels,
        normalization=meta.normalization,
        device=device,
    )[0]


def release_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``; a no-op elsewhere).

    A large image's tensors are freed after its request, but glibc keeps the pages of the
    inference thread's arena; without this a replica's RSS keeps the high-water mark of the
    largest image it has seen.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


@dataclass(frozen=True)
class ModelRef:
    """What a model URI names."""

    uri: str  # as configured
    name: str  # registered model name, or the package directory's last component
    alias: str | None = None  # models:/NAME@ALIAS
    version: str | None = None  # models:/NAME/VERSION

    @property
    def is_registry(self) -> bool:
        return self.uri.startswith("models:/")

    @property
    def follows_alias(self) -> bool:
        return self.alias is not None


def parse_model_uri(uri: str) -> ModelRef:
    """``ModelRef`` of ``uri``; ValueError for a ``models:/`` URI of another shape."""
    uri = str(uri).strip()
    if uri.startswith("models:/"):
        match = REGISTRY_URI.match(uri)
        if match is None:
            raise ValueError(
                f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION (a registered "
                "model name and an alias or version)"
            )
        return ModelRef(uri, match["name"], match["alias"], match["version"])
    name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
    return ModelRef(uri, name)


def resolve_alias(ref: ModelRef, tracking_uri: str | None = None) -> str:
    """The version ``ref``'s alias points at now (MLflow registry; a registry that does not
    answer fails the call within seconds: the alias watch retries every interval)."""
    from mlflow import MlflowClient

    from segplatform.tracking import fail_fast

    fail_fast()
    client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()
    return str(client.get_model_version_by_alias(ref.name, ref.alias).version)


@dataclass(frozen=True)
class ServedModel:
    """A loaded model with what the endpoint reports about it."""

    model: nn.Module
    meta: ModelPackage
    ref: ModelRef
    version: str | None  # registry version loaded (None for a plain package)
    device: str
    min_side: int  # smallest image side the network takes (at scale 1)
    recipe: InferenceRecipe  # the package's recipe
    loaded_at: float  # time.time() of the load

    @property
    def source(self) -> str:
        """The URI that was loaded (the registry version, not the alias)."""
        if self.ref.is_registry and self.version is not None:
            return f"models:/{self.ref.name}/{self.version}"
        return self.ref.uri

    def describe(self) -> dict[str, Any]:
        """Name, version, alias, architecture, classes, metrics and recipe (no secrets)."""
        meta = self.meta
        return {
            "name": self.ref.name,
            "version": self.version,
            "alias": self.ref.alias,
            "uri": self.source,
            "architecture": meta.architecture,
            "classes": list(meta.classes),
            "palette": [list(rgb) for rgb in meta.palette],
            "ignore_index": meta.ignore_index,
            "in_channels": meta.in_channels,
            "normalization": meta.normalization,
            "recipe": self.recipe.to_dict(),
            "metrics": _json_safe(meta.metrics),
            "min_side": self.min_side,
            "device": self.device,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
        }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_served_model(
    uri: str,
    *,
    device: str | None = None,
    tracking_uri: str | None = None,
    version: str | None = None,
    min_side: int | None = None,
) -> ServedModel:
    """Load the model ``uri`` names (``version``: the alias's version, already resolved)."""
    ref = parse_model_uri(uri)
    device = device or default_device()
    if ref.is_registry:
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if ref.follows_alias and version is None:
            version = resolve_alias(ref, tracking_uri)
        version = version or ref.version
        source = f"models:/{ref.name}/{version}"
    else:
        source = ref.uri
    model, meta = load_package(source, device=device)  # in the inference path's layout
    recipe = recipe_for(meta)
    if min_side is None:
        min_side = probe_min_side(model, meta, recipe, device)
    return ServedModel(model, meta, ref, version, device, min_side, recipe, time.time())


def probe_min_side(
    model: nn.Module, meta: ModelPackage, recipe: InferenceRecipe, device: str
) -> int:
    """The smallest side in ``PROBE_SIDES`` whose square image the network takes at scale 1.

    Sliding-window recipes pad small images up to the window, so any side works for them.
    """
    if recipe.mode == "slide":
        return 1
    whole = InferenceRecipe()
    with torch.inference_mode():
        for side in PROBE_SIDES:
            images = torch.zeros(1, meta.in_channels, side, side, device=device)
            try:
                probs = predict_probs(model, images, whole, num_classes=meta.num_classes)
            except Exception:  # shape errors: too small for the network's pooling
                continue
            if probs.shape[-2:] == (side, side) and bool(torch.isfinite(probs).all()):
                return side
    return PROBE_SIDES[-1]


def segment_batch(
    served: ServedModel, images: Sequence[np.ndarray], recipes: Sequence[InferenceRecipe]
) -> list[np.ndarray]:
    """Label maps of ``images`` (each under its recipe), images of one size and recipe batched.

    A group of one image goes through ``segment_image`` itself; larger groups run one
    ``predict_probs`` over the stacked tensors and then the same arg-max (or CRF) per image.
    """
    meta = served.meta
    results: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, (image, recipe) in enumerate(zip(images, recipes)):
        key = (image.shape, json_key(recipe))
        groups.setdefault(key, []).append(index)
    for indices in groups.values():
        recipe = recipes[indices[0]]
        if len(indices) == 1 or recipe.crf:
            for index in indices:
                results[index] = segment_image(
                    served.model, meta, images[index], recipe, served.device
                )
            continue
        tensors = [
            to_tensor(
                images[index],
                in_channels=meta.in_channels,
                mean=meta.normalization["mean"],
                std=meta.normalization["std"],
            )
            for index in indices
        ]
        batch = torch.cat(tensors).to(served.device)  # (B, C, H, W); convs follow the weights
        probs = predict_probs(served.model, batch, recipe, num_classes=meta.num_classes)
        labels = probs.argmax(dim=1).cpu().numpy()  # (B, H, W)
        dtype = np.uint8 if meta.num_classes <= 256 else np.uint16
        for row, index in enumerate(indices):
            results[index] = labels[row].astype(dtype)
        del batch, probs
    return [r for r in results if r is not None]


def json_key(recipe: InferenceRecipe) -> tuple[Any, ...]:
    """A hashable key of a recipe."""
    return tuple(sorted((k, str(v)) for k, v in recipe.to_dict().items()))
