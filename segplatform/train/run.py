"""``run(config)``: one distributed training run on Ray Train, from the driver's side.

1. Join a Ray cluster (``config.ray_address`` or ``RAY_ADDRESS``), or start a local one, and
   check the request against its alive nodes before anything starts (``check_placement``): a
   placement the nodes cannot hold, or node-local storage on a multi-node cluster, fails at once.
2. Resolve the *plan* (``segplatform.train.plan``): iterations per epoch, ``max_iters``,
   evaluation and checkpoint periods, the train and val splits indexed from their shards'
   footers (``segplatform.data.shards``; the rows are read where they are decoded), class
   weights (median frequency over the train split), the MLflow URI and the resume fingerprint.
   A run whose latest checkpoint has another fingerprint is refused before Ray starts
   (``ResumeMismatchError``, naming the fields).
3. Build a ``TorchTrainer`` over ``train_loop_per_worker``, checkpoints under
   ``storage_path/name`` (local or S3 through a pyarrow filesystem), the best
   ``keep_checkpoints`` kept by ``val_miou`` (resume-only checkpoints score below any), and
   ``FailureConfig(max_failures)`` for lost workers.
4. Write ``config.json`` into the run directory: the ``TrainConfig`` it runs with (storage
   credentials left out), which ``segplatform train --config`` takes to run it again.
   ``fit()``. The same ``name`` and ``storage_path`` again resumes from the latest checkpoint.
   A run the workers stopped (bad data, divergence) raises ``TrainingFailure`` with their
   message; nothing is registered.
5. The best checkpoint's model package is logged to the run's MLflow run and, with
   ``register_as``, registered as a model version tagged with the dataset URI, manifest version,
   git commit, Ray run name and ``val_miou``; ``register_alias`` moves to it as ``promote`` says
   (default: only when it scores at least the current holder on the same data). One line on
   stdout says where the alias is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segplatform.train.config import TrainConfig
from segplatform.train.plan import (
    Plan,
    PlanError,
    ResumeMismatchError,
    check_dataset,
    compare_fingerprints,
    mlflow_uri,
    resume_fingerprint,
    schedule,
)

logger = logging.getLogger(__name__)

# Names the commit of the code for the run's ``git_commit`` tag where git cannot tell.
GIT_COMMIT_ENV_VAR = "SEGPLATFORM_GIT_COMMIT"
CONFIG_FILE = "config.json"  # the run's TrainConfig, in its run directory

__all__ = [
    "PlanError",
    "ResumeMismatchError",
    "TrainingFailure",
    "best_checkpoint",
    "build_plan",
    "check_dataset",
    "check_placement",
    "check_resume",
    "ensure_ray",
    "git_commit",
    "register_best",
    "run",
    "storage_for",
]


class TrainingFailure(RuntimeError):
    """The workers stopped the run (bad data, a non-finite loss): not retried, not registered."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def ensure_ray(config: TrainConfig) -> None:
    """Connect to ``config.ray_address`` / ``RAY_ADDRESS``, or start a local Ray (embedded)."""
    import ray

    if ray.is_initialized():
        return
    from segplatform.local import cluster_address

    address = cluster_address(config.ray_address)  # the local platform's dashboard URL too
    if address:
        ray.init(address=address)
        return
    # Embedded default: a local cluster with enough logical CPUs for the workers and the tasks
    # that decode their batches.
    # Its dashboard (127.0.0.1, a free port) serves the State API that Ray Train's placement-group
    # cleaner polls every second (it warns on every poll without it). A new local cluster has
    # token authentication on unless RAY_AUTH_MODE says otherwise (Ray's default for ray.init).
    from segplatform.services.ray_head import free_port

    needed = math.ceil(max(config.num_workers, 1) * config.resolved_cpus_per_worker()) + 2
    # Its token notices (auth on, a token generated) say nothing a user acts on here.
    token_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = token_log.level
    if not config.verbose:
        token_log.setLevel(logging.ERROR)
    try:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, needed),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
        )
    finally:
        token_log.setLevel(level)


def check_placement(config: TrainConfig) -> str:
    """Refuse, before anything starts, a run the connected cluster cannot hold or serve.

    Raises ``ClusterFitError`` (placement or resources per worker beyond the alive nodes; skipped
    with ``check_cluster=False`` or on an autoscaling cluster) or ``SharedStorageError`` (a
    node-local ``storage_path``, ``data`` or pretrained backbone on more than one node). Returns
    one line describing the request and the cluster.
    """
    import ray

    from segplatform.train.placement import autoscaling_node_groups, preflight

    locations: dict[str, str | None] = {"storage_path": config.storage_path, "data": config.data}
    pretrained = config.arch_params.get("pretrained_backbone")
    if isinstance(pretrained, str):
        locations["arch_params.pretrained_backbone"] = pretrained
    return preflight(
        bundle=config.worker_bundle(),
        num_workers=max(config.num_workers, 1),
        strategy=config.placement_strategy,
        locations=locations,
        nodes=ray.nodes(),
        node_groups=autoscaling_node_groups(),
        # Local mode (num_workers=0) places no worker group.
        check_fit=config.check_cluster and config.num_workers > 0,
        shared_local_storage=config.shared_local_storage,
        data_cpus=config.loader_task_cpus if config.loader_tasks else 0.0,
    )


