"""The learning table's parts, without training: job command lines and budgets, the job-log
and checkpoint parsers, the markdown writer, and the COCO mask AP of Mask R-CNN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from segplatform.bench.learning_table import (
    BUDGETS,
    Row,
    best_checkpoint,
    checkpoint_metrics,
    coco_mask_ap,
    job_command,
    mask_ap_ceiling,
    mask_rcnn_ap,
    parse_job_log,
    render_markdown,
)
from segplatform.detection import targets_from_masks

JOB_LOG = """\
recipe unet: from-scratch recipe: no --pretrained-backbone given, the backbone starts \
random; AdamW lr 0.001 betas (0.9, 0.999), weight decay 0.01, poly 0.9, clip 1
2026-11-30 17:35:26,957\tINFO worker.py:2029 -- Started a local Ray instance.
unet-x: unet (tiny) on 2 worker(s) × batch 4, 6 iterations (21 per epoch of 170 rows), AdamW
\x1b[36m(RayTrainWorker pid=1)\x1b[0m unet-x step 1/6 epoch 0 loss 1.3862 lr 0.001 5.5 img/s
\x1b[36m(RayTrainWorker pid=1)\x1b[0m unet-x step 2/6 epoch 0 loss 1.2000 lr 0.0008 7.5 img/s \
val mIoU 0.2000 (best 0.2000)
\x1b[36m(RayTrainWorker pid=1)\x1b[0m other-run step 3/6 epoch 0 loss nan lr 0.0008 1.0 img/s
\x1b[36m(RayTrainWorker pid=1)\x1b[0m unet-x step 4/6 epoch 0 val mIoU 0.3500 (best 0.3500)
\x1b[36m(RayTrainWorker pid=1)\x1b[0m unet-x step 6/6 epoch 0 loss 0.9000 lr 0 9.5 img/s \
val mIoU 0.3000 (best 0.3500)
run unet-x: 6 iterations, checkpoints in /tmp/runs/unet-x
final val mIoU: 0.3000
"""


def test_budgets_add_only_budget_flags() -> None:
    import architectures

    assert set(BUDGETS) == set(architectures.ARCHITECTURES)
    allowed = {"--tiny", "--arch-param", "--crop-size", "--batch-size"}
    for arch, budget in BUDGETS.items():
        flags = {f for f in budget.flags if f.startswith("--")}
        assert flags <= allowed, (arch, flags - allowed)
        assert budget.reduction and budget.iters >= 3
        argv = job_command(arch, "/data/mni", budget, "/out/runs", f"learn-{arch}")
        assert argv[:2] == ["python", f"jobs/train_{arch}.py"]
        assert Path(argv[1]).name in {p.name for p in Path("jobs").glob("train_*.py")}
        assert argv[argv.index("--eval-every") + 1] == str(budget.iters // 3)
        assert argv[argv.index("--workers") + 1] == "2"


def test_parse_job_log_reads_progress_lines_of_the_run() -> None:
    log = parse_job_log(JOB_LOG, "unet-x")
    assert log.recipe.startswith("recipe unet: from-scratch recipe")
    assert log.curve == [(2, 0.2), (4, 0.35), (6, 0.3)]
    assert log.losses == [(1, 1.3862), (2, 1.2), (6, 0.9)]
    assert log.steps == 6
    assert log.final_miou == 0.3
    assert log.median_images_per_s == 7.5
    assert log.finite  # the other run's NaN is not this run's
    assert not parse_job_log(JOB_LOG).finite


def test_parse_job_log_keeps_the_error_line() -> None:
    text = JOB_LOG.replace("final val mIoU: 0.3000\n", "") + (
        "error: run unet-x stopped (diverged): loss is not finite at step 7\n"
    )
    log = parse_job_log(text, "unet-x")
    assert log.final_miou is None
    assert log.stopped.startswith("error: run unet-x stopped (diverged)")


def _checkpoint(run: Path, step: int, miou: float) -> None:
    model = run / f"checkpoint_step{step:08d}_abc" / "model"
    model.mkdir(parents=True)
    meta = {"metrics": {"val_miou": miou}, "extra": {"step": step}}
    (model / "model.json").write_text(json.dumps(meta))


def test_checkpoint_metrics_and_best(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 200, 0.5)
    _checkpoint(tmp_path, 100, 0.3)
    _checkpoint(tmp_path, 300, 0.4)
    assert [(s, m["val_miou"]) for s, m in checkpoint_metrics(tmp_path)] == [
        (100, 0.3),
        (200, 0.5),
        (300, 0.4),
    ]
    best = best_checkpoint(tmp_path)
    assert best is not None and best.parent.name.startswith("checkpoint_step00000200")
    assert best_checkpoint(tmp_path / "missing") is None


def test_render_markdown_has_the_table_and_every_command() -> None:
    good = Row(
        arch="unet",
        dataset="mni152-tissue",
        reduction="tiny config",
        command=["python", "jobs/train_unet.py", "--data", "/d/mni", "--tiny"],
        steps=300,
        final_miou=0.45,
        best_miou=0.47,
        majority_miou=0.15,
        images_per_s=8.0,
        wall_s=360.0,
        load=3.0,
        exit_status=0,
        finite=True,
    )
    detector = Row(
        arch="mask_rcnn",
        dataset="mni152-tissue",
        reduction="tiny config",
        command=["python", "jobs/train_mask_rcnn.py", "--data", "/d/mni"],
        final_miou=0.2,
        majority_miou=0.15,
        exit_status=1,
        finite=False,
        stopped="error: run x stopped (diverged): loss is not finite",
        mask_ap={"ap": 0.125, "ap50": 0.25, "ap75": 0.0, "ceiling_ap": 0.5, "ceiling_ap50": 0.75},
    )
    assert good.ok and math.isclose(good.ratio, 3.0)
    assert not detector.ok
    assert Row.from_dict(json.loads(json.dumps(good.to_dict()))) == good
    text = render_markdown(
        [good, detector],
        {"command": "segplatform bench learn --all --out b", "date": "2026-01-01", "commit": "abc"},
    )
    assert "| unet | tiny config | mni152-tissue | 300 | 0.450 | 0.470 | 0.150 | 3.00 | 8.0 |" in (
        text
    )
    assert "| 6.0 min | 3.0 | yes |" in text
    assert "| mni152-tissue | 0.125 | 0.250 | 0.000 | 0.200 | 0.500 | 0.750 |" in text
    assert "- mask_rcnn on mni152-tissue: error: run x stopped (diverged)" in text
    assert "segplatform bench learn --all --out b\n" in text
    assert "python jobs/train_unet.py --data /d/mni --tiny\n" in text
    assert "2026-01-01" in text and "abc" in text


def _instances(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    targets = targets_from_masks(mask)
    return targets["labels"].numpy(), targets["masks"].numpy() > 0


def _semantic(seed: int) -> np.ndarray:
    mask = np.zeros((40, 50), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for label in (1, 2, 3, 1):
        top, left = rng.integers(0, 30), rng.integers(0, 40)
        mask[top : top + 8, left : left + 9] = label
    return mask


def test_coco_mask_ap_of_a_perfect_and_of_an_empty_prediction() -> None:
    truth = [_instances(_semantic(seed)) for seed in range(3)]
    perfect = [(labels, np.ones(len(labels)), masks) for labels, masks in truth]
    assert coco_mask_ap(truth, perfect) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
    empty = [(np.zeros(0, int), np.zeros(0), np.zeros((0, 40, 50), bool)) for _ in truth]
    assert coco_mask_ap(truth, empty) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    # Right masks with the wrong class score nothing; half the instances found score less.
    wrong = [(labels % 3 + 1, np.ones(len(labels)), masks) for labels, masks in truth]
    assert coco_mask_ap(truth, wrong)["ap"] == 0.0
    half = [(labels[::2], np.ones(len(labels[::2])), masks[::2]) for labels, masks in truth]
    assert 0.0 < coco_mask_ap(truth, half)["ap"] < 1.0
    with pytest.raises(ValueError, match="ground-truth images"):
        coco_mask_ap(truth, perfect[:2])


def test_mask_ap_ceiling_keeps_blobs_and_loses_specks() -> None:
    blobs = [_semantic(seed) for seed in range(3)]
    assert mask_ap_ceiling(blobs)["ap50"] == pytest.approx(1.0)
    # A one-pixel-wide diagonal across its 40×40 box does not survive a 28×28 grid.
    line = np.zeros((40, 40), dtype=np.uint8)
    line[np.arange(40), np.arange(40)] = 1
    assert mask_ap_ceiling([line])["ap50"] < 0.5
    assert mask_ap_ceiling([line], mask_size=160)["ap50"] == pytest.approx(1.0)


def test_mask_rcnn_ap_of_a_package(tmp_path: Path, tiny_dataset) -> None:
    import architectures
    from segplatform.package import save_package

    info = tiny_dataset(tmp_path / "data", num_classes=3, splits={"train": 1, "val": 2})
    config = architectures.ARCHITECTURES["mask_rcnn"][0].tiny(num_classes=3)
    torch.manual_seed(0)
    model = architectures.build_from_config("mask_rcnn", config)
    package = save_package(
        tmp_path / "model",
        model,
        "mask_rcnn",
        config,
        classes=info.classes,
        palette=info.palette,
        normalization={"mean": [0.0] * 3, "std": [1.0] * 3},
    )
    result = mask_rcnn_ap(package, str(tmp_path / "data"))
    assert set(result) == {"ap", "ap50", "ap75"}
    assert all(0.0 <= v <= 1.0 for v in result.values())


def test_render_markdown_names_no_folder_of_the_machine() -> None:
    row = Row(
        arch="unet",
        dataset="mni152-tissue",
        reduction="tiny config",
        command=[
            "python",
            "jobs/train_unet.py",
            "--data",
            "/w/run/data/mni",
            "--storage",
            "/w/run",
        ],
    )
    text = render_markdown(
        [row],
        {"command": "segplatform bench learn --all --out /w/run", "paths": {"/w/run": "DIR"}},
    )
    assert "/w/run" not in text
    assert "python jobs/train_unet.py --data DIR/data/mni --storage DIR\n" in text
    assert "segplatform bench learn --all --out DIR\n" in text
