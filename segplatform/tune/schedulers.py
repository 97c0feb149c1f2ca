"""Trial schedulers of a sweep: ASHA (default), PBT, or none.

Every scheduler ranks trials by ``val_miou`` (max) on the sweep's own time attribute
``trial_step`` (optimizer steps; Tune's ``training_iteration`` restarts when a sweep is
restored). Each Tune result is one evaluation of the trial's run (``segplatform.tune.trial``).

- ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020,
  arXiv:1810.05934; Ray Tune's ``ASHAScheduler``): rungs at ``grace_period × rf^k`` steps; a
  trial reaching a rung below the top ``1/rf`` of the trials recorded there is stopped. The
  rungs stay below the last step (``max_t = max_iters - 1`` with ``stop_last_trials=False``),
  so a trial that reaches its last step is never stopped: it ends, logs its model package and
  closes its MLflow run itself.
- PBT (Jaderberg et al., "Population Based Training of Neural Networks", arXiv:1711.09846; Ray
  Tune's ``PopulationBasedTraining``): every ``perturbation_interval`` steps a trial in the bottom
  quantile clones a trial of the top quantile (its weights, from the checkpoint its last
  evaluation wrote) with perturbed hyperparameters. Tune's PBT exploits Tune checkpoints, which
  trials of Train V2 runs do not save; ``RunCheckpointPBT`` hands Tune the evaluated checkpoint
  of the trial's run instead (the ``checkpoint_path`` of its last result, never one of its last
  step), and the cloned trial starts a run initialised from it (``segplatform.tune.trial``).
  Under PBT the trials keep every evaluated checkpoint (``pbt_keep_checkpoints``), so that the
  checkpoint a clone was promised still exists when it starts.
- none: every trial runs to its end (small grids, random search).
"""

from __future__ import annotations

import math
import random
from typing import Any

from segplatform.tune.space import SearchSpace
from segplatform.tune.trial import TIME_ATTR

__all__ = [
    "METRIC",
    "MODE",
    "SCHEDULERS",
    "RunCheckpointPBT",
    "build_scheduler",
    "pbt_keep_checkpoints",
]

METRIC = "val_miou"
MODE = "max"
SCHEDULERS = ("asha", "pbt", "none")


def build_scheduler(
    kind: str,
    *,
    max_iters: int,
    eval_every: int,
    space: SearchSpace,
    grace_period: int | None = None,
    reduction_factor: float = 2.0,
    perturbation_interval: int | None = None,
    filesystem: Any = None,
    seed: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``(Tune scheduler or None, its settings for the record)``.

    ``grace_period`` (ASHA) defaults to the first evaluation, ``perturbation_interval`` (PBT) to
    two evaluations; both count optimizer steps. ``filesystem``: the pyarrow filesystem of the
    trials' checkpoints (PBT), None for local paths.
    """
    if kind == "none":
        return None, {"scheduler": "none"}
    if kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        grace = grace_period or eval_every
        if not 1 <= grace < max_iters:
            given = (
                f"--grace-period {grace}"
                if grace_period
                else f"ASHA's grace period (the first evaluation, step {grace})"
            )
            raise ValueError(
                f"{given}: ASHA needs 1 <= grace period < max_iters ({max_iters}) so that a "
                "trial can be stopped before its last step; evaluate earlier (--eval-every), "
                "train longer (--max-iters) or use --scheduler none"
            )
        if not reduction_factor > 1:
            raise ValueError(f"--reduction-factor must be > 1, got {reduction_factor}")
        scheduler = ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=max_iters - 1,
            grace_period=grace,
            reduction_factor=reduction_factor,
            stop_last_trials=False,
        )
        rungs = asha_rungs(grace, max_iters - 1, reduction_factor)
        settings = {
            "scheduler": "asha",
            "time_attr": TIME_ATTR,
            "grace_period": grace,
            "reduction_factor": reduction_factor,
            "max_t": max_iters - 1,
            "rungs": ",".join(str(r) for r in rungs),
        }
        return scheduler, settings
    if kind == "pbt":
        interval = perturbation_interval or 2 * eval_every
        if not 1 <= interval < max_iters:
            given = (
                f"--perturbation-interval {interval}"
                if perturbation_interval
                else f"PBT's perturbation interval (two evaluations, {interval} steps)"
            )
            raise ValueError(
                f"{given}: PBT needs 1 <= interval < max_iters ({max_iters}); evaluate earlier "
                "(--eval-every) or train longer (--max-iters)"
            )
        mutations = pbt_mutations(space)
        if not mutations:
            raise ValueError("PBT needs at least one searched setting to perturb")
        scheduler = RunCheckpointPBT(
            time_attr=TIME_ATTR,
            perturbation_interval=interval,
            hyperparam_mutations=mutations,
            synch=False,
            checkpoint_filesystem=filesystem,
        )
        if seed is not None:
            random.seed(seed)
        return scheduler, {
            "scheduler": "pbt",
            "time_attr": TIME_ATTR,
            "perturbation_interval": interval,
            "mutated": ",".join(mutations),
        }
    raise ValueError(f"unknown scheduler {kind!r}; schedulers: {', '.join(SCHEDULERS)}")


def pbt_keep_checkpoints(max_iters: int, eval_every: int, keep: int) -> int:
    """Checkpoints a PBT trial keeps: every evaluation's (at least ``keep``)."""
    return max(keep, math.ceil(max_iters / eval_every) + 1)


def asha_rungs(grace: int, max_t: int, reduction_factor: float) -> list[int]:
    """The steps at which ASHA compares trials (Ray Tune's ``_Bracket`` with one bracket)."""
    count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    return [int(grace * reduction_factor**k) for k in range(count)]


def pbt_mutations(space: SearchSpace) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: the searched settings' own domains."""
    return {dim.name: dim.tune_domain(grid=False) for dim in space.searched}


def _pbt_base() -> type:
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining


class RunCheckpointPBT(_pbt_base()):  # type: ignore[misc]
    """``PopulationBasedTraining`` that exploits the checkpoints of the trials' runs.

    Upper-quantile trials keep, as their exploitable checkpoint, the evaluated checkpoint their
    last result names (``checkpoint_path``); a lower-quantile trial clones one of them with
    perturbed hyperparameters (Tune's ``_exploit``), and restarts with ``tune.get_checkpoint()``
    pointing at that checkpoint. (Overrides Tune's ``_checkpoint_or_exploit``, which would ask
    the trial to save a Tune checkpoint.)
    """

    def __init__(self, *, checkpoint_filesystem: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._checkpoint_filesystem = checkpoint_filesystem

    def _checkpoint_or_exploit(
        self,
        trial: Any,
        tune_controller: Any,
        upper_quantile: list[Any],
        lower_quantile: list[Any],
    ) -> None:
        from ray.tune import Checkpoint

        state = self._trial_state[trial]
        last = state.last_result or {}
        path = last.get("checkpoint_path")
        # A checkpoint of a trial's last step leaves a clone nothing to train.
        unfinished = last.get(TIME_ATTR, 0) < last.get("trial_max_iters", 0)
        if trial in upper_quantile and path and unfinished:
            state.last_checkpoint = Checkpoint(path, filesystem=self._checkpoint_filesystem)
        else:
            state.last_checkpoint = None
        if trial in lower_quantile:
            donor = random.choice(upper_quantile)
            if self._trial_state[donor].last_checkpoint is not None:
                self._exploit(tune_controller, trial, donor)
