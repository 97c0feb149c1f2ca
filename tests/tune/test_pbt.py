"""PBT for real: a sweep of two trials on the in-process Ray cluster in which the trial that
cannot learn clones the one that does (Tune's own exploit step, nothing patched).

The trials (tiny PSPNet, one Ray Train worker each, the learnable shapes set) differ only in their
learning rate: 0.01 learns, 1e-9 leaves the initial weights as they are, so the second scores
below the first at every evaluation and PBT's bottom quantile is always that trial. Whether it
exploits depends on whether the better trial has a score when it reports, which is a matter of
timing between two processes; the trials are therefore held after step 3 (``pause_at_step``)
until both are held, i.e. both have reported at step 2. Released, the first report of the weak
trial at step 4 (or its step-2 report, had it come second) finds the strong trial scored, and
PBT clones it: the weak trial continues as a new run initialised from the strong trial's
evaluated checkpoint, with PBT's mutated learning rate and the donor's remaining iterations.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from segplatform.train import TrainConfig
from segplatform.train.loop import pause_marker, release_pause
from segplatform.tune.space import load_space
from segplatform.tune.sweep import SweepConfig, run_sweep
from tests.platform_support import wait_for
from tests.train.conftest import write_shapes

pytestmark = pytest.mark.slow

HOLD = 3
MAX_ITERS = 6
CLONE = re.compile(r"^(?P<original>.+)-(?P<hash>[0-9a-f]{8})$")  # trial_run_name with a suffix


def test_the_weak_trial_clones_the_strong_one(ray_cluster: None, tmp_path: Path) -> None:
    data = str(tmp_path / "shapes")
    write_shapes(data)
    storage = str(tmp_path / "runs")
    base = TrainConfig(
        arch="pspnet",
        tiny=True,
        data=data,
        storage_path=storage,
        num_workers=1,
        crop_size=(32, 32),
        batch_size=4,
        optimizer="adamw",
        max_iters=MAX_ITERS,
        eval_every=2,
        log_every=2,
        overlay_samples=0,
        loader_tasks=0,
        pause_at_step=HOLD,
    )
    space = load_space({"params": {"lr": {"choice": [0.01, 1.0e-9]}}}, "pspnet")
    sweep = SweepConfig(
        base=base,
        space=space,
        name="pbt",
        search="grid",
        scheduler="pbt",
        perturbation_interval=2,
        max_concurrent=2,
    )
    outcome: dict[str, Any] = {}

    def sweep_thread() -> None:
        try:
            outcome["result"] = run_sweep(sweep)
        except BaseException as err:  # re-raised below
            outcome["error"] = err

    thread = threading.Thread(target=sweep_thread, daemon=True)
    thread.start()
    trials = Path(storage) / "pbt" / "trials"

    def runs() -> list[str]:
        return sorted(p.name for p in trials.iterdir()) if trials.exists() else []

    released: set[str] = set()

    def barrier_passed() -> bool:
        """Both original trials held after step 3: release both (later runs at once)."""
        assert thread.is_alive() or "error" not in outcome, outcome.get("error")
        originals = [n for n in runs() if not CLONE.match(n)]
        held = [n for n in originals if pause_marker(str(trials / n), HOLD)]
        if len(originals) == 2 and len(held) == 2:
            for name in held:
                release_pause(str(trials / name), HOLD)
                released.add(name)
            return True
        return False

    wait_for(barrier_passed, 300, "the two trials were not both held after step 3", 0.2)

    def ended() -> bool:  # a clone run is held too, once: let it go
        for name in runs():
            if name not in released and pause_marker(str(trials / name), HOLD):
                release_pause(str(trials / name), HOLD)
                released.add(name)
        return not thread.is_alive()

    wait_for(ended, 300, "the sweep did not end", 0.2)
    if "error" in outcome:
        raise outcome["error"]

    config = {n: json.loads((trials / n / "config.json").read_text()) for n in runs()}
    originals = {n: c["lr"] for n, c in config.items() if not CLONE.match(n)}
    (weak,) = [n for n, lr in originals.items() if lr < 1e-6]
    (strong,) = [n for n, lr in originals.items() if lr == 0.01]
    clones = {n: Path(c["init_checkpoint"]) for n, c in config.items() if CLONE.match(n)}
    # The weak trial cloned the strong one's evaluated checkpoint (later clones may follow,
    # of whichever trial is ahead by then) ...
    from_strong = [
        name
        for name, checkpoint in clones.items()
        if CLONE.match(name)["original"] == weak and checkpoint.parent.name == strong
    ]
    assert from_strong, clones
    first = from_strong[0]
    donor_checkpoint = clones[first]
    assert (donor_checkpoint / "model" / "model.safetensors").is_file()
    step = int(re.search(r"checkpoint_step(\d+)", donor_checkpoint.name)[1])
    assert step in (2, 4)
    # ... and went on for the donor's remaining iterations, with PBT's learning rate.
    assert config[first]["max_iters"] == MAX_ITERS - step
    assert config[first]["lr"] != originals[weak]
    rows = outcome["result"].rows
    assert len(rows) == 2 and all(row.best_val_miou is not None for row in rows)
