"""Evaluate a model package on a dataset split, and predict masks for image files.

Both use the inference recipes of ``segplatform.inference`` (whole image, sliding window,
flip, multi-scale, CRF), so ``segplatform evaluate`` measures exactly what serving returns.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segplatform.data.reader import iter_samples
from segplatform.inference import InferenceRecipe, segment
from segplatform.metrics import ConfusionMatrix
from segplatform.package import ModelPackage, load_package
from segplatform.visualize import indexed_png, overlay, png_bytes


def recipe_for(meta: ModelPackage, **overrides: Any) -> InferenceRecipe:
    """The package's inference recipe with ``overrides`` (``None`` values keep the package's)."""
    base = InferenceRecipe.from_dict(meta.inference).to_dict()
    base.update({k: v for k, v in overrides.items() if v is not None})
    return InferenceRecipe.from_dict(base)


def segment_image(
    model: torch.nn.Module,
    meta: ModelPackage,
    image: np.ndarray,
    *,
    recipe: InferenceRecipe | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """``segment`` with the package's classes, channels, normalization and, unless ``recipe``
    is given, its inference recipe: label map (H, W) and probabilities (K, H, W)."""
    return segment(
        model,
        image,
        recipe=recipe if recipe is not None else recipe_for(meta),
        num_classes=meta.num_classes,
        in_channels=meta.in_channels,
        normalization=meta.normalization,
        device=device,
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_model(
    model_uri: str,
    data_uri: str,
    *,
    split: str = "val",
    recipe_overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    device: str | None = None,
    storage_options: dict | None = None,
    progress: Iterable | None = None,
) -> dict[str, Any]:
    """Metrics (FCN §5, one confusion matrix over the split) of a model package on a dataset."""
    device = device or default_device()
    model, meta = load_package(model_uri, device=device, storage_options=storage_options)
    recipe = recipe_for(meta, **(recipe_overrides or {}))
    matrix = ConfusionMatrix(meta.num_classes, ignore_index=meta.ignore_index)
    count = 0
    for sample in iter_samples(data_uri, split, storage_options):
        labels, _ = segment_image(model, meta, sample["image"], recipe=recipe, device=device)
        matrix.update(
            torch.from_numpy(labels.astype(np.int64)),
            torch.from_numpy(sample["mask"].astype(np.int64)),
        )
        count += 1
        if progress is not None:
            progress.advance()  # type: ignore[attr-defined]
        if limit is not None and count >= limit:
            break
    result = matrix.compute()
    return {
        "model": str(model_uri),
        "architecture": meta.architecture,
        "data": str(data_uri),
        "split": split,
        "images": count,
        "recipe": recipe.to_dict(),
        "classes": list(meta.classes),
        **result,
    }


def predict_files(
    model_uri: str,
    images: Sequence[str | Path],
    out_dir: str | Path,
    *,
    recipe_overrides: dict[str, Any] | None = None,
    device: str | None = None,
    alpha: float = 0.5,
) -> list[dict[str, str]]:
    """Write ``<stem>_mask.png`` (indexed PNG of class ids) and ``<stem>_overlay.png`` per image."""
    from PIL import Image

    device = device or default_device()
    model, meta = load_package(model_uri, device=device)
    recipe = recipe_for(meta, **(recipe_overrides or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, images):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        try:
            with Image.open(path) as handle:
                array = np.asarray(handle.convert("L" if meta.in_channels == 1 else "RGB"))
        except OSError as err:
            raise ValueError(f"{path}: cannot read image ({err})") from None
        labels, _ = segment_image(model, meta, array, recipe=recipe, device=device)
        mask_path = out / f"{path.stem}_mask.png"
        overlay_path = out / f"{path.stem}_overlay.png"
        mask_path.write_bytes(indexed_png(labels, meta.palette))
        blended = overlay(array, labels, meta.palette, alpha=alpha, ignore_index=meta.ignore_index)
        overlay_path.write_bytes(png_bytes(blended))
        written.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path)})
    return written


def result_json(result: dict[str, Any]) -> str:
    """JSON text of an evaluation result (NaN written as null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if dataclasses.is_dataclass(value):
            return clean(dataclasses.asdict(value))
        return value

    return json.dumps(clean(result), indent=2)