def storage_for(config: TrainConfig) -> tuple[str, Any, str]:
    """``(storage_path for RunConfig, pyarrow filesystem or None, URI of the run directory)``.

    S3 goes through a ``pyarrow.fs.S3FileSystem`` (endpoint and keys from ``storage_options`` or
    the AWS variables) and a path without ``s3://``, as Ray requires with a filesystem.
    """
    from segplatform.data import io as dio

    if dio.is_s3(config.storage_path):
        fs, path = dio.resolve(config.storage_path, config.storage_options)
        return path, fs, f"{config.storage_path.rstrip('/')}/{config.name}"
    local = os.path.abspath(os.path.expanduser(dio.local_path(config.storage_path)))
    return local, None, os.path.join(local, config.name)


def git_commit() -> str:
    """The commit of the code that runs: ``SEGPLATFORM_GIT_COMMIT`` when set (a job submitted
    with ``ray job submit`` runs an uploaded copy without ``.git``: pass it in the runtime
    env), else the git checkout this package is in, else ``"unknown"``."""
    commit = os.environ.get(GIT_COMMIT_ENV_VAR, "").strip()
    if commit:
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_plan(config: TrainConfig, info: Any, run_uri: str) -> Plan:
    """The plan of a run (``segplatform.train.plan``): indexes both splits from their shards'
    footers (median-frequency class weights count pixels in Ray tasks, so Ray must be
    running)."""
    import ray

    from segplatform.data.io import canonical_uri
    from segplatform.data.shards import open_split
    from segplatform.train.batches import class_statistics

    iters_per_epoch, max_iters, eval_every = schedule(config, info)
    train = open_split(
        config.data,
        config.train_split,
        config.storage_options,
        expected_rows=info.splits[config.train_split],
    )
    val = open_split(
        config.data,
        config.val_split,
        config.storage_options,
        expected_rows=info.splits[config.val_split],
        columns=("id", "image", "mask"),
    )
    class_weights: list[float] | None = None
    if config.class_weights == "median_frequency":
        class_weights = class_statistics(train, info.num_classes, info.ignore_index)
    elif config.class_weights is not None:
        class_weights = [float(v) for v in config.class_weights]
    uri = mlflow_uri(config)
    return Plan(
        dataset=info.to_json(),
        num_classes=info.num_classes,
        train_rows=info.splits[config.train_split],
        iters_per_epoch=iters_per_epoch,
        max_iters=max_iters,
        eval_every=eval_every,
        checkpoint_every=config.checkpoint_every,
        fingerprint=resume_fingerprint(config, info.num_classes, max_iters),
        run_storage_uri=run_uri,
        mlflow_uri=uri,
        # The driver's choice of buffer directory (workers do not share its environment).
        tracking_buffer=os.environ.get("SEGPLATFORM_TRACKING_BUFFER"),
        class_weights=class_weights,
        overlay_count=min(config.overlay_samples, val.rows) if uri else 0,
        local_mode=config.num_workers == 0,
        tags={
            "dataset": canonical_uri(config.data),
            "dataset_name": info.name,
            "manifest_version": str(info.version),
            "dataset_revision": info.revision,  # the rows' content: a rewrite changes it
            "git_commit": git_commit(),
            "ray_run_name": config.name,
            "architecture": config.arch,
            # MLflow shows the run under its parent (a sweep's run).
            **(
                {"mlflow.parentRunId": config.mlflow_parent_run} if config.mlflow_parent_run else {}
            ),
        },
        train=train,
        val=val,
        storage_ref=ray.put(config.storage_options) if config.storage_options else None,
    )


def check_resume(config: TrainConfig, info: Any) -> str | None:
    """The checkpoint the run will resume from (None: a new run); ``ResumeMismatchError`` when
    it was written under another model or schedule (the fields are named)."""
    from segplatform.train.state import latest_fingerprint

    _, _, run_uri = storage_for(config)
    try:
        latest = latest_fingerprint(run_uri, config.storage_options)
    except OSError:
        return None  # storage unreachable: fit() reports it (and waits for it)
    if latest is None:
        return None
    name, stored = latest
    _, max_iters, _ = schedule(config, info)
    differences = compare_fingerprints(
        stored, resume_fingerprint(config, info.num_classes, max_iters)
    )
    if differences:
        raise ResumeMismatchError(
            f"{run_uri} already holds run {config.name!r}, whose latest checkpoint ({name}) was "
            f"written with other settings: {'; '.join(differences)}. Run again with the same "
            "settings to resume it, or give a new --name to start another run"
        )
    return name


