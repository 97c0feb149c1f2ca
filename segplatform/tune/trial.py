"""One trial of a sweep: exactly one training run of ``segplatform.train.run``.

Ray Tune calls ``trial_function(config, setup=...)`` in a trial actor that reserves no CPU
(``TRIAL_RESOURCES``): the run's ``TorchTrainer`` reserves its workers itself, and a trial actor
holding a CPU would keep it from them (trials then deadlock waiting for worker groups; Ray's
"Hyperparameter Tuning with Ray Tune" guide for Train V2,
https://docs.ray.io/en/latest/train/user-guides/hyperparameter-optimization.html).

The run's name is ``<sweep>-<trial id>`` (``trial_run_name``): Tune keeps a trial's id across a
restore, so a trial interrupted with its sweep's driver resumes its own run from that run's
latest checkpoint. A trial whose run already ended (it finished just before the driver was
killed, before Tune recorded it) is not trained again: its final evaluation is reported from
the run's stored result.

Reports: ``EvaluationReport`` (Tune's ``TuneReportCallback`` for Train V2 runs, in the run's
``RunConfig(callbacks=...)``) forwards the evaluations of rank 0 to Tune, one Tune iteration
each, with the scalar metrics, ``checkpoint_path`` (the evaluated checkpoint in the run's
storage) and the sweep's time attribute ``trial_step`` (the run's optimizer step, plus the steps
a PBT clone inherited). Training-metric and resume-only reports (no ``val_miou``) stay out of
Tune, so every Tune result carries the metric the scheduler ranks by.

PBT: when ``PopulationBasedTraining`` clones a better trial into this one, ``tune.get_checkpoint``
names the donor's evaluated checkpoint (``segplatform.tune.schedulers``). The trial then starts a
new run ``<sweep>-<trial id>-<hash of the checkpoint path>`` with the new hyperparameters, its
weights initialized from that checkpoint (``TrainConfig.init_checkpoint``) and the iterations the
donor had left.

Failures: a run the workers stop (divergence, bad data: ``TrainingFailure``) ends the trial in
ERROR with the run's message; nothing retries it.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from segplatform.train.config import TrainConfig
from segplatform.tune.space import SearchSpace

__all__ = [
    "TIME_ATTR",
    "TRIAL_RESOURCES",
    "EvaluationReport",
    "TrialFailed",
    "TrialSetup",
    "trial_function",
    "trial_run_name",
]

# Ray resources of the trial actor itself: no CPU (module docstring). Ray refuses an all-zero
# bundle, hence a token amount of memory.
TRIAL_RESOURCES: dict[str, float] = {"CPU": 0, "memory": 1e6}
# The sweep's time attribute: optimizer steps of the trial (Tune's training_iteration restarts
# when a sweep is restored; the run's step does not).
TIME_ATTR = "trial_step"
_STEP_IN_NAME = re.compile(r"checkpoint_step(\d+)")


class TrialFailed(RuntimeError):
    """The trial's run was stopped by its workers (divergence, bad data)."""


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one sweep shares (passed with ``tune.with_parameters``)."""

    sweep: str  # the sweep's name
    base: TrainConfig  # trial settings before the space's values (absolute paths and URIs)
    space: SearchSpace
    trials_storage: str  # where the trials' runs go: <storage>/<sweep>/trials
    parent_run_id: str | None  # the sweep's MLflow run


def trial_run_name(sweep: str, trial_id: str, suffix: str = "") -> str:
    """The training run of trial ``trial_id``: ``<sweep>-<trial id>[-<suffix>]``."""
    return f"{sweep}-{trial_id}" + (f"-{suffix}" if suffix else "")


def trial_config(
    setup: TrialSetup, trial_id: str, values: dict[str, Any], **changes: Any
) -> TrainConfig:
    """The ``TrainConfig`` of one trial: the space's ``values`` over the sweep's base, its own
    name and storage, nested under the sweep's MLflow run, registering nothing itself."""
    fields: dict[str, Any] = {
        "name": trial_run_name(setup.sweep, trial_id),
        "storage_path": setup.trials_storage,
        "mlflow_parent_run": setup.parent_run_id,
        "register_as": None,
    }
    fields.update(changes)
    return setup.space.apply(setup.base, values, **fields)


