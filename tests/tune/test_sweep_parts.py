"""The parts of a sweep that need no running trial: results table and figure, concurrency from
the cluster's free resources, ASHA's rungs, the sweep's refusals before Ray starts, error lines."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from segplatform.train import TrainConfig
from segplatform.tune.report import (
    FINISHED,
    STOPPED,
    TrialRow,
    csv_text,
    figure,
    format_table,
    sorted_rows,
)
from segplatform.tune.space import load_space
from segplatform.tune.sweep import SweepConfig, SweepError, error_summary, trial_concurrency


def rows() -> list[TrialRow]:
    pyramid = (1, 2, 3, 6)
    return [
        TrialRow("a_00000", "s-a_00000", STOPPED, {"bins": (1,), "lr": 1e-4}, 0.21, 0.21, 2, 6),
        TrialRow("a_00001", "s-a_00001", FINISHED, {"bins": pyramid, "lr": 3e-3}, 0.52, 0.5, 6, 6),
        TrialRow("a_00002", "s-a_00002", FINISHED, {"bins": pyramid, "lr": 1e-3}, 0.47, 0.47, 6, 6),
        TrialRow("a_00003", "s-a_00003", "failed", {"bins": (1,), "lr": 9e-3}, error="diverged"),
    ]


SPACE = {"params": {"bins": {"choice": [[1], [1, 2, 3, 6]]}, "lr": {"loguniform": [1e-4, 1e-2]}}}


def test_rows_sorted_best_first_in_table_and_csv() -> None:
    assert [r.trial_id for r in sorted_rows(rows())] == ["a_00001", "a_00002", "a_00000", "a_00003"]
    table = format_table(rows(), ("bins", "lr")).splitlines()
    assert table[0].split() == [
        "#",
        "trial",
        "bins",
        "lr",
        "best",
        "mIoU",
        "last",
        "mIoU",
        "steps",
        "status",
    ]
    assert table[2].split()[:2] == ["1", "a_00001"] and "(1, 2, 3, 6)" in table[2]
    assert table[4].endswith("stopped early") and "2/6" in table[4]
    parsed = list(csv.DictReader(io.StringIO(csv_text(rows(), ("bins", "lr")))))
    assert [r["trial_id"] for r in parsed] == ["a_00001", "a_00002", "a_00000", "a_00003"]
    assert parsed[0]["bins"] == "(1, 2, 3, 6)" and parsed[0]["best_val_miou"] == "0.5200"
    assert parsed[3]["status"] == "failed" and parsed[3]["error"] == "diverged"


def test_figure_has_a_panel_per_hyperparameter_with_values_on_the_axes() -> None:
    space = load_space(SPACE, "pspnet")
    fig = figure(rows(), space)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert [ax.get_xlabel() for ax in panels] == ["bins", "lr"]
    bins_axis, lr_axis = panels
    assert [t.get_text() for t in bins_axis.get_xticklabels()] == ["(1)", "(1, 2, 3, 6)"]
    assert lr_axis.get_xscale() == "log"
    assert bins_axis.get_ylabel() == "best val mIoU"
    # One point per scored trial in each panel (the failed trial has no score).
    for ax in panels:
        points = [tuple(p) for c in ax.collections for p in c.get_offsets()]
        assert len(points) == 3
        assert sorted(round(y, 2) for _, y in points) == [0.21, 0.47, 0.52]
    # The two trials with bins (1, 2, 3, 6) do not hide each other.
    xs = sorted(p[0] for c in bins_axis.collections for p in c.get_offsets())
    assert len(set(xs)) == 3
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize(
    ("free", "workers", "cpus", "gpu", "expected"),
    [
        ({"CPU": 2.0}, 2, 0.5, False, 1),  # 1 CPU per trial, 1 CPU kept for decoding
        ({"CPU": 4.0}, 2, 0.5, False, 3),
        ({"CPU": 1.5}, 2, 0.5, False, 1),  # busy: still one (it waits for resources)
        ({"CPU": 64.0, "GPU": 2.0}, 2, 4.0, True, 1),  # GPUs decide
        ({"CPU": 64.0, "GPU": 8.0}, 2, 4.0, True, 4),
    ],
)
def test_concurrency_from_free_resources(
    monkeypatch: pytest.MonkeyPatch,
    free: dict[str, float],
    workers: int,
    cpus: float,
    gpu: bool,
    expected: int,
) -> None:
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: dict(free))
    config = TrainConfig(arch="unet", num_workers=workers, cpus_per_worker=cpus, use_gpu=gpu)
    count, why = trial_concurrency(config, trials=6)
    assert count == expected, why
    assert trial_concurrency(config, trials=1)[0] == 1


def test_asha_rungs_stay_below_the_last_step() -> None:
    from segplatform.tune.schedulers import asha_rungs, build_scheduler

    space = load_space(SPACE, "pspnet")
    _, settings = build_scheduler("asha", max_iters=8, eval_every=2, space=space)
    assert settings["rungs"] == "2,4" and settings["max_t"] == 7
    assert asha_rungs(2, 7, 2) == [2, 4]
    with pytest.raises(ValueError, match="grace period"):
        build_scheduler("asha", max_iters=2, eval_every=2, space=space)
    _, pbt = build_scheduler("pbt", max_iters=8, eval_every=2, space=space)
    assert pbt["perturbation_interval"] == 4 and pbt["mutated"] == "bins,lr"
    assert build_scheduler("none", max_iters=8, eval_every=2, space=space)[0] is None


def sweep_config(data: str, storage: str, **changes: object) -> SweepConfig:
    base = TrainConfig(
        arch="pspnet",
        tiny=True,
        data=data,
        storage_path=storage,
        max_iters=4,
        eval_every=2,
        batch_size=2,
        crop_size=16,
    )
    fields = {"base": base, "space": load_space(SPACE, "pspnet"), "name": "parts", **changes}
    return SweepConfig(**fields)


def test_options_refused_before_ray(tmp_path: Path, tiny_dataset, no_ray_cluster: None) -> None:
    import ray

    from segplatform.tune.sweep import run_sweep

    data = str(tmp_path / "data")
    tiny_dataset(data)
    storage = str(tmp_path / "runs")
    grid = load_space({"params": {"bins": {"choice": [[1], [1, 2]]}}}, "pspnet")
    with pytest.raises(SweepError, match="every combination of the space, 2 here"):
        run_sweep(sweep_config(data, storage, space=grid, search="grid", trials=3))
    with pytest.raises(SweepError, match="no sweep 'parts'"):
        run_sweep(sweep_config(data, storage, resume=True))
    with pytest.raises(SweepError, match="grace period"):
        run_sweep(sweep_config(data, storage, grace_period=4))
    with pytest.raises(SweepError, match="sweep name"):
        sweep_config(data, storage, name="a b")
    # A sweep stored under this name with other settings is not resumed with these.
    stored = tmp_path / "runs" / "parts" / "sweep.json"
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps({"version": 1, "id": "x", "name": "parts", "trials": 5}))
    with pytest.raises(SweepError, match=r"other settings: .*trials: 5 -> 8"):
        run_sweep(sweep_config(data, storage))
    assert not ray.is_initialized()


def test_error_summary_names_what_stopped_the_trial() -> None:
    text = (
        "Failure # 1 (occurred at 2026-11-30)\n"
        "ray.exceptions.RayTaskError(TrialFailed): ray::ImplicitFunc.train()\n"
        '  File "trial.py", line 1, in trial_function\n'
        "segplatform.tune.trial.TrialFailed: run s-a_00001 stopped (diverged): loss is not finite\n"
    )
    assert error_summary(text) == "run s-a_00001 stopped (diverged): loss is not finite"
    assert error_summary("Traceback\n  x\nFileNotFoundError: no such file\n  (more)\n") == (
        "FileNotFoundError: no such file"
    )


class FakeTrial:
    def __init__(self, name: str) -> None:
        self.trial_id = name
        self.experiment_tag = name
        self.status = "RUNNING"


def test_pbt_clones_from_the_checkpoint_a_trials_last_evaluation_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.tune.schedulers.pbt import _PBTTrialState

    from segplatform.tune.schedulers import RunCheckpointPBT, build_scheduler

    space = load_space(SPACE, "pspnet")
    scheduler, _ = build_scheduler(
        "pbt", max_iters=8, eval_every=2, space=space, perturbation_interval=2
    )
    assert isinstance(scheduler, RunCheckpointPBT)
    good, bad, done = FakeTrial("good"), FakeTrial("bad"), FakeTrial("done")
    for trial, step, path in [
        (good, 4, "/runs/s/trials/s-good/checkpoint_step00000004_ab12cd"),
        (bad, 4, "/runs/s/trials/s-bad/checkpoint_step00000004_ef34ab"),
        (done, 8, "/runs/s/trials/s-done/checkpoint_step00000008_aa11bb"),
    ]:
        state = _PBTTrialState(trial)
        state.last_result = {"trial_step": step, "trial_max_iters": 8, "checkpoint_path": path}
        scheduler._trial_state[trial] = state
    exploited = []
    monkeypatch.setattr(
        scheduler, "_exploit", lambda controller, trial, donor: exploited.append((trial, donor))
    )
    # A top trial keeps the checkpoint its last evaluation wrote, as an exploitable checkpoint.
    scheduler._checkpoint_or_exploit(good, None, [good], [bad])
    checkpoint = scheduler._trial_state[good].last_checkpoint
    assert checkpoint.path == "/runs/s/trials/s-good/checkpoint_step00000004_ab12cd"
    # A bottom trial clones it.
    scheduler._checkpoint_or_exploit(bad, None, [good], [bad])
    assert exploited == [(bad, good)]
    assert scheduler._trial_state[bad].last_checkpoint is None
    # A trial at its last step leaves a clone nothing to train: not exploitable.
    scheduler._checkpoint_or_exploit(done, None, [done], [bad])
    assert scheduler._trial_state[done].last_checkpoint is None
    scheduler._checkpoint_or_exploit(bad, None, [done], [bad])
    assert exploited == [(bad, good)]
