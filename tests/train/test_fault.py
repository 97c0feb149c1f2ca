"""Fault tolerance: a worker process dies mid-run; the driver is killed and the run resubmitted.

Both runs must end in the state an uninterrupted run of the same settings and seed ends in
(``tests/resume_support.py``: weights, optimizer, learning-rate schedule and RNG states, bit for
bit on CPU), having continued from their last checkpoint rather than from step 0.

The interruptions are driven by the run's own test knobs, never by timing: ``fail_at_step`` (rank
``fail_rank`` calls ``os._exit(1)`` at that iteration, once) and ``pause_at_step`` (the run holds
after that step's checkpoint and says so in a marker file, which the test waits for before it
kills the driver).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from segplatform.train import TrainConfig, run
from segplatform.train.loop import pause_marker
from tests.platform_support import wait_for
from tests.resume_support import assert_same_state, checkpoint_state

pytestmark = pytest.mark.slow

# What every run of this module shares: evaluation at the end only, resume-only checkpoints every
# 2 steps, AdamW (its state is what a resume most easily gets wrong).
COMMON: dict[str, Any] = {
    "max_iters": 6,
    "eval_every": 6,
    "checkpoint_every": 2,
    "log_every": 1,
    "optimizer": "adamw",
    "lr": 0.003,
}


@pytest.fixture(scope="module")
def uninterrupted(
    ray_cluster: None,
    shapes_dataset: str,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_unet: Callable[..., TrainConfig],
) -> dict[str, Any]:
    """The reference: the runs below without their interruption."""
    storage = str(tmp_path_factory.mktemp("uninterrupted"))
    result = run(tiny_unet(data=shapes_dataset, storage_path=storage, name="clean", **COMMON))
    assert result.metrics["attempt"] == 1 and result.metrics["start_step"] == 0
    return {"metrics": result.metrics, "state": checkpoint_state(result.checkpoint.path)}


def test_worker_exit_resumes_where_it_stopped_and_ends_as_if_it_had_not(
    uninterrupted: dict[str, Any],
    shapes_dataset: str,
    storage: str,
    tiny_unet: Callable[..., TrainConfig],
) -> None:
    """A worker dies at step 3; the group restarts from the resume-only checkpoint of step 2.
    The learning-rate schedule, the data order (epochs of 4 iterations here) and the RNG states
    continue, so the run ends in the state of the same run without the fault."""
    faulty = tiny_unet(
        data=shapes_dataset,
        storage_path=storage,
        name="worker-fault",
        fail_at_step=3,
        fail_rank=1,
        max_failures=1,
        **COMMON,
    )
    result = run(faulty)
    metrics = result.metrics
    assert metrics["step"] == 6
    assert metrics["attempt"] == 2  # one restart of the worker group
    assert metrics["start_step"] == 2  # resumed from the step-2 checkpoint, not from 0
    assert (Path(storage) / "worker-fault" / ".fault-injected-rank1").exists()
    assert metrics["epoch"] == uninterrupted["metrics"]["epoch"] == 1
    assert_same_state(checkpoint_state(result.checkpoint.path), uninterrupted["state"])
    assert metrics["val_miou"] == uninterrupted["metrics"]["val_miou"]


def test_killed_driver_resubmitted_with_same_name_continues(
    uninterrupted: dict[str, Any],
    shapes_dataset: str,
    storage: str,
    tmp_path: Path,
    tiny_unet: Callable[..., TrainConfig],
) -> None:
    """``segplatform train`` is held after its step-4 checkpoint, its driver is SIGKILLed, and
    the same run submitted again continues from step 4 to the uninterrupted run's end state."""
    import json

    import ray

    address = ray.get_runtime_context().gcs_address
    # The same settings as the reference run, every field given (no recipe fills any).
    config = tiny_unet(data=shapes_dataset, storage_path=storage, name="driver-kill", **COMMON)
    settings = tmp_path / "driver-kill.json"
    settings.write_text(json.dumps(config.to_dict()))
    command = [
        sys.executable, "-m", "segplatform", "train", "--config", str(settings),
        "--ray-address", address, "--set", "pause_at_step=4",
    ]  # fmt: skip
    log_path = tmp_path / "driver.log"
    run_dir = str(Path(storage) / "driver-kill")
    with log_path.open("wb") as log:
        driver = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:

            def held() -> dict[str, Any] | None:
                assert driver.poll() is None, log_path.read_text()[-3000:]
                return pause_marker(run_dir, 4)

            marker = wait_for(held, 300, "the run was not held at step 4", 0.2)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and only it (its own session)
            driver.wait(timeout=30)
    assert marker["step"] == 4 and marker["attempt"] == 1
    # The killed run's workers die with their driver; resubmit once they are gone.
    pids = [worker["pid"] for worker in marker["workers"]]
    wait_for(
        lambda: not any(psutil.pid_exists(pid) for pid in pids),
        120,
        f"the killed run's workers {pids} live on",
    )
    # The same settings (pause_at_step is a test knob, not part of the resume fingerprint).
    result = run(config)
    assert result.metrics["start_step"] == 4  # continued from the checkpoint it was held at
    assert result.metrics["attempt"] == 2 and result.metrics["step"] == 6
    assert_same_state(checkpoint_state(result.checkpoint.path), uninterrupted["state"])