class EvaluationReport(TuneReportCallback):
    """``TuneReportCallback`` that forwards evaluations only (module docstring)."""

    def __init__(self, *, step_offset: int = 0, max_iters: int) -> None:
        super().__init__()
        self.step_offset = step_offset
        self.max_iters = max_iters

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if not metrics or "val_miou" not in metrics[0]:
            return  # training metrics or a resume-only checkpoint: not a Tune iteration
        first = tune_metrics(metrics[0], self.step_offset, self.max_iters)
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def tune_metrics(metrics: dict[str, Any], step_offset: int, max_iters: int) -> dict[str, Any]:
    """The scalar metrics of a report, with the sweep's time attribute and the trial's length."""
    out = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float, str, bool)) and not k.startswith("param_checksum")
    }
    out[TIME_ATTR] = int(metrics.get("step", 0)) + step_offset
    out["trial_max_iters"] = max_iters + step_offset
    return out


def _inherited(checkpoint: Any) -> tuple[str, int] | None:
    """PBT: ``(URI, step)`` of the donor's checkpoint to start from, or None.

    The donor's run may have pruned that checkpoint since (``keep_checkpoints``); its best kept
    checkpoint stands in for it then.
    """
    if checkpoint is None:
        return None
    import pyarrow.fs as pafs

    filesystem = checkpoint.filesystem or pafs.LocalFileSystem()
    path = str(checkpoint.path).rstrip("/")
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        from segplatform.train.run import best_checkpoint

        try:
            result = stored_result(posixpath.dirname(path), filesystem)
        except Exception:
            return None
        best, _ = best_checkpoint(result)
        if best is None:
            return None
        path = str(best.path).rstrip("/")
    found = _STEP_IN_NAME.search(posixpath.basename(path))
    if not found:
        return None
    uri = path if isinstance(filesystem, pafs.LocalFileSystem) else f"s3://{path}"
    return uri, int(found.group(1))


def stored_result(path: str, filesystem: Any) -> Any:
    """``ray.train.Result.from_path`` without Ray Train's notice that a snapshot was found (that
    is what a sweep looks for); raises when there is no run or no registered checkpoint."""
    import logging

    import ray.train
    from ray.train.v2._internal.execution.checkpoint import checkpoint_manager

    log = logging.getLogger(checkpoint_manager.__name__)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(path, storage_filesystem=filesystem)
    finally:
        log.setLevel(level)


def stored_final_metrics(config: TrainConfig, max_iters: int) -> dict[str, Any] | None:
    """The final evaluation of the run ``config.name`` if it already ended, else None."""
    from segplatform.data import io as dio
    from segplatform.train.run import storage_for

    storage_path, filesystem, _ = storage_for(config)
    path = dio.join(storage_path, config.name)
    try:
        result = stored_result(path, filesystem)
    except Exception:  # no run yet, or no checkpoint registered
        return None
    metrics = dict(result.metrics or {})
    if int(metrics.get("step", 0)) >= max_iters and "val_miou" in metrics:
        if result.checkpoint is not None:
            metrics["checkpoint_path"] = result.checkpoint.path
        return metrics
    return None


def trial_function(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune trainable: train the trial's run (module docstring)."""
    from ray import tune

    from segplatform.train.plan import check_dataset, schedule
    from segplatform.train.run import TrainingFailure, run

    trial_id = tune.get_context().get_trial_id()
    values = {name: config[name] for name in setup.space.names if name in config}
    train_config = trial_config(setup, trial_id, values)
    offset = 0
    inherited = _inherited(tune.get_checkpoint())
    if inherited is not None:  # PBT cloned another trial into this one
        uri, offset = inherited
        suffix = hashlib.sha1(uri.encode()).hexdigest()[:8]
        _, total, _ = schedule(train_config, check_dataset(train_config))
        train_config = train_config.replace(
            name=trial_run_name(setup.sweep, trial_id, suffix),
            init_checkpoint=uri,
            max_iters=max(total - offset, 1),
            epochs=None,
        )
    _, max_iters, _ = schedule(train_config, check_dataset(train_config))
    finished = stored_final_metrics(train_config, max_iters)
    if finished is not None:  # it ended before the sweep's driver recorded it: report only
        tune.report(tune_metrics(finished, offset, max_iters))
        return
    try:
        run(train_config, callbacks=[EvaluationReport(step_offset=offset, max_iters=max_iters)])
    except TrainingFailure as err:
        raise TrialFailed(f"run {train_config.name} stopped ({err.kind}): {err}") from None
