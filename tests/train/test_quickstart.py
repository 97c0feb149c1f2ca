"""The main job (``make run`` → ``segplatform quickstart``), shortened, end to end."""

from __future__ import annotations

import math

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from segplatform.cli import main
from segplatform.quickstart import MODEL_NAME, majority_miou


def test_quickstart_trains_registers_and_writes_an_overlay(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["quickstart", "--workdir", str(tmp_path), "--iters", "6", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    overlay_line = next(line for line in out.splitlines() if line.startswith("overlay image:"))
    overlay = Image.open(overlay_line.split(":", 1)[1].strip())
    assert overlay.width % 3 == 0  # image | truth | prediction per row

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert "val_miou" in run.data.metrics and math.isfinite(run.data.metrics["val_miou"])
    assert (tmp_path / "data" / "mni152-tissue" / "dataset.json").exists()


def test_majority_baseline_matches_its_definition(tmp_path, tiny_dataset):
    info = tiny_dataset(tmp_path / "d", splits={"val": 3}, num_classes=3)
    from segplatform.data.reader import iter_samples

    masks = np.concatenate([s["mask"].ravel() for s in iter_samples(str(tmp_path / "d"), "val")])
    counts = np.bincount(masks[masks < 3], minlength=3)
    expected = counts.max() / counts.sum() / (counts > 0).sum()
    assert majority_miou(str(tmp_path / "d"), "val", info.num_classes) == expected
