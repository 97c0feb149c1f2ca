"""The job log's progress lines, and Ray Train's per-report INFO log kept out of it."""

from __future__ import annotations

import logging

from segplatform.train.loop import progress_line, quiet_ray_report_log


def test_progress_line_for_a_training_report_and_an_evaluation() -> None:
    base = {"step": 40, "epoch": 2, "lr": 0.00941, "loss": 0.53124, "images_per_s": 25.31}
    assert progress_line("unet-x", 400, base) == (
        "unet-x step 40/400 epoch 2 loss 0.5312 lr 0.00941 25.3 img/s"
    )
    evaluated = {"step": 400, "epoch": 20, "lr": 0.0, "val_miou": 0.41234, "best_val_miou": 0.5}
    assert progress_line("unet-x", 400, evaluated) == (
        "unet-x step 400/400 epoch 20 val mIoU 0.4123 (best 0.5000)"
    )


def test_ray_train_report_log_is_raised_to_warning() -> None:
    from ray.train.v2._internal.execution import context

    report_logger = logging.getLogger(context.__file__)
    report_logger.setLevel(logging.INFO)
    quiet_ray_report_log()
    assert not report_logger.isEnabledFor(logging.INFO)
    assert report_logger.isEnabledFor(logging.WARNING)
