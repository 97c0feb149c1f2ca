"""``run_sweep(SweepConfig)``: a hyperparameter sweep over training runs, from the driver's side.

1. Check before anything starts: every value of the space against the architecture
   (``SearchSpace.validate``: ``SpaceError``), the dataset (``DatasetError``, ``PlanError``), the
   sweep's options, an earlier sweep of the same name (``SweepError`` if it was started with
   other settings), then, on the cluster, the placement of one trial's workers
   (``ClusterFitError``: a request that can never fit is refused at once, as training runs are;
   ``SharedStorageError``).
2. Trials at once: ``max_concurrent_trials`` is what the cluster's free resources hold of the
   per-trial worker group, keeping one CPU for Ray Data's reading and decoding tasks
   (``trial_concurrency``), unless given. Trial actors reserve no CPU themselves
   (``segplatform.tune.trial``).
3. MLflow: the sweep's parent run (``segplatform.tune.records``), with the space, the search and
   the scheduler as parameters and ``space.json``; every trial's run is a child of it.
4. Ray Tune: a ``Tuner`` over ``trial_function`` with the space's domains, random or grid search
   (``BasicVariantGenerator``, seeded), and ASHA (default), PBT or no scheduler
   (``segplatform.tune.schedulers``) on ``val_miou``. Storage, local or ``s3://``:
   ``<storage>/<sweep>/sweep.json`` (the settings), ``tune/`` (Tune's experiment state, saved
   every second, ``TUNE_GLOBAL_CHECKPOINT_S``, and uploaded to the storage at most
   ``STATE_SYNC_S`` apart), ``trials/<sweep>-<trial id>/`` (each trial's
   training run and checkpoints).
5. Resume: the same name again (``--resume`` insists on it) restores the sweep with
   ``Tuner.restore(resume_unfinished=True, resume_errored=False)``: finished and stopped trials
   are not run again, unfinished ones continue their runs from their checkpoints, failed ones
   stay failed, and the search goes on to the number of trials asked for.
6. After the last trial: runs of stopped trials still RUNNING in MLflow end KILLED; the parent
   gets ``results.csv`` (one row per trial, best first), ``results.png`` (each hyperparameter
   against validation mIoU), the best trial's id, run and score; the best trial's best
   checkpoint is registered as a version of ``base.register_as`` and the alias moves by
   ``base.promote`` (``segplatform.tracking``). A finished sweep run again registers nothing new.

Ray Tune references: "Hyperparameter Tuning with Ray Tune" for Train V2
(https://docs.ray.io/en/latest/train/user-guides/hyperparameter-optimization.html), "How to
Enable Fault Tolerance in Ray Tune" (``Tuner.restore``,
https://docs.ray.io/en/latest/tune/tutorials/tune-fault-tolerance.html).
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

from segplatform.train.config import TrainConfig
from segplatform.tune.records import parent_key
from segplatform.tune.report import (
    FAILED,
    FINISHED,
    NOT_STARTED,
    STOPPED,
    TrialRow,
    csv_text,
    sorted_rows,
)
from segplatform.tune.schedulers import METRIC, MODE, SCHEDULERS
from segplatform.tune.space import SearchSpace, SpaceError

logger = logging.getLogger(__name__)

__all__ = [
    "SEARCHES",
    "SweepConfig",
    "SweepError",
    "SweepInterrupted",
    "SweepResult",
    "run_sweep",
    "trial_concurrency",
]

SEARCHES = ("random", "grid")
SWEEP_FILE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# Seconds between uploads of Tune's experiment state (trial statuses) to the sweep's storage:
# what a resume after a driver crash can have missed.
STATE_SYNC_S = 2
# TrainConfig fields that may differ when a sweep is resumed (they shape no trial).
_RESUME_FREE_FIELDS = (
    "name",
    "register_as",
    "register_alias",
    "promote",
    "mlflow_uri",
    "ray_address",
    "verbose",
    "storage_options",
    "check_cluster",
)


class SweepError(ValueError):
    """The sweep cannot start as asked (options, an earlier sweep of the same name)."""


class SweepInterrupted(RuntimeError):
    """The sweep stopped before its trials ended (Ctrl-C): nothing was concluded or registered;
    the same command with ``--resume`` continues it."""


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: the trials' common settings, the space, the search and the scheduler."""

    base: TrainConfig  # every trial's settings before the space's (name/register: the sweep's)
    space: SearchSpace
    name: str  # the sweep's name: storage directory, MLflow parent run, trial run prefix
    trials: int | None = None  # random: trials to sample (default 8); grid: None = all
    search: str = "random"  # "random" or "grid"
    scheduler: str = "asha"  # "asha", "pbt" or "none"
    grace_period: int | None = None  # ASHA: steps before a trial can be stopped (first eval)
    reduction_factor: float = 2.0  # ASHA: keep the top 1/rf at each rung
    perturbation_interval: int | None = None  # PBT: steps between exploits (2 evaluations)
    max_concurrent: int | None = None  # trials at once; None: from the free resources
    resume: bool = False  # insist on restoring an earlier sweep of this name
    seed: int | None = None  # random search's seed; None: base.seed

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise SweepError(f"--search must be one of {SEARCHES}, got {self.search!r}")
        if self.scheduler not in SCHEDULERS:
            raise SweepError(f"--scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.trials is not None and self.trials < 1:
            raise SweepError(f"--trials must be >= 1, got {self.trials}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise SweepError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        from segplatform.train.config import _NAME_PATTERN

        # Trial runs are named <sweep>-<trial id>[-<8 hex>] (trial ids: 11 characters).
        if not _NAME_PATTERN.match(self.name) or len(self.name) > 100:
            raise SweepError(
                f"sweep name {self.name!r}: 1-100 letters, digits, '.', '_' or '-' (its trials' "
                "runs are named <sweep>-<trial id>)"
            )

    def trial_count(self) -> int:
        """How many trials the sweep runs."""
        if self.search == "grid":
            size = self.space.grid_size()
            if self.trials is not None and self.trials != size:
                raise SweepError(
                    f"--trials {self.trials}: a grid search runs every combination of the "
                    f"space, {size} here; leave --trials out or use --search random"
                )
            return size
        return self.trials or 8


@dataclass
class SweepResult:
    """What a sweep produced (``rows`` in trial order; ``sorted_rows`` ranks them)."""

    name: str
    rows: list[TrialRow]
    best: TrialRow | None
    registration: Any = None  # segplatform.tracking.Registration of the best trial, or None
    registration_line: str = ""  # "registered as models:/NAME@ALIAS (...)" or why not
    parent_run_id: str | None = None
    parent_key: str = ""  # the parent run's segplatform.run_key
    storage_uri: str = ""
    resumed: bool = False
    names: tuple[str, ...] = ()  # the searched settings (table columns)
    notes: list[str] = field(default_factory=list)


# ---- helpers --------------------------------------------------------------------------------


def say(line: str) -> None:
    """One line of the sweep's log on stdout."""
    print(line, flush=True)


def _absolute(config: TrainConfig) -> TrainConfig:
    """Local paths and a SQLite URI made absolute: trials run in other working directories."""
    from segplatform.data import io as dio
    from segplatform.train.plan import mlflow_uri

    changes: dict[str, Any] = {}
    for name in ("data", "storage_path"):
        value = getattr(config, name)
        if value and not dio.is_s3(value):
            changes[name] = dio.local_path(value)
    uri = mlflow_uri(config)
    if uri:
        changes["mlflow_uri"] = uri
    return config.replace(**changes) if changes else config


def tune_filesystem(storage_uri: str, storage_options: dict[str, Any] | None) -> Any:
    """The pyarrow filesystem for Tune's storage (None: local).

    Tune pickles its filesystem into its experiment state: when the S3 keys come from the
    environment (AWS_*), the filesystem carries only the endpoint and each process takes the keys
    from its own environment, so they never reach storage; explicit keys have to travel with it.
    """
    from segplatform.data import io as dio

    if not dio.is_s3(storage_uri):
        return None
    if storage_options and storage_options.get("key"):
        return dio.pyarrow_s3(storage_options)
    from urllib.parse import urlparse

    import pyarrow.fs as pafs

    settings = dio.s3_settings(storage_options)
    kwargs: dict[str, Any] = {"region": settings.region or "us-east-1"}
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**kwargs)


def trial_concurrency(config: TrainConfig, trials: int) -> tuple[int, str]:
    """``(trials at once, why)``: how many trial worker groups the cluster's free resources hold,
    keeping one CPU (at least one decoding task's) for Ray Data; at least 1, at most ``trials``."""
    import ray

    free = ray.available_resources()
    workers = max(config.num_workers, 1)
    per_trial = {k: v * workers for k, v in config.worker_bundle().items() if v > 0}
    if config.num_workers == 0:
        per_trial = {"CPU": 1.0}  # local mode: the loop runs in the trial actor
    reserve = max(1.0, config.loader_task_cpus)
    counts = []
    for resource, need in per_trial.items():
        have = free.get(resource, 0.0) - (reserve if resource == "CPU" else 0.0)
        counts.append(math.floor(have / need + 1e-9))
    fits = min(counts) if counts else trials
    count = max(1, min(fits, trials))
    shown = ", ".join(f"{v:g} {k}" for k, v in per_trial.items())
    free_shown = ", ".join(f"{free.get(k, 0.0):g} {k}" for k in per_trial)
    return count, (
        f"{count} trial(s) at once: each takes {shown}; free: {free_shown} "
        f"({reserve:g} CPU kept for data loading)"
    )


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def _spec(sweep: SweepConfig, trials: int, scheduler: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed sweep must keep (stored as ``sweep.json``)."""
    base = {k: v for k, v in sweep.base.to_dict().items() if k not in _RESUME_FREE_FIELDS}
    return {
        "version": 1,
        "name": sweep.name,
        "arch": sweep.base.arch,
        "space": sweep.space.to_dict(),
        "search": sweep.search,
        "trials": trials,
        "seed": sweep.seed if sweep.seed is not None else sweep.base.seed,
        "scheduler": scheduler,
        "base": json.loads(json.dumps(base, default=str)),
    }


def _differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(stored) | set(new)):
        if key == "id":
            continue
        if key == "base":
            old_base, new_base = stored.get("base", {}), new.get("base", {})
            for name in sorted(set(old_base) | set(new_base)):
                if old_base.get(name) != new_base.get(name):
                    out.append(f"{name}: {old_base.get(name)!r} -> {new_base.get(name)!r}")
        elif stored.get(key) != new.get(key):
            out.append(f"{key}: {stored.get(key)!r} -> {new.get(key)!r}")
    return out


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write_json(fs: Any, path: str, data: dict[str, Any]) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(data, indent=1, sort_keys=True).encode())


# ---- the driver's progress lines and MLflow bookkeeping (a Tune callback) -------------------


def _progress_callback(**kwargs: Any) -> Any:
    from ray.tune import Callback

    class SweepProgress(Callback):
        """One line per trial event; ends the MLflow runs of stopped and failed trials."""

        def __init__(
            self,
            sweep: str,
            names: tuple[str, ...],
            scheduler: str,
            mlflow_uri: str | None,
            experiment: str,
        ) -> None:
            self.sweep = sweep
            self.names = names
            self.scheduler = scheduler
            self.mlflow_uri = mlflow_uri
            self.experiment = experiment

        def _params(self, trial: Any) -> str:
            from segplatform.tune.report import show_value

            config = trial.config or {}
            return " ".join(f"{n}={show_value(config[n])}" for n in self.names if n in config)

        def _run(self, trial: Any) -> str:
            from segplatform.tune.trial import trial_run_name

            path = (trial.last_result or {}).get("checkpoint_path")
            if path:
                return posixpath.basename(posixpath.dirname(str(path).rstrip("/")))
            return trial_run_name(self.sweep, trial.trial_id)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if METRIC in (trial.last_result or {}):
                if self.scheduler == "pbt":
                    # PBT cloned a better trial into this one (its last result is the donor's).
                    what = f"restarted from run {self._run(trial)}'s checkpoint (PBT)"
                else:  # a restored sweep continues the trial's run
                    what = f"resumed (run {self._run(trial)})"
                say(f"{self.sweep}: trial {trial.trial_id} {what}: {self._params(trial)}")
                return
            say(
                f"{self.sweep}: trial {trial.trial_id} started (run {self._run(trial)}): "
                f"{self._params(trial)}"
            )

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            from segplatform.tune.trial import TIME_ATTR

            if METRIC not in result:
                return
            best = result.get("best_val_miou", result[METRIC])
            say(
                f"{self.sweep}: trial {trial.trial_id} evaluated at step "
                f"{result.get(TIME_ATTR, '?')}/{result.get('trial_max_iters', '?')}: "
                f"val mIoU {result[METRIC]:.4f} (best {best:.4f})"
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from segplatform.tune.trial import TIME_ATTR

            last = trial.last_result or {}
            step, total = last.get(TIME_ATTR), last.get("trial_max_iters")
            if METRIC not in last:
                say(f"{self.sweep}: trial {trial.trial_id} ended without an evaluation")
                return
            best = last.get("best_val_miou", last[METRIC])
            if step is not None and total and step < total:
                say(
                    f"{self.sweep}: trial {trial.trial_id} stopped early by "
                    f"{self.scheduler.upper()} at step {step}/{total}: val mIoU "
                    f"{last[METRIC]:.4f} (best {best:.4f}) [{self._params(trial)}]"
                )
                if self.mlflow_uri:
                    from segplatform.tune.records import end_child

                    end_child(self.mlflow_uri, self.experiment, self._run(trial), "KILLED")
            else:
                say(
                    f"{self.sweep}: trial {trial.trial_id} finished at step {step}/{total}: "
                    f"best val mIoU {best:.4f} [{self._params(trial)}]"
                )

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            message = _error_line(trial)
            say(f"{self.sweep}: trial {trial.trial_id} failed: {message}")
            if self.mlflow_uri:
                from segplatform.tune.records import end_child

                end_child(self.mlflow_uri, self.experiment, self._run(trial), "FAILED")

    return SweepProgress(**kwargs)


def _error_line(trial: Any) -> str:
    """The line of a failed trial's error that says what happened."""
    text = ""
    try:
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                text = f.read()
    except Exception:  # Tune's bookkeeping changed: fall back to the generic line
        text = ""
    return error_summary(text) or "see the trial's log"


def error_summary(text: str) -> str:
    """``run X stopped (diverged): ...`` of a ``TrialFailed``, else the last exception line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "TrialFailed: " in line:
            return line.split("TrialFailed: ", 1)[1][:300]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Failed)\b", line):
            return line[:300]
    return (lines[-1] if lines else "")[:300]


# ---- the sweep --------------------------------------------------------------------------------


def run_sweep(sweep: SweepConfig) -> SweepResult:
    """Run ``sweep`` (module docstring) and return its results.

    Refused before anything starts: SpaceError, SweepError, DatasetError, PlanError (no Ray
    started); ClusterFitError, SharedStorageError (after joining the cluster).
    """
    from segplatform.data import io as dio
    from segplatform.train.plan import check_dataset, schedule
    from segplatform.tune.schedulers import build_scheduler

    base = sweep.base
    sweep.space.validate(base)
    trials = sweep.trial_count()
    info = check_dataset(base)
    _, max_iters, eval_every = schedule(base, info)
    searched = set(sweep.space.names)
    if base.epochs is not None and searched & {"batch_size", "grad_accum"}:
        raise SweepError(
            "the space searches batch_size/grad_accum while the length is given in epochs: "
            "trials would run different numbers of steps; give --max-iters"
        )
    base = _absolute(base)
    if sweep.scheduler == "pbt":
        from segplatform.tune.schedulers import pbt_keep_checkpoints

        keep = pbt_keep_checkpoints(max_iters, eval_every, base.keep_checkpoints)
        base = base.replace(keep_checkpoints=keep)
    storage_root = f"{base.storage_path.rstrip('/')}/{sweep.name}"
    fs, root = dio.resolve(storage_root, base.storage_options)
    tune_fs = tune_filesystem(storage_root, base.storage_options)
    scheduler, scheduler_settings = _scheduler(sweep, build_scheduler, max_iters, eval_every, fs)
    spec = _spec(sweep, trials, scheduler_settings)
    stored = _read_json(fs, dio.join(root, SWEEP_FILE))
    spec["id"] = stored.get("id", "") if stored else uuid.uuid4().hex[:12]
    if stored is not None:
        differences = _differences(stored, spec)
        if differences:
            raise SweepError(
                f"{storage_root} holds sweep {sweep.name!r} started with other settings: "
                f"{'; '.join(differences)}. Run it again with the same settings to resume it, "
                "or give a new --name"
            )
    elif sweep.resume:
        raise SweepError(f"--resume: no sweep {sweep.name!r} in {base.storage_path} to resume")

    # ---- the cluster ----
    from segplatform.train.run import check_placement, ensure_ray

    ensure_ray(base)
    placement = check_placement(base)
    if sweep.max_concurrent is not None:
        concurrent, why = sweep.max_concurrent, f"{sweep.max_concurrent} trial(s) at once (given)"
    else:
        concurrent, why = trial_concurrency(base, trials)

    # ---- MLflow parent ----
    parent_id, parent_resumed = None, False
    key = parent_key(sweep.name, spec["id"])
    if base.mlflow_uri:
        parent_id, parent_resumed = _open_parent(sweep, base, spec, key)
    elif base.register_as:
        raise SweepError("--register-as needs MLflow: give --mlflow-uri or MLFLOW_TRACKING_URI")
    if stored is None:
        _write_json(fs, dio.join(root, SWEEP_FILE), spec)

    # ---- Ray Tune ----
    from ray import tune

    from segplatform.tune.trial import TRIAL_RESOURCES, TrialSetup, trial_function

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if not base.verbose:  # Tune's notices of every state save; the sweep's lines say more
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    # Tune's own status tables would bury the sweep's lines: its legacy reporter at verbose 0
    # prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trials_storage = f"{storage_root}/{TRIALS_DIR}"
    setup = TrialSetup(
        sweep=sweep.name,
        base=base,
        space=sweep.space,
        trials_storage=trials_storage,
        parent_run_id=parent_id,
    )
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, setup=setup), dict(TRIAL_RESOURCES)
    )
    tune_path = dio.join(root, TUNE_DIR)
    restoring = stored is not None and tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs)
    details = ", ".join(
        f"{k.replace('_', ' ')} {v}"
        for k, v in scheduler_settings.items()
        if k not in ("scheduler", "time_attr")
    )
    say(
        f"sweep {sweep.name}: {base.arch}{' (tiny)' if base.tiny else ''}, {trials} trial(s) by "
        f"{sweep.search} search over {sweep.space.summary()}; scheduler {sweep.scheduler}"
        + (f" ({details})" if details else "")
        + f"; {why}; each trial {max_iters} iterations on {max(base.num_workers, 1)} worker(s); "
        f"{placement}; storage {storage_root}"
        + (f"; MLflow parent run {parent_id}" if parent_id else "")
        + ("; resuming" if restoring else "")
    )
    if restoring:
        tuner = tune.Tuner.restore(
            tune_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            storage_filesystem=tune_fs,
        )
    else:
        from ray.tune.search import BasicVariantGenerator

        seed = sweep.seed if sweep.seed is not None else base.seed
        tuner = tune.Tuner(
            trainable,
            param_space=sweep.space.param_space(grid=sweep.search == "grid"),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                num_samples=1 if sweep.search == "grid" else trials,
                scheduler=scheduler,
                # Tune applies max_concurrent_trials only to a search algorithm it makes.
                search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=concurrent),
                trial_name_creator=_trial_dirname,
                trial_dirname_creator=_trial_dirname,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=root,
                storage_filesystem=tune_fs,
                callbacks=[
                    _progress_callback(
                        sweep=sweep.name,
                        names=sweep.space.names,
                        scheduler=sweep.scheduler,
                        mlflow_uri=base.mlflow_uri,
                        experiment=base.experiment,
                    )
                ],
                failure_config=tune.FailureConfig(max_failures=0),
                # Tune's default uploads its state every 5 minutes: a sweep resumed after its
                # driver died would run again the trials that ended since the last upload.
                sync_config=tune.SyncConfig(sync_period=STATE_SYNC_S),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    # Tune returns from a Ctrl-C too, its state saved: such a sweep is resumed, not concluded.
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    unfinished = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SweepInterrupted(
            f"sweep {sweep.name} interrupted with {len(unfinished)} trial(s) unfinished "
            f"({', '.join(unfinished)}); run the same command with --resume to continue it"
        )

    # ---- results ----
    result = SweepResult(
        name=sweep.name,
        rows=_rows(grid, sweep, max_iters),
        best=None,
        parent_run_id=parent_id,
        parent_key=key,
        storage_uri=storage_root,
        resumed=restoring or parent_resumed,
        names=sweep.space.names,
    )
    scored = [r for r in result.rows if r.best_val_miou is not None]
    result.best = sorted_rows(scored)[0] if scored else None
    if base.mlflow_uri and parent_id:
        _finish_parent(sweep, base, info, result)
    return result


def _scheduler(
    sweep: SweepConfig, build: Any, max_iters: int, eval_every: int, fs: Any
) -> tuple[Any, dict[str, Any]]:
    import pyarrow.fs as pafs

    try:
        return build(
            sweep.scheduler,
            max_iters=max_iters,
            eval_every=eval_every,
            space=sweep.space,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
            perturbation_interval=sweep.perturbation_interval,
            filesystem=None if isinstance(fs, pafs.LocalFileSystem) else fs,
            seed=sweep.seed,
        )
    except (ValueError, SpaceError) as err:
        raise SweepError(str(err)) from None


def _open_parent(
    sweep: SweepConfig, base: TrainConfig, spec: dict[str, Any], key: str
) -> tuple[str, bool]:
    from segplatform.tune.records import open_parent

    try:
        parent_id, resumed = open_parent(
            base.mlflow_uri,
            base.experiment,
            sweep.name,
            key,
            tags={"architecture": base.arch, "dataset": base.data},
        )
    except Exception as err:
        raise SweepError(
            f"MLflow at {base.mlflow_uri} cannot open the sweep's run ({err}); the trials' runs "
            "nest under it, so the sweep does not start without it"
        ) from None
    if not resumed:
        from mlflow.entities import Param

        from segplatform.tune.records import client as mlflow_client

        client = mlflow_client(base.mlflow_uri)
        params = {
            "sweep.arch": base.arch,
            "sweep.search": spec["search"],
            "sweep.trials": spec["trials"],
            "sweep.seed": spec["seed"],
            "sweep.metric": f"{METRIC} ({MODE})",
            **{f"scheduler.{k}": v for k, v in spec["scheduler"].items()},
            **{f"space.{d.name}": d.describe() for d in sweep.space.dimensions},
            **{f"train.{k}": v for k, v in spec["base"].items()},
        }
        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            client.log_batch(parent_id, params=batch[i : i + 100])
        client.log_dict(parent_id, sweep.space.to_dict(), "space.json")
    return parent_id, resumed


def _rows(grid: Any, sweep: SweepConfig, max_iters: int) -> list[TrialRow]:
    from segplatform.tune.trial import TIME_ATTR, trial_run_name

    rows = []
    for trial_result in grid:
        metrics = dict(trial_result.metrics or {})
        # The trial's directory is named after its id (a PBT clone's metrics are its donor's).
        trial_id = posixpath.basename(str(trial_result.path).rstrip("/"))
        config = trial_result.config or {}
        checkpoint = metrics.get("checkpoint_path")
        run_name = (
            posixpath.basename(posixpath.dirname(str(checkpoint).rstrip("/")))
            if checkpoint
            else trial_run_name(sweep.name, trial_id)
        )
        step = metrics.get(TIME_ATTR)
        total = metrics.get("trial_max_iters", max_iters)
        if trial_result.error is not None:
            status = FAILED
        elif METRIC not in metrics:
            status = NOT_STARTED
        elif step is not None and step < total:
            status = STOPPED
        else:
            status = FINISHED
        error = error_summary(str(trial_result.error)) if trial_result.error is not None else ""
        rows.append(
            TrialRow(
                trial_id=trial_id,
                run_name=run_name,
                status=status,
                params={n: config[n] for n in sweep.space.names if n in config},
                best_val_miou=metrics.get("best_val_miou", metrics.get(METRIC)),
                last_val_miou=metrics.get(METRIC),
                step=step,
                max_iters=total,
                checkpoint=checkpoint,
                error=error,
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def _finish_parent(sweep: SweepConfig, base: TrainConfig, info: Any, result: SweepResult) -> None:
    """End the trials' leftover runs, log the results on the parent, register the winner."""
    from segplatform.tracking import RunTracker
    from segplatform.train.loop import tracking_buffer_root
    from segplatform.tune.records import end_child, end_running_children
    from segplatform.tune.report import figure

    uri, experiment = base.mlflow_uri, base.experiment
    for row in result.rows:
        if row.status in (STOPPED, FAILED):
            end_child(
                uri, experiment, row.run_name, "KILLED" if row.status == STOPPED else "FAILED"
            )
    ended = end_running_children(uri, experiment, result.parent_run_id, "KILLED")
    if ended:
        result.notes.append(
            f"ended {len(ended)} interrupted trial run(s) KILLED: {', '.join(ended)}"
        )

    buffer = tracking_buffer_root(sweep.name) / f"sweep-{uuid.uuid4().hex[:8]}"
    parent = RunTracker(uri, experiment, sweep.name, buffer_dir=buffer, run_key=result.parent_key)
    names = sweep.space.names
    import tempfile

    with tempfile.TemporaryDirectory(prefix="segplatform-sweep-") as directory:
        csv_path = os.path.join(directory, "results.csv")
        with open(csv_path, "w") as f:
            f.write(csv_text(result.rows, names))
        parent.log_artifacts(csv_path)
        fig = figure(result.rows, sweep.space, title=f"{sweep.name}: best val mIoU per trial")
        parent.log_figure(fig, "results.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
    counts = {s: sum(1 for r in result.rows if r.status == s) for s in (FINISHED, STOPPED, FAILED)}
    parent.log_metrics(
        {
            "trials": len(result.rows),
            "trials_finished": counts[FINISHED],
            "trials_stopped_early": counts[STOPPED],
            "trials_failed": counts[FAILED],
        },
        step=0,
    )
    best = result.best
    if best is not None:
        parent.set_tags(
            {
                "best_trial": best.trial_id,
                "best_run": best.run_name,
                "best_checkpoint": best.checkpoint or "",
            }
        )
        parent.log_metrics({"best_val_miou": best.best_val_miou}, step=0)
        if base.register_as:
            _register(sweep, base, info, result, parent)
    parent.finish("FINISHED" if best is not None else "FAILED")


def _register(
    sweep: SweepConfig, base: TrainConfig, info: Any, result: SweepResult, parent: Any
) -> None:
    """Register the best trial's best checkpoint (``segplatform.tune.records``)."""
    from segplatform.data import io as dio
    from segplatform.train.run import best_checkpoint, git_commit, registration_line
    from segplatform.tune.records import find_run, has_model, register_version
    from segplatform.tune.trial import stored_result

    best = result.best
    uri, experiment = base.mlflow_uri, base.experiment
    existing = find_run(uri, experiment, result.parent_key)
    if existing is not None and existing.data.tags.get("registered_model"):
        result.registration_line = (
            f"already registered: {existing.data.tags['registered_model']} (the sweep ended "
            "before; nothing new to register)"
        )
        return
    if not best.checkpoint:
        result.registration_line = f"nothing registered: trial {best.trial_id} has no checkpoint"
        return
    run_dir = posixpath.dirname(str(best.checkpoint).rstrip("/"))
    filesystem = None
    if dio.is_s3(base.storage_path):
        filesystem = dio.pyarrow_s3(base.storage_options)
    trained = stored_result(run_dir, filesystem)
    checkpoint, metrics = best_checkpoint(trained)
    child = find_run(uri, experiment, best.run_name)
    # The version's source is the trial's own run; the sweep's run stands in if MLflow lost it.
    run_id = child.info.run_id if child is not None else result.parent_run_id
    tags = {
        "dataset": base.data,
        "dataset_name": info.name,
        "manifest_version": str(info.version),
        "git_commit": git_commit(),
        "ray_run_name": best.run_name,
        "val_miou": str(metrics.get("val_miou", best.best_val_miou)),
        "checkpoint": checkpoint.path,
        "sweep": sweep.name,
        "sweep_trial": best.trial_id,
    }
    try:
        with checkpoint.as_directory() as directory:
            package = None if has_model(uri, run_id) else os.path.join(directory, "model")
            registration = register_version(
                uri,
                experiment,
                run_id,
                package_dir=package,
                name=base.register_as,
                alias=base.register_alias,
                tags=tags,
                promote=base.promote,
            )
    except Exception as err:  # the sweep's results stay; the registration can be redone
        result.registration_line = f"registration of {base.register_as} failed: {err}"
        return
    result.registration = registration
    result.registration_line = registration_line(registration)
    where = (
        f"models:/{base.register_as}@{registration.alias}"
        if registration.alias
        else f"models:/{base.register_as}/{registration.version}"
    )
    parent.set_tags({"registered_model": where})


def print_summary(result: SweepResult, stream: Any = None) -> None:
    """The final table (best first), the best trial and where the model went."""
    from segplatform.tune.report import format_table

    stream = stream or sys.stdout
    print(
        f"sweep {result.name}: {len(result.rows)} trial(s), best validation mIoU first", file=stream
    )
    print(format_table(result.rows, result.names), file=stream)
    if result.best is not None:
        best = result.best
        print(
            f"best trial {best.trial_id} (run {best.run_name}): val mIoU {best.best_val_miou:.4f}",
            file=stream,
        )
    for note in result.notes:
        print(note, file=stream)
    if result.registration_line:
        print(result.registration_line, file=stream)
    if result.parent_run_id:
        print(f"MLflow parent run: {result.parent_run_id}", file=stream)
    print(f"storage: {result.storage_uri}", file=stream, flush=True)
