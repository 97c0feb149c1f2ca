"""The main job (``make run`` → ``segplatform quickstart``) as shipped, end to end, and the
distributed training run it leaves behind.

One quickstart (module fixture: the command's entry point, its default 150 iterations of a U-Net
with 2 Ray Train workers on the built-in real dataset ``mni152-tissue``, on the session's
in-process Ray cluster) feeds every test: what the command prints and registers, the run's
checkpoints and train state, the all-reduced validation metric against one process, the MLflow
run and registry, and resuming its run (refused under other settings; under the same settings
nothing left to train and its final state untouched).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from segplatform.cli import main
from segplatform.quickstart import MODEL_NAME, majority_miou
from segplatform.train import TrainConfig, run
from tests.resume_support import checkpoint_state, checkpoints, state_differences

pytestmark = pytest.mark.slow

MAX_ITERS = 150  # the quickstart's default
EVAL_EVERY = 50


@pytest.fixture(scope="module")
def quickstart(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import json

    import mlflow
    import ray.train

    workdir = tmp_path_factory.mktemp("quickstart")
    tracking_before = mlflow.get_tracking_uri()
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output):
        patch.delenv("RAY_ADDRESS", raising=False)
        status = main(["quickstart", "--workdir", str(workdir)])
    out = output.getvalue()
    assert status == 0, out[-5000:]
    # The command asked its own registry; the process's MLflow settings are as they were.
    assert mlflow.get_tracking_uri() == tracking_before
    (run_dir,) = (workdir / "runs").iterdir()
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    return {
        "workdir": workdir,
        "out": out,
        "config": config,
        "run_dir": run_dir,
        "result": ray.train.Result.from_path(str(run_dir)),
    }


def test_the_main_job_trains_a_model_that_does_the_task(quickstart: dict[str, Any]) -> None:
    """``make run`` as shipped: the registered champion separates the tissues (val mIoU >= 0.80,
    every class >= 0.60 IoU), and the overlay is written."""
    out, workdir = quickstart["out"], quickstart["workdir"]
    overlay_line = next(line for line in out.splitlines() if line.startswith("overlay image:"))
    overlay = Image.open(overlay_line.split(":", 1)[1].strip())
    assert overlay.width > 3 * 160  # image | truth | prediction, titled, with a legend
    assert "grey matter" in out and "mean IoU" in out  # the per-class table

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    run_record = client.get_run(version.run_id)
    assert run_record.info.status == "FINISHED"
    assert run_record.data.metrics["val_miou"] >= 0.80, run_record.data.metrics
    assert (workdir / "data" / "mni152-tissue" / "dataset.json").exists()
    val_line = next(line for line in out.splitlines() if line.startswith("val mIoU:"))
    assert float(val_line.split()[2]) >= 0.80, val_line
    ious = {
        line[:16].strip(): float(line[16:25])
        for line in out.splitlines()
        if line[:16].strip() in ("background", "grey matter", "white matter", "other brain")
    }
    assert len(ious) == 4 and min(ious.values()) >= 60.0, ious


def test_two_workers_learn_beyond_the_majority_baseline(quickstart: dict[str, Any]) -> None:
    metrics = quickstart["result"].metrics
    config = quickstart["config"]
    assert (config.max_iters, config.eval_every, config.num_workers) == (MAX_ITERS, EVAL_EVERY, 2)
    assert metrics["step"] == MAX_ITERS and metrics["attempt"] == 1 and metrics["start_step"] == 0
    baseline = majority_miou(config.data, "val", 4)
    assert metrics["best_val_miou"] > baseline + 0.5, (metrics, baseline)
    # Every worker recorded where it ran; DDP kept the replicas identical.
    assert metrics["worker_ranks"] == [0, 1] and metrics["worker_local_ranks"] == [0, 1]
    assert len(metrics["worker_node_ids"]) == 2 and all(metrics["worker_node_ids"])
    assert metrics["param_checksums"][0] == metrics["param_checksums"][1]


def test_checkpoints_hold_package_and_train_state(quickstart: dict[str, Any]) -> None:
    from segplatform.package import load_package
    from segplatform.train.run import best_checkpoint

    result, run_dir = quickstart["result"], quickstart["run_dir"]
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
    assert meta.in_channels == 1  # the grey scans
    assert meta.metrics["val_miou"] == pytest.approx(result.metrics["val_miou"])
    assert meta.extra["step"] == MAX_ITERS and meta.extra["run_name"] == run_dir.name
    out = model(torch.zeros(1, 1, 40, 48))["out"]
    assert out.shape == (1, 4, 40, 48)


def test_distributed_miou_equals_single_process_miou(quickstart: dict[str, Any]) -> None:
    """The all-reduced confusion matrix of 2 workers = one process over the whole split."""
    from segplatform.data.reader import iter_samples
    from segplatform.inference import InferenceRecipe, predict_probs
    from segplatform.metrics import ConfusionMatrix
    from segplatform.package import load_package
    from segplatform.train.transforms import EvalTransform

    result = quickstart["result"]
    model, meta = load_package(Path(result.checkpoint.path) / "model")
    transform = EvalTransform(
        in_channels=meta.in_channels,
        mean=meta.normalization["mean"],
        std=meta.normalization["std"],
        ignore_index=meta.ignore_index,
    )
    matrix = ConfusionMatrix(meta.num_classes, meta.ignore_index)
    for sample in iter_samples(quickstart["config"].data, "val"):
        image, mask = transform(sample["image"], sample["mask"])
        probs = predict_probs(model, image[None], InferenceRecipe(), num_classes=4)
        matrix.update(probs.argmax(1), mask[None])
    assert matrix.compute()["miou"] == pytest.approx(result.metrics["val_miou"], abs=1e-12)


def test_mlflow_run_metrics_artifacts_and_registered_model(quickstart: dict[str, Any]) -> None:
    config = quickstart["config"]
    client = MlflowClient(config.mlflow_uri)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.tags["ray_run_name"] == config.name
    assert version.tags["dataset"] == config.data and version.tags["manifest_version"] == "1"
    assert version.tags["git_commit"]
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["train.arch"] == "unet"
    history = client.get_metric_history(version.run_id, "val_miou")
    assert [m.step for m in history] == list(range(EVAL_EVERY, MAX_ITERS + 1, EVAL_EVERY))
    assert len(client.get_metric_history(version.run_id, "loss")) == MAX_ITERS // config.log_every
    top = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"model", "eval", "overlays"} <= top
    model_files = {Path(a.path).name for a in client.list_artifacts(version.run_id, "model")}
    assert {"model.json", "model.safetensors"} <= model_files
    overlays = [a.path for a in client.list_artifacts(version.run_id, "overlays")]
    assert len(overlays) == config.overlay_samples * len(history)


def test_resuming_under_other_settings_is_refused_naming_them(quickstart: dict[str, Any]) -> None:
    from segplatform.train.run import ResumeMismatchError

    config, run_dir = quickstart["config"], quickstart["run_dir"]
    other = config.replace(max_iters=MAX_ITERS + 2, lr=0.002, register_as=None)
    with pytest.raises(ResumeMismatchError) as refused:
        run(other)
    assert "lr: 0.001 -> 0.002; max_iters: 150 -> 152" in str(refused.value)
    # The same settings resume the finished run: nothing is left to train, no checkpoint is
    # written, and the final one is untouched.
    before = checkpoints(str(run_dir))
    final = checkpoint_state(before[MAX_ITERS][-1])
    again = run(config.replace(mlflow_uri=None, register_as=None))
    assert again.metrics["step"] == MAX_ITERS
    assert checkpoints(str(run_dir)) == before
    assert again.checkpoint.path == before[MAX_ITERS][-1]
    untouched = checkpoint_state(again.checkpoint.path)
    assert untouched.step == final.step == MAX_ITERS
    assert state_differences(untouched, final) == []


def test_majority_baseline_matches_its_definition(tmp_path, tiny_dataset):
    info = tiny_dataset(tmp_path / "d", splits={"val": 3}, num_classes=3)
    from segplatform.data.reader import iter_samples

    masks = np.concatenate([s["mask"].ravel() for s in iter_samples(str(tmp_path / "d"), "val")])
    counts = np.bincount(masks[masks < 3], minlength=3)
    expected = counts.max() / counts.sum() / (counts > 0).sum()
    assert majority_miou(str(tmp_path / "d"), "val", info.num_classes) == expected
