"""Distributed training on a local Ray cluster: 2 CPU workers, real data, MLflow, checkpoints.

One run (module fixture) trains a small U-Net on the built-in MNI152 tissue slices with two
workers, evaluates twice, keeps the best checkpoint, logs to MLflow on SQLite and registers the
best model; the tests read what it left behind. A second run with the same name resumes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segplatform.train import TrainConfig, run

pytestmark = pytest.mark.slow

MAX_ITERS = 80
EVAL_EVERY = 40


@pytest.fixture(scope="module")
def trained(
    ray_cluster: None, mni_dataset: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("trained")
    config = TrainConfig(
        arch="unet",
        tiny=True,
        arch_params={"padding": "same"},
        data=mni_dataset,
        crop_size=(128, 128),
        scale_range=(1.0, 1.0),
        batch_size=4,
        num_workers=2,
        max_iters=MAX_ITERS,
        eval_every=EVAL_EVERY,
        log_every=5,
        optimizer="adamw",
        lr=0.003,
        weight_decay=1e-4,
        keep_checkpoints=1,
        storage_path=str(root / "runs"),
        name="unet-mni",
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment="train-tests",
        register_as="unet-mni",
    )
    result = run(config)
    return {"config": config, "result": result, "root": root}


def _majority_miou(uri: str, num_classes: int) -> float:
    """mIoU of predicting the most frequent class everywhere (its IoU = its pixel share)."""
    from segplatform.data.reader import iter_samples

    counts = np.zeros(num_classes)
    for sample in iter_samples(uri, "val"):
        labels = sample["mask"][sample["mask"] != 255]
        counts += np.bincount(labels, minlength=num_classes)[:num_classes]
    return float(counts.max() / counts.sum() / np.count_nonzero(counts))


def test_two_workers_learn_beyond_the_majority_baseline(trained: dict, mni_dataset: str) -> None:
    metrics = trained["result"].metrics
    assert metrics["step"] == MAX_ITERS and metrics["attempt"] == 1 and metrics["start_step"] == 0
    baseline = _majority_miou(mni_dataset, 4)
    assert metrics["best_val_miou"] > baseline + 0.1, (metrics, baseline)
    # Every worker recorded where it ran; DDP kept the replicas identical.
    assert metrics["worker_ranks"] == [0, 1] and metrics["worker_local_ranks"] == [0, 1]
    assert len(metrics["worker_node_ids"]) == 2 and all(metrics["worker_node_ids"])
    assert metrics["param_checksums"][0] == metrics["param_checksums"][1]


def test_checkpoints_hold_package_and_train_state(trained: dict) -> None:
    from segplatform.package import load_package
    from segplatform.train.run import best_checkpoint

    result = trained["result"]
    run_dir = Path(trained["config"].storage_path) / "unet-mni"
    on_disk = sorted(p.name for p in run_dir.glob("checkpoint_step*"))
    # keep_checkpoints=1: the best by val_miou stays (Ray also keeps the latest, for resume).
    assert len(result.best_checkpoints) == 1
    best, best_metrics = best_checkpoint(result)
    assert best_metrics["val_miou"] == max(m["val_miou"] for _, m in result.best_checkpoints)
    assert Path(best.path).name in on_disk and len(on_disk) <= 2
    latest = Path(result.checkpoint.path)
    assert latest.name.startswith(f"checkpoint_step{MAX_ITERS:08d}")
    state = torch.load(latest / "train_state.pt", weights_only=True)  # no unpickling
    assert state["step"] == MAX_ITERS and state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == MAX_ITERS
    model, meta = load_package(latest / "model")
    assert meta.architecture == "unet" and meta.classes[0] == "background"
    assert meta.metrics["val_miou"] == pytest.approx(result.metrics["val_miou"])
    assert meta.extra["step"] == MAX_ITERS and meta.extra["run_name"] == "unet-mni"
    out = model(torch.zeros(1, 3, 40, 48))["out"]
    assert out.shape == (1, 4, 40, 48)


def test_distributed_miou_equals_single_process_miou(trained: dict, mni_dataset: str) -> None:
    """The all-reduced confusion matrix of 2 workers = one process over the whole split."""
    from segplatform.data.reader import iter_samples
    from segplatform.inference import InferenceRecipe, predict_probs
    from segplatform.metrics import ConfusionMatrix
    from segplatform.package import load_package
    from segplatform.train.transforms import EvalTransform

    result = trained["result"]
    model, meta = load_package(Path(result.checkpoint.path) / "model")
    transform = EvalTransform(
        in_channels=3,
        mean=meta.normalization["mean"],
        std=meta.normalization["std"],
        ignore_index=meta.ignore_index,
    )
    matrix = ConfusionMatrix(meta.num_classes, meta.ignore_index)
    for sample in iter_samples(mni_dataset, "val"):
        image, mask = transform(sample["image"], sample["mask"])
        probs = predict_probs(model, image[None], InferenceRecipe(), num_classes=4)
        matrix.update(probs.argmax(1), mask[None])
    assert matrix.compute()["miou"] == pytest.approx(result.metrics["val_miou"], abs=1e-12)


def test_mlflow_run_metrics_artifacts_and_registered_model(trained: dict) -> None:
    from mlflow.tracking import MlflowClient

    config = trained["config"]
    client = MlflowClient(config.mlflow_uri)
    version = client.get_model_version_by_alias("unet-mni", "champion")
    assert version.tags["ray_run_name"] == "unet-mni"
    assert version.tags["dataset"] == config.data and version.tags["manifest_version"] == "1"
    assert version.tags["git_commit"]
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["train.arch"] == "unet"
    history = client.get_metric_history(version.run_id, "val_miou")
    assert [m.step for m in history] == [EVAL_EVERY, MAX_ITERS]
    assert len(client.get_metric_history(version.run_id, "loss")) == MAX_ITERS // 5
    top = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"model", "eval", "overlays"} <= top
    model_files = {Path(a.path).name for a in client.list_artifacts(version.run_id, "model")}
    assert {"model.json", "model.safetensors"} <= model_files
    overlays = [a.path for a in client.list_artifacts(version.run_id, "overlays")]
    assert len(overlays) == 4  # 2 fixed validation samples × 2 evaluations


def test_resuming_under_other_settings_is_refused_naming_them(trained: dict) -> None:
    from segplatform.train.run import ResumeMismatchError

    config = trained["config"].replace(max_iters=MAX_ITERS + 2, lr=0.001, register_as=None)
    with pytest.raises(ResumeMismatchError) as refused:
        run(config)
    assert "lr: 0.003 -> 0.001; max_iters: 80 -> 82" in str(refused.value)
    # The same settings resume the finished run: nothing left to train, the same final step.
    again = run(trained["config"].replace(mlflow_uri=None, register_as=None)).metrics
    assert again["step"] == MAX_ITERS
