"""Fault tolerance: a worker process dies mid-run; the driver is killed and the run resubmitted.

Both runs must continue from their last checkpoint: the step counter does not restart from 0.
The worker fault uses the test-only knob ``fail_at_step`` (rank ``fail_rank`` calls
``os._exit(1)`` at that iteration, once: a marker file in the run directory remembers it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from segplatform.train import TrainConfig, run

pytestmark = pytest.mark.slow


def _config(
    tiny_unet: Callable[..., TrainConfig], data: str, storage: str, name: str, **changes: object
) -> TrainConfig:
    settings = {"eval_every": 2, "log_every": 1, **changes}
    return tiny_unet(data=data, storage_path=storage, name=name, **settings)


def test_worker_exit_resumes_where_it_stopped_and_ends_as_if_it_had_not(
    ray_cluster: None, shapes_dataset: str, storage: str, tiny_unet: Callable[..., TrainConfig]
) -> None:
    """A worker dies at step 3; the group restarts from the resume-only checkpoint of step 2
    (the only evaluation is at the end). The learning-rate schedule, the data order (epochs of 4
    iterations here) and the RNG states continue, so the run ends with the same parameters, lr
    and epoch as the same run without the fault."""
    common = {
        "max_iters": 6,
        "eval_every": 6,
        "checkpoint_every": 2,
        "max_failures": 1,
        "optimizer": "adamw",
        "lr": 0.003,
    }
    faulty = _config(
        tiny_unet, shapes_dataset, storage, "worker-fault", fail_at_step=3, fail_rank=1, **common
    )
    metrics = run(faulty).metrics
    assert metrics["step"] == 6
    assert metrics["attempt"] == 2  # one restart of the worker group
    assert metrics["start_step"] == 2  # resumed from the step-2 checkpoint, not from 0
    assert (Path(storage) / "worker-fault" / ".fault-injected-rank1").exists()
    clean = run(_config(tiny_unet, shapes_dataset, storage, "no-fault", **common)).metrics
    assert clean["attempt"] == 1 and clean["epoch"] == metrics["epoch"] == 1
    assert metrics["lr"] == pytest.approx(clean["lr"])
    assert metrics["param_checksums"] == pytest.approx(clean["param_checksums"], rel=1e-6)
    assert metrics["val_miou"] == pytest.approx(clean["val_miou"], abs=1e-3)


def _registered_steps(run_dir: Path) -> list[int]:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    try:
        text = snapshot.read_text()
        json.loads(text)
    except (OSError, ValueError):
        return []
    return [int(part[:8]) for part in text.split("checkpoint_step")[1:] if part[:8].isdigit()]


def test_killed_driver_resubmitted_with_same_name_continues(
    ray_cluster: None,
    shapes_dataset: str,
    storage: str,
    tmp_path: Path,
    tiny_unet: Callable[..., TrainConfig],
) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    command = [
        sys.executable, "-m", "segplatform", "train", "--arch", "unet", "--tiny",
        "--arch-param", 'padding="same"', "--data", shapes_dataset, "--workers", "2",
        "--crop-size", "32", "--batch-size", "2", "--max-iters", "40", "--eval-every", "2",
        "--storage", storage, "--name", "driver-kill", "--ray-address", address,
        "--set", "overlay_samples=0",
    ]  # fmt: skip
    log = (tmp_path / "driver.log").open("wb")
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = Path(storage) / "driver-kill"
    try:
        deadline = time.monotonic() + 300
        while not any(step >= 2 for step in _registered_steps(run_dir)):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint registered in time"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and only it (its own session)
        driver.wait(timeout=30)
        log.close()
    before = max(_registered_steps(run_dir))
    # The same settings (fewer evaluations: they are not part of the resume fingerprint).
    config = _config(tiny_unet, shapes_dataset, storage, "driver-kill", max_iters=40)
    metrics = run(config.replace(eval_every=20)).metrics
    assert metrics["start_step"] >= before >= 2  # continued from a checkpoint of the killed run
    assert metrics["step"] == 40
