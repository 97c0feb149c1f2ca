"""A sweep job script run as ``python jobs/sweep_pspnet.py ...`` runs it (its ``__main__``), on
the session's in-process Ray cluster with local storage and MLflow on SQLite: a small grid over
PSPNet's pyramid bins whose results, figure and MLflow children are per value of ``bins``, with
both trials at once (one 0.5-CPU worker each fits twice beside the CPU kept for decoding)."""

from __future__ import annotations

import csv
import io
import runpy
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.train.conftest import write_shapes

pytestmark = pytest.mark.slow

JOB = Path(__file__).resolve().parents[2] / "jobs" / "sweep_pspnet.py"


def test_pspnet_bins_sweep(
    ray_cluster: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = str(tmp_path / "shapes")
    write_shapes(data)
    space = tmp_path / "bins.yaml"
    space.write_text("params:\n  bins: {choice: [[1], [1, 2, 3, 6]]}\n")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        str(JOB), "--tiny", "--data", data, "--storage", str(tmp_path / "runs"), "--name", "psp",
        "--space", str(space), "--search", "grid", "--experiment", "sweeps",
        "--mlflow-uri", tracking, "--workers", "1", "--max-iters", "2", "--eval-every", "2",
        "--scheduler", "none", "--set", "overlay_samples=0", "--set", "loader_tasks=0",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(JOB), run_name="__main__")
    output = capsys.readouterr().out
    assert ended.value.code == 0, output[-6000:]
    assert "2 trial(s) at once: each takes 0.5 CPU" in output, output[-6000:]

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("sweeps")
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`segplatform.sweep` = 'psp'"
    )
    local = client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert sorted(r["bins"] for r in rows) == ["(1)", "(1, 2, 3, 6)"]
    assert {r["status"] for r in rows} == {"finished"}
    assert all(0.0 <= float(r["best_val_miou"]) <= 1.0 for r in rows)
    assert "results.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert sorted(r.data.params["model.bins"] for r in runs) == ["[1, 2, 3, 6]", "[1]"]
    assert {r.info.status for r in runs} == {"FINISHED"}
