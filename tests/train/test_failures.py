"""Failures that are not faults end a run at once, with one clear line and no retry; and the
validation split is scored row by row whatever the worker count.

- A diverging job (a learning rate far too high) stops at the first non-finite loss on every
  worker; the job exits 1 with one ``error: ... stopped (diverged)`` line, MLflow marks the run
  FAILED with the reason, and the worker group is not restarted (one attempt), although
  ``max_failures`` would allow three.
- A train row whose image cannot be decoded stops the run naming the row.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segplatform.train import TrainConfig, run
from segplatform.train.cli_args import job_main

pytestmark = pytest.mark.slow


def test_a_diverging_job_stops_at_once_with_one_line_and_no_retry(
    ray_cluster: None, shapes_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        "--data", shapes_dataset, "--tiny", "--arch-param", 'padding="same"', "--workers", "2",
        "--recipe", "paper", "--lr", "1e6", "--max-iters", "50", "--eval-every", "25",
        "--max-failures", "3", "--storage", str(tmp_path / "runs"), "--name", "nan-run",
        "--mlflow-uri", tracking, "--register-as", "nan-model", "--set", "overlay_samples=0",
    ]  # fmt: skip
    assert job_main("unet", argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: run nan-run stopped (diverged): loss is not finite at step")
    assert "--clip-grad-norm" in lines[0]

    client = MlflowClient(tracking)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("segplatform").experiment_id])
    assert mlflow_run.info.status == "FAILED"
    assert mlflow_run.data.tags["failure"].startswith("diverged: loss is not finite")
    attempts = [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "placement")]
    assert attempts == ["placement/attempt1.json"]  # no restart of the worker group
    assert not client.search_registered_models()  # nothing registered
    assert not (tmp_path / "runs" / "nan-run" / "failure.json").exists()  # consumed by the driver


def _corrupt_row(uri: str, split: str, row: int) -> str:
    """Truncate the image of ``row`` in the split's first shard; returns the row's id."""
    (shard,) = sorted((Path(uri) / split).glob("*.parquet"))
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[row] = images[row][:40]  # a PNG cut short
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images))
    pq.write_table(table, shard)
    return str(table.column("id")[row])


def test_an_undecodable_row_stops_the_run_naming_it(
    ray_cluster: None,
    shapes_writer,
    tmp_path: Path,
    tiny_unet,
) -> None:
    from segplatform.train.run import TrainingFailure

    data = str(tmp_path / "shapes")
    shapes_writer(data, train=8, val=2)
    bad = _corrupt_row(data, "train", 5)
    config = tiny_unet(
        data=data, max_iters=8, eval_every=4, storage_path=str(tmp_path / "runs"), name="bad"
    )
    with pytest.raises(TrainingFailure) as stopped:
        run(config)
    assert stopped.value.kind == "bad data"
    assert f"row {bad}: cannot decode" in str(stopped.value)


def test_validation_scores_every_row_when_the_workers_do_not_divide_it(
    ray_cluster: None, shapes_writer, tmp_path: Path, tiny_unet
) -> None:
    """5 validation rows on 2 workers: the run's mIoU is that of one pass over all 5."""
    from segplatform.evaluate import evaluate_model

    data = str(tmp_path / "shapes")
    shapes_writer(data, train=8, val=5)
    config: TrainConfig = tiny_unet(
        data=data, max_iters=2, storage_path=str(tmp_path / "runs"), name="val5"
    )
    result = run(config)
    single = evaluate_model(str(Path(result.checkpoint.path) / "model"), data, device="cpu")
    assert single["images"] == 5
    assert single["miou"] == pytest.approx(result.metrics["val_miou"], abs=1e-12)