def _driver_tracker(config: TrainConfig, plan: Plan) -> Any:
    from segplatform.tracking import RunTracker

    if not plan.mlflow_uri:
        return RunTracker.disabled()
    from segplatform.train.loop import tracking_buffer_root

    root = tracking_buffer_root(config.name, plan.tracking_buffer)
    buffer = root / f"driver-{uuid.uuid4().hex[:8]}"
    return RunTracker(
        plan.mlflow_uri,
        config.experiment,
        config.name,
        buffer_dir=buffer,
        run_key=config.name,
        tags=plan.tags,
    )


def best_checkpoint(result: Any) -> tuple[Any, dict[str, Any]]:
    """The evaluated checkpoint with the highest ``val_miou`` and its metrics (the last one in
    local mode, which keeps no checkpoint history)."""
    evaluated = [(c, m) for c, m in result.best_checkpoints or [] if m and "val_miou" in m]
    if not evaluated:
        return result.checkpoint, dict(result.metrics or {})
    best, metrics = max(evaluated, key=lambda item: item[1]["val_miou"])
    return best, dict(metrics)


def register_best(config: TrainConfig, plan: Plan, result: Any, warning: str = "") -> Any:
    """Log the best checkpoint's model package to MLflow and register it, with ``warning``
    (``one_class_warning``) as a tag; returns the checkpoint."""
    best, metrics = best_checkpoint(result)
    if best is None or not plan.mlflow_uri:
        return best
    tracker = _driver_tracker(config, plan)
    with best.as_directory() as directory:
        tracker.log_artifacts(Path(directory) / "model", "model")
        tracker.set_tags({"best_checkpoint": best.path, "best_step": metrics.get("step", "")})
        if "val_miou" in metrics:
            tracker.log_metrics({"best_val_miou": metrics["val_miou"]}, step=metrics.get("step", 0))
        if warning:
            tracker.set_tags({"warning": warning})
        if config.register_as:
            tags = {
                k: v
                for k, v in plan.tags.items()
                if k not in ("architecture", "mlflow.parentRunId")
            }
            tags["val_miou"] = str(metrics.get("val_miou", ""))
            if warning:
                tags["warning"] = warning
            tags["checkpoint"] = best.path
            tracker.register_model(
                "model",
                config.register_as,
                alias=config.register_alias,
                tags=tags,
                promote=config.promote,
            )
        delivered = tracker.finish("FINISHED")
    for registration in tracker.registrations:
        print(registration_line(registration), flush=True)
    if config.register_as and not delivered:
        print(
            f"registration of {config.register_as} pending: MLflow did not take it (see the "
            "warning above for the buffer to upload with `segplatform tracking sync`)",
            flush=True,
        )
    return best


def one_class_warning(plan: Plan, config: TrainConfig, metrics: dict[str, Any]) -> str:
    """``"the model predicts background everywhere: ..."`` when the evaluation of ``metrics``
    gave one class to (nearly) every pixel (``segplatform.metrics.one_class_everywhere``), else
    ``""``."""
    if metrics.get("val_one_class") is None:
        return ""
    from segplatform.data.format import DatasetInfo
    from segplatform.train.loop import class_name

    classes = DatasetInfo.from_json(plan.dataset, config.data).classes
    return (
        f"the model predicts {class_name(classes, metrics['val_one_class'])} everywhere on "
        f"{config.val_split}: it has not learned the task (train longer, or check the recipe "
        "with --show-recipe)"
    )


def registration_line(registration: Any) -> str:
    """``registered as models:/NAME@ALIAS (version 3: why)`` when the alias moved to the new
    version, ``registered as models:/NAME/3; ALIAS stays on version 2: why`` otherwise."""
    name, version = registration.name, registration.version
    if registration.alias:
        where = f"models:/{name}@{registration.alias}"
        return f"registered as {where} (version {version}: {registration.reason})"
    return f"registered as models:/{name}/{version}; {registration.reason}"


STORAGE_WAIT_S = 300.0  # how long run() waits for unreachable checkpoint storage to come back


def _is_storage_failure(err: BaseException) -> bool:
    """Whether a failed fit came from the controller's storage I/O (an OSError inside it)."""
    from ray.train import ControllerError

    return isinstance(err, ControllerError) and isinstance(
        getattr(err, "controller_failure", None), OSError
    )


