"""A model that predicts one class everywhere says so: in the progress line, in the run's result,
on its MLflow run and on the registered version (it is not registered quietly)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from segplatform.metrics import ConfusionMatrix, one_class_everywhere
from segplatform.train import TrainConfig, run
from segplatform.train.loop import progress_line
from tests.train.conftest import CLASSES, TINY_UNET


def evaluation(target: list[int], predicted: list[int]) -> dict:
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor(predicted), torch.tensor(target))
    return matrix.compute()


def test_one_class_everywhere_is_told_from_a_model_that_predicts_several() -> None:
    target = [0] * 90 + [1] * 6 + [2] * 4
    assert one_class_everywhere(evaluation(target, [0] * 100)) == 0
    assert one_class_everywhere(evaluation(target, [2] * 100)) == 2
    assert one_class_everywhere(evaluation(target, [0] * 98 + [1] * 2)) is None
    # Targets that are one class themselves: predicting it is right, not a collapse.
    assert one_class_everywhere(evaluation([1] * 100, [1] * 100)) is None
    empty = ConfusionMatrix(3).compute()
    assert math.isnan(empty["predicted_frac"][0]) and one_class_everywhere(empty) is None


def test_the_progress_line_names_the_class() -> None:
    metrics = {"step": 4, "epoch": 1, "val_miou": 0.28572, "best_val_miou": 0.3, "val_one_class": 0}
    assert progress_line("r", 4, metrics, CLASSES) == (
        "r step 4/4 epoch 1 val mIoU 0.2857 (best 0.3000), predicts background everywhere"
    )


@pytest.mark.slow
def test_a_run_that_predicts_background_everywhere_says_so(
    ray_cluster: None, shapes_dataset: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Only background pixels weigh in the loss: the model soon predicts background everywhere.
    config = TrainConfig(
        **{
            **TINY_UNET,
            "num_workers": 0,
            "data": shapes_dataset,
            "storage_path": str(tmp_path / "runs"),
            "name": "one-class",
            "class_weights": (1.0, 0.0, 0.0),
            "optimizer": "adamw",
            "lr": 0.05,
            "max_iters": 10,
            "eval_every": 10,
            "mlflow_uri": tracking,
            "register_as": "one-class",
        }
    )
    result = run(config)
    assert result.metrics["val_one_class"] == 0 and result.metrics["val_top_class_frac"] == 1.0
    out = capfd.readouterr().out
    assert re.search(
        r"one-class step 10/10 .* val mIoU [0-9.]+ \(best [0-9.]+\), "
        r"predicts background everywhere",
        out,
    ), out
    warning = "the model predicts background everywhere on val: it has not learned the task"
    assert f"warning: run one-class: {warning}" in out
    client = MlflowClient(tracking)
    (mlflow_run,) = client.search_runs(
        [client.get_experiment_by_name(config.experiment).experiment_id]
    )
    assert mlflow_run.data.tags["warning"].startswith(warning)
    assert client.get_model_version("one-class", "1").tags["warning"].startswith(warning)
