"""The model package: what training produces, MLflow registers and serving loads (README:
"Models: the package and the registry").

A package is a directory (local path, ``file://`` or any fsspec URI such as ``s3://``)::

    model.json          architecture name, model config, classes, palette, ignore_index,
                        input normalization and the inference recipe
    model.safetensors   the weights (loaded without unpickling)

``load_package`` rebuilds the network with ``architectures.build_model`` from ``model.json`` and
loads the weights, so any registry entry round-trips. Pretrained-weight paths are dropped from
the stored config: a package is self-contained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import architectures
from segplatform import __version__

PACKAGE_FORMAT = "segplatform.model/1"
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"

# ImageNet statistics (torchvision's pretrained backbones), on the 0..1 scale.
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class PackageError(ValueError):
    """A model package that cannot be read: missing file, unknown format, bad field."""


@dataclass(frozen=True)
class ModelPackage:
    """Metadata of a model package (the content of ``model.json``)."""

    architecture: str  # registry name, e.g. "deeplab_v3"
    config: dict[str, Any]  # architecture config fields (JSON types)
    classes: tuple[str, ...]  # class names, index = label id
    palette: tuple[tuple[int, int, int], ...]  # RGB colour per class
    ignore_index: int = 255  # label id excluded from metrics
    normalization: dict[str, list[float]] = field(
        default_factory=lambda: dict(IMAGENET_NORMALIZATION)
    )  # per-channel mean/std on the 0..1 scale
    inference: dict[str, Any] = field(default_factory=dict)  # InferenceRecipe fields
    metrics: dict[str, Any] = field(default_factory=dict)  # validation metrics at save time
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (run, dataset)
    format: str = PACKAGE_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 3))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["segplatform_version"] = __version__
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> ModelPackage:
        if not isinstance(data, dict):
            raise PackageError(f"{source}: model.json must hold an object")
        if data.get("format") != PACKAGE_FORMAT:
            raise PackageError(
                f"{source}: unknown package format {data.get('format')!r} "
                f"(this version reads {PACKAGE_FORMAT!r})"
            )
        missing = [k for k in ("architecture", "config", "classes", "palette") if k not in data]
        if missing:
            raise PackageError(f"{source}: model.json lacks field(s) {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["classes"] = tuple(data["classes"])
        kwargs["palette"] = tuple(tuple(int(c) for c in rgb) for rgb in data["palette"])
        return cls(**kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model behind DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _portable_config(config: Any) -> dict[str, Any]:
    """Config as JSON, without pretrained-weight locations (the package holds the weights)."""
    data = architectures.config_to_dict(config) if dataclasses.is_dataclass(config) else config
    return {k: (None if k.startswith("pretrained") else v) for k, v in dict(data).items()}


def _fs(uri: str, storage_options: dict | None):
    from segplatform.data.io import fsspec_filesystem

    fs, path = fsspec_filesystem(str(uri), storage_options)
    return fs, path.rstrip("/")


def save_package(
    directory: str | os.PathLike,
    model: nn.Module,
    arch: str,
    config: Any,
    *,
    classes: list[str] | tuple[str, ...],
    palette: list | tuple,
    ignore_index: int = 255,
    normalization: dict[str, list[float]] | None = None,
    inference: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write ``model`` as a package at ``directory`` (local or fsspec URI); return its location.

    The weights are written first and ``model.json`` last, so a directory with a ``model.json``
    is always complete.
    """
    import safetensors.torch

    architectures.config_class(arch)  # KeyError for an unknown name
    meta = ModelPackage(
        architecture=arch,
        config=_portable_config(config),
        classes=tuple(classes),
        palette=tuple(tuple(int(c) for c in rgb) for rgb in palette),
        ignore_index=int(ignore_index),
        normalization=dict(normalization or IMAGENET_NORMALIZATION),
        inference=dict(inference or {}),
        metrics=dict(metrics or {}),
        extra=dict(extra or {}),
    )
    if len(meta.palette) != len(meta.classes):
        raise PackageError(
            f"palette has {len(meta.palette)} colours for {len(meta.classes)} classes"
        )
    bare = _unwrap(model)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        # save_model handles tensors that share storage (tied weights), unlike save_file.
        safetensors.torch.save_model(bare, str(local / WEIGHTS))
        (local / MODEL_JSON).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
        fs, path = _fs(str(directory), storage_options)
        fs.makedirs(path, exist_ok=True)
        fs.put_file(str(local / WEIGHTS), f"{path}/{WEIGHTS}")
        fs.put_file(str(local / MODEL_JSON), f"{path}/{MODEL_JSON}")
    return str(directory)


def read_package_meta(uri: str | os.PathLike, storage_options: dict | None = None) -> ModelPackage:
    """Read and check ``model.json`` of the package at ``uri``."""
    fs, path = _fs(str(uri), storage_options)
    source = f"{uri}/{MODEL_JSON}"
    if not fs.exists(f"{path}/{MODEL_JSON}"):
        raise PackageError(f"{uri}: not a model package (no {MODEL_JSON})")
    try:
        data = json.loads(fs.cat_file(f"{path}/{MODEL_JSON}"))
    except json.JSONDecodeError as err:
        raise PackageError(f"{source}: invalid JSON ({err})") from None
    return ModelPackage.from_json(data, source)


def load_package(
    uri: str | os.PathLike,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
    *,
    memory_format: torch.memory_format | None = None,
) -> tuple[nn.Module, ModelPackage]:
    """Rebuild the model of the package at ``uri`` (eval mode, on ``device``) and its metadata.

    ``uri`` may also be an MLflow model URI (``models:/name@alias``, ``runs:/id/path``); it is
    downloaded first. The weights take ``memory_format``; None: the inference path's layout for
    the architecture and device (``segplatform.inference.inference_memory_format``), so that
    evaluation, prediction and serving run the same, faster, model.
    """
    import safetensors.torch

    uri = str(uri)
    if uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow.artifacts

        uri = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    meta = read_package_meta(uri, storage_options)
    try:
        model = architectures.build_model(meta.architecture, **meta.config)
    except (KeyError, TypeError, ValueError) as err:
        raise PackageError(f"{uri}: cannot rebuild {meta.architecture!r}: {err}") from None
    fs, path = _fs(uri, storage_options)
    if not fs.exists(f"{path}/{WEIGHTS}"):
        raise PackageError(f"{uri}: weights file {WEIGHTS} is missing")
    state = safetensors.torch.load(fs.cat_file(f"{path}/{WEIGHTS}"))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise PackageError(f"{uri}: weights do not match {meta.architecture} ({detail})") from None
    # save_model drops duplicated views of shared tensors; those come back through the tie.
    really_missing = [k for k in missing if not _is_tied(model, k, state)]
    if really_missing or unexpected:
        raise PackageError(
            f"{uri}: weights do not match {meta.architecture} "
            f"(missing {really_missing[:5]}, unexpected {list(unexpected)[:5]})"
        )
    if memory_format is None:
        from segplatform.inference import inference_memory_format

        memory_format = inference_memory_format(meta.architecture, device)
    return model.to(device, memory_format=memory_format).eval(), meta


def _is_tied(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether parameter ``key`` shares storage with a tensor that was loaded."""
    params = dict(model.state_dict(keep_vars=True))
    target = params.get(key)
    if target is None:
        return False
    ptr = target.data_ptr()
    return any(params[k].data_ptr() == ptr for k in state if k in params and k != key)
