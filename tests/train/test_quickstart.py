"""The main job (``make run`` → ``segplatform quickstart``) as shipped, end to end."""

from __future__ import annotations

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from segplatform.cli import main
from segplatform.quickstart import MODEL_NAME, majority_miou


def test_the_main_job_trains_a_model_that_does_the_task(tmp_path, capsys, monkeypatch):
    """``make run`` as shipped (its default 150 iterations): the registered champion separates
    the tissues (val mIoU >= 0.80, every class >= 0.60 IoU), and the overlay is written."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["quickstart", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    overlay_line = next(line for line in out.splitlines() if line.startswith("overlay image:"))
    overlay = Image.open(overlay_line.split(":", 1)[1].strip())
    assert overlay.width > 3 * 160  # image | truth | prediction, titled, with a legend
    assert "grey matter" in out and "mean IoU" in out  # the per-class table

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_miou"] >= 0.80, run.data.metrics
    assert (tmp_path / "data" / "mni152-tissue" / "dataset.json").exists()
    val_line = next(line for line in out.splitlines() if line.startswith("val mIoU:"))
    assert float(val_line.split()[2]) >= 0.80, val_line
    ious = {
        line[:16].strip(): float(line[16:25])
        for line in out.splitlines()
        if line[:16].strip() in ("background", "grey matter", "white matter", "other brain")
    }
    assert len(ious) == 4 and min(ious.values()) >= 60.0, ious


def test_majority_baseline_matches_its_definition(tmp_path, tiny_dataset):
    info = tiny_dataset(tmp_path / "d", splits={"val": 3}, num_classes=3)
    from segplatform.data.reader import iter_samples

    masks = np.concatenate([s["mask"].ravel() for s in iter_samples(str(tmp_path / "d"), "val")])
    counts = np.bincount(masks[masks < 3], minlength=3)
    expected = counts.max() / counts.sum() / (counts > 0).sum()
    assert majority_miou(str(tmp_path / "d"), "val", info.num_classes) == expected
