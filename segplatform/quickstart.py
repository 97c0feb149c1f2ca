"""The main job on one machine (``make run``): data → Ray Train → MLflow registry → predictions.

With nothing but this project installed, it

1. builds the built-in real dataset ``mni152-tissue`` (MNI152 T1 slices with grey-matter /
   white-matter / other-brain labels, from nilearn's bundled templates) unless it exists;
2. trains a U-Net (16 base channels) with 2 data-parallel Ray Train workers on a local Ray cluster,
   evaluating on the validation slices (one all-reduced confusion matrix) and checkpointing the
   best model by validation mIoU under ``runs/``;
3. tracks the run in MLflow on SQLite (``mlflow.db``) and registers the best model package as a
   version of ``unet-mni152`` with alias ``champion``;
4. loads ``models:/unet-mni152@champion`` back from the registry, evaluates it on the validation
   split and writes an overlay picture (image | ground truth | prediction) of a few validation
   slices, whose path it prints.

Everything lands under one working directory (default: the current one).
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASET = "mni152-tissue"
MODEL_NAME = "unet-mni152"
EXPERIMENT = "quickstart"


@dataclass(frozen=True)
class QuickstartResult:
    """Where the main job put things, and how well the model did."""

    dataset: str
    run_dir: str
    tracking_uri: str
    model_uri: str
    val_miou: float
    majority_miou: float
    overlay: str
    class_iou: dict[str, float]  # validation IoU per class (NaN: a class absent from val)


def majority_miou(data_uri: str, split: str, num_classes: int) -> float:
    """mIoU of predicting the split's most frequent class everywhere (the trivial baseline)."""
    from segplatform.data.reader import iter_samples

    counts = np.zeros(num_classes)
    for sample in iter_samples(data_uri, split):
        mask = sample["mask"]
        counts += np.bincount(mask[mask < num_classes].ravel(), minlength=num_classes)
    # Predicting class c everywhere: IoU_c = share of c; other present classes score 0.
    present = counts > 0
    return float(counts.max() / counts.sum() / present.sum())


def overlay_grid(model_uri: str, data_uri: str, out: Path, *, split: str = "val", count: int = 4):
    """Rows of image | ground truth | prediction for ``count`` evenly spaced slices of ``split``,
    with a class legend (``segplatform.visualize.comparison_grid``)."""
    from PIL import Image

    from segplatform.data.reader import iter_samples
    from segplatform.evaluate import segment_image
    from segplatform.package import load_package
    from segplatform.visualize import comparison_grid

    model, meta = load_package(model_uri)
    samples = list(iter_samples(data_uri, split))
    picks = [samples[i] for i in np.linspace(0, len(samples) - 1, count).round().astype(int)]
    rows = [(s["image"], s["mask"], segment_image(model, meta, s["image"])[0]) for s in picks]
    picture = comparison_grid(
        rows, meta.classes, meta.palette, ignore_index=meta.ignore_index, min_height=160
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(out)
    return out


def champion_package(tracking_uri: str, directory: str) -> str:
    """A copy, under ``directory``, of the model package that ``models:/unet-mni152@champion``
    names in the registry at ``tracking_uri`` (asked of that registry only: the process's MLflow
    settings are left as they were)."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion").version
    source = client.get_model_version_download_uri(MODEL_NAME, version)
    return mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=directory, tracking_uri=tracking_uri
    )


def run_quickstart(
    workdir: str | os.PathLike = ".",
    *,
    max_iters: int = 150,
    workers: int = 2,
    verbose: bool = False,
    log: Any = print,
) -> QuickstartResult:
    """Run the main job under ``workdir`` (see the module docstring)."""

    from segplatform.data.format import read_manifest
    from segplatform.data.sources import convert_builtin
    from segplatform.evaluate import evaluate_model
    from segplatform.metrics import format_table
    from segplatform.train import run
    from segplatform.train.recipes import resolve

    root = Path(workdir).resolve()
    data_uri = str(root / "data" / DATASET)
    if not (Path(data_uri) / "dataset.json").exists():
        log(f"building the built-in dataset {DATASET} in {data_uri}")
        convert_builtin(DATASET, data_uri)
    info = read_manifest(data_uri)
    log(f"dataset {data_uri}: {info.splits} rows, classes {', '.join(info.classes)}")

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    name = f"unet-mni152-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"
    # The from-scratch recipe of the U-Net (segplatform.train.recipes), as `segplatform train
    # --arch unet` resolves it, with the quickstart's model, data and budget.
    resolved = resolve(
        [
            (
                "quickstart",
                {
                    # The paper's U-Net at a quarter width (16..256 channels, 1.9M parameters),
                    # padded ("same") so that whole slices go through without overlap tiling,
                    # on the grey scans.
                    "arch_params": {"padding": "same", "base_channels": 16, "in_channels": 1},
                    "data": data_uri,
                    "crop_size": (128, 128),
                    # The slices share one scale (1 mm voxels): crops and flips only.
                    "scale_range": (1.0, 1.0),
                    "batch_size": 4,
                    "num_workers": workers,
                    "max_iters": max_iters,
                    "eval_every": max(max_iters // 3, 1),
                    "log_every": 10,
                    "keep_checkpoints": 1,
                    "storage_path": str(root / "runs"),
                    "name": name,
                    "mlflow_uri": tracking_uri,
                    "experiment": EXPERIMENT,
                    "register_as": MODEL_NAME,
                    # Evaluate what this run trained, even if an earlier run scored higher.
                    "promote": "always",
                    "verbose": verbose,
                },
            )
        ],
        arch="unet",
        recipe="scratch",
    )
    config = resolved.config
    log(resolved.line())
    log(f"training {name}: U-Net (16 base channels), {workers} workers, {max_iters} iterations")
    import ray

    started_ray = not ray.is_initialized()
    try:
        result = run(config)
    finally:
        if started_ray:
            ray.shutdown()
    run_dir = str(result.path)

    model_uri = f"models:/{MODEL_NAME}@champion"
    with tempfile.TemporaryDirectory(prefix="segplatform-champion-") as scratch:
        package = champion_package(tracking_uri, scratch)
        evaluation = evaluate_model(package, data_uri, split="val", device="cpu")
        overlay_path = overlay_grid(package, data_uri, root / "outputs" / f"{name}-overlay.png")
    baseline = majority_miou(data_uri, "val", info.num_classes)
    log(format_table(evaluation, evaluation["classes"]))
    log(f"validation mIoU {evaluation['miou']:.3f} (majority-class baseline {baseline:.3f})")
    return QuickstartResult(
        dataset=data_uri,
        run_dir=run_dir,
        tracking_uri=tracking_uri,
        model_uri=model_uri,
        val_miou=float(evaluation["miou"]),
        majority_miou=baseline,
        overlay=str(overlay_path),
        class_iou={name: float(v) for name, v in zip(evaluation["classes"], evaluation["iou"])},
    )
