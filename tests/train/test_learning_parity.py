"""Learning parity, small: the service (2 workers) learns about as well as a plain PyTorch loop
with the same model, seed, optimizer, schedule, total batch and crop on real data.

The full comparison is a benchmark (``segplatform bench learn``); this run is short, so the two
arms (different shuffles) may differ by noise: it fails only when the service ends below 0.8 ×
the plain loop's validation mIoU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from segplatform.bench.learn import LearnSettings, learn_parity

pytestmark = pytest.mark.slow


def test_the_service_learns_as_well_as_a_plain_loop(
    ray_cluster: None, mni_dataset: str, tmp_path: Path
) -> None:
    settings = LearnSettings(
        arch="unet",
        data=mni_dataset,
        arch_params={"padding": "same", "base_channels": 8, "in_channels": 1},
        crop_size=(96, 96),
        total_batch=4,
        iters=60,
        eval_every=30,
        workers=(2,),
        plain_loader_workers=0,
    )
    report = learn_parity(settings, tmp_path, log=lambda line: None)
    plain = report["plain"]["curve"]
    (service,) = report["service"]
    assert [step for step, _ in plain] == [step for step, _ in service["curve"]] == [30, 60]
    assert plain[-1][1] > 0.3  # the reference itself learned (majority baseline: about 0.15)
    assert service["ratio"] >= 0.8, report
    assert (tmp_path / "learn-unet.md").read_text().count("| service, 2 worker(s) |") == 1
    assert (tmp_path / "learn-unet.png").stat().st_size > 0