def _wait_for_storage(filesystem: Any, path: str, timeout: float) -> None:
    """Block until ``path`` can be listed again (or ``timeout`` passes)."""
    import time

    import pyarrow.fs as pafs

    filesystem = filesystem or pafs.LocalFileSystem()
    deadline = time.monotonic() + timeout
    while True:
        try:
            filesystem.get_file_info(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                return  # the next fit reports the storage error itself
            time.sleep(2.0)


def _take_failure(config: TrainConfig, plan: Plan) -> dict[str, Any] | None:
    """The ``failure.json`` the workers left in the run directory (removed), or None."""
    from segplatform.train.loop import FAILURE_FILE, run_file

    fs, path = run_file(plan, FAILURE_FILE, config.storage_options)
    try:
        with fs.open_input_stream(path) as stream:
            record = json.loads(stream.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None
    fs.delete_file(path)
    return record


def run(config: TrainConfig, *, callbacks: Sequence[Any] = ()) -> Any:
    """Train ``config`` on Ray Train; returns the ``ray.train.Result`` (see module docstring).

    ``callbacks`` go to Ray Train's ``RunConfig`` (a sweep passes Tune's ``TuneReportCallback``,
    which turns each report of rank 0 into one Tune result).

    Refused before anything starts (not even Ray): DatasetError, PlanError (ResumeMismatchError
    included); after joining the cluster: ClusterFitError, SharedStorageError. Stopped by the
    workers (bad data, divergence): TrainingFailure.
    """
    info = check_dataset(config)  # fail fast, before Ray starts
    resumes = check_resume(config, info)
    ensure_ray(config)
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from segplatform.train.loop import train_loop_per_worker

    logger.info("placement check passed: %s", check_placement(config))
    storage_path, storage_filesystem, run_uri = storage_for(config)
    plan = build_plan(config, info, run_uri)
    _take_failure(config, plan)  # a stopped earlier attempt's record is not this run's
    from segplatform.train.loop import write_run_file

    recorded = {k: v for k, v in config.to_dict().items() if k != "storage_options"}
    write_run_file(plan, CONFIG_FILE, json.dumps(recorded, indent=1), config.storage_options)
    resources: dict[str, float] | None = config.worker_bundle()
    if config.num_workers == 0:
        resources = None  # local mode: nothing to reserve

    def make_trainer() -> TorchTrainer:
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": config.to_dict(), "plan": plan},
            scaling_config=ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=config.use_gpu,
                resources_per_worker=resources,
                placement_strategy=config.placement_strategy,
            ),
            run_config=RunConfig(
                name=config.name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=config.keep_checkpoints,
                    checkpoint_score_attribute="checkpoint_score",
                    checkpoint_score_order="max",
                ),
                failure_config=FailureConfig(max_failures=config.max_failures),
                # The job log reads like a training log: progress lines, not Ray's set-up.
                logging_config=LoggingConfig(log_level="INFO" if config.verbose else "WARNING"),
                callbacks=list(callbacks),
            ),
        )

    say(
        f"{config.name}: {config.arch}{' (tiny)' if config.tiny else ''} on "
        f"{max(config.num_workers, 1)} worker(s) × batch {config.batch_size}"
        f"{f' × {config.grad_accum} accumulated' if config.grad_accum > 1 else ''}, "
        f"{plan.max_iters} iterations ({plan.iters_per_epoch} per epoch of {plan.train_rows} "
        f"rows), {config.optimizer_settings()}; "
        + (f"resuming from {resumes}; " if resumes else "")
        + f"checkpoints in {run_uri}"
    )
    storage_failures = 0
    while True:
        try:
            result = make_trainer().fit()
            break
        except Exception as err:
            # Ray Train's controller gives up at once when it cannot write its checkpoint
            # bookkeeping to storage (e.g. S3 restarting). The same name resumes the run from
            # its last checkpoint once the storage answers again.
            if _is_storage_failure(err) and storage_failures < config.storage_retries:
                storage_failures += 1
                logger.warning(
                    "checkpoint storage %s failed (%s); waiting for it, then resuming %s "
                    "(retry %d of %d)",
                    config.storage_path,
                    str(err).splitlines()[-1][:200],
                    config.name,
                    storage_failures,
                    config.storage_retries,
                )
                _wait_for_storage(storage_filesystem, storage_path, STORAGE_WAIT_S)
                continue
            if plan.mlflow_uri:
                _driver_tracker(config, plan).finish("FAILED", timeout=30.0)
            raise
        except BaseException:
            if plan.mlflow_uri:
                _driver_tracker(config, plan).finish("FAILED", timeout=30.0)
            raise
    failure = _take_failure(config, plan)
    if failure is not None:
        raise TrainingFailure(failure.get("kind", "stopped"), failure.get("message", ""))
    warning = one_class_warning(plan, config, best_checkpoint(result)[1])
    register_best(config, plan, result, warning)
    if warning:
        say(f"warning: run {config.name}: {warning}")
    return result


def say(line: str) -> None:
    """One line of the run's log on stdout."""
    print(line, flush=True)
