"""``run(config)``: one distributed training run on Ray Train, from the driver's side.

1. Join a Ray cluster (``config.ray_address`` or ``RAY_ADDRESS``), or start a local one, and
   check the request against its alive nodes before anything starts (``check_placement``): a
   placement the nodes cannot hold, or node-local storage on a multi-node cluster, fails at once.
2. Read the dataset manifest and resolve the *plan*: iterations per epoch, ``max_iters``,
   evaluation and checkpoint periods, class weights (median frequency is counted over the train
   split with Ray Data), the fixed validation samples drawn as overlays, the MLflow URI.
3. Build a ``TorchTrainer`` over ``train_loop_per_worker`` with the train/val splits as Ray
   Datasets, checkpoints under ``storage_path/name`` (local or S3 through a pyarrow filesystem),
   the best ``keep_checkpoints`` kept by ``val_miou``, and ``FailureConfig(max_failures)``.
4. ``fit()``. The same ``name`` and ``storage_path`` again resumes from the latest checkpoint.
5. The best checkpoint's model package is logged to the run's MLflow run and, with
   ``register_as``, registered as a model version tagged with the dataset URI, manifest version,
   git commit, Ray run name and ``val_miou``; ``register_alias`` moves to it as ``promote`` says
   (default: only when it scores at least the current holder on the same data). One line on
   stdout says where the alias is.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from segplatform.train.config import TrainConfig

logger = logging.getLogger(__name__)

# Names the commit of the code for the run's ``git_commit`` tag where git cannot tell.
GIT_COMMIT_ENV_VAR = "SEGPLATFORM_GIT_COMMIT"

__all__ = [
    "PlanError",
    "best_checkpoint",
    "build_plan",
    "check_dataset",
    "check_placement",
    "ensure_ray",
    "git_commit",
    "register_best",
    "run",
    "storage_for",
]


def ensure_ray(config: TrainConfig) -> None:
    """Connect to ``config.ray_address`` / ``RAY_ADDRESS``, or start a local Ray (embedded)."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # Embedded default: a local cluster with enough logical CPUs for the workers and Ray Data.
    # Its dashboard (127.0.0.1, a free port) serves the State API that Ray Train's placement-group
    # cleaner polls every second (it warns on every poll without it). A new local cluster has
    # token authentication on unless RAY_AUTH_MODE says otherwise (Ray's default for ray.init).
    from segplatform.services.ray_head import free_port

    needed = math.ceil(max(config.num_workers, 1) * config.resolved_cpus_per_worker()) + 2
    ray.init(
        num_cpus=max(os.cpu_count() or 1, needed),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
    )


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


def _mlflow_uri(config: TrainConfig) -> str | None:
    uri = config.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    # Ray workers run in other directories: make a relative SQLite path absolute.
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return uri


def _overlay_ids(config: TrainConfig) -> list[str]:
    """The first ``overlay_samples`` ids of the validation split (stored order)."""
    if config.overlay_samples == 0:
        return []
    import pyarrow.parquet as pq

    from segplatform.data.format import shard_paths

    fs, paths = shard_paths(config.data, config.val_split, config.storage_options)
    ids: list[str] = []
    for path in paths:
        table = pq.read_table(fs.open_input_file(path), columns=["id"])
        ids.extend(str(v) for v in table.column("id").to_pylist())
        if len(ids) >= config.overlay_samples:
            break
    return ids[: config.overlay_samples]


def class_statistics(config: TrainConfig, num_classes: int, ignore_index: int) -> list[float]:
    """Median-frequency class weights counted over the train split (a Ray Data pass)."""
    import numpy as np

    from segplatform.data.reader import read_ray_dataset
    from segplatform.train.losses import class_pixel_statistics, median_frequency_weights

    def count(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from segplatform.data.reader import decode_mask

        masks = [decode_mask(raw) for raw in batch["mask"]]
        class_pixels, image_pixels = class_pixel_statistics(masks, num_classes, ignore_index)
        return {"class_pixels": class_pixels[None], "image_pixels": image_pixels[None]}

    dataset = read_ray_dataset(
        config.data, config.train_split, config.storage_options, columns=["mask"]
    )
    rows = dataset.map_batches(count, batch_format="numpy").take_all()
    class_pixels = np.sum([row["class_pixels"] for row in rows], axis=0)
    image_pixels = np.sum([row["image_pixels"] for row in rows], axis=0)
    return median_frequency_weights(class_pixels, image_pixels)


def split_dataset(config: TrainConfig, split: str) -> Any:
    """The Ray Dataset of one split; small splits are materialized once in the object store.

    A streamed split starts a new read pipeline every epoch and every evaluation; for a split
    below ``materialize_below_mb`` that start-up costs more than keeping the encoded rows in
    memory.
    """
    from segplatform.data.format import shard_paths
    from segplatform.data.reader import read_ray_dataset

    dataset = read_ray_dataset(config.data, split, config.storage_options)
    fs, paths = shard_paths(config.data, split, config.storage_options)
    size = sum(info.size or 0 for info in fs.get_file_info(paths))
    if size < config.materialize_below_mb * 2**20:
        dataset = dataset.materialize()
    return dataset


class PlanError(ValueError):
    """The config does not fit its dataset (splits, classes, rows, periods): nothing started."""


def check_dataset(config: TrainConfig) -> Any:
    """The dataset's manifest, checked against the config; before anything starts.

    DatasetError when the dataset cannot be read (not a dataset, storage unreachable or
    refusing the credentials), PlanError when the config does not fit it.
    """
    from segplatform.data.format import DatasetError, read_manifest

    if not config.data:
        raise PlanError("TrainConfig.data: a dataset URI is required (e.g. --data DIR|s3://...)")
    try:
        info = read_manifest(config.data, config.storage_options)
    except OSError as err:  # network, credentials, permissions
        raise DatasetError(f"{config.data}: cannot read the dataset manifest: {err}") from err
    for field_name in ("train_split", "val_split"):
        split = getattr(config, field_name)
        if split not in info.splits:
            raise PlanError(
                f"TrainConfig.{field_name}: {config.data} has no split {split!r} "
                f"(splits: {sorted(info.splits)})"
            )
    given = config.arch_params.get("num_classes")
    if given is not None and given != info.num_classes:
        raise PlanError(
            f"TrainConfig.arch_params: num_classes={given} but {config.data} has "
            f"{info.num_classes} classes {list(info.classes)}"
        )
    if isinstance(config.class_weights, (list, tuple)) and len(config.class_weights) != len(
        info.classes
    ):
        raise PlanError(
            f"TrainConfig.class_weights: {len(config.class_weights)} weights for "
            f"{info.num_classes} classes of {config.data}"
        )
    _schedule(config, info)
    return info


def _schedule(config: TrainConfig, info: Any) -> tuple[int, int, int, int]:
    """``(iters_per_epoch, max_iters, eval_every, checkpoint_every)``; PlanError when not even
    one iteration fits the train split or checkpoints would fall between evaluations."""
    rows = info.splits[config.train_split]
    workers = max(config.num_workers, 1)  # local mode (0) runs one loop
    batches_per_worker = rows // workers // config.batch_size
    iters_per_epoch = batches_per_worker // config.grad_accum
    if iters_per_epoch < 1:
        raise PlanError(
            f"{config.data}: split {config.train_split!r} has {rows} rows, too few for "
            f"{workers} workers × batch_size {config.batch_size} × grad_accum "
            f"{config.grad_accum} (one iteration needs "
            f"{workers * config.batch_size * config.grad_accum} rows)"
        )
    max_iters = config.max_iters or config.epochs * iters_per_epoch
    eval_every = config.eval_every or iters_per_epoch
    checkpoint_every = config.checkpoint_every or eval_every
    if checkpoint_every % eval_every:
        raise PlanError(
            f"TrainConfig.checkpoint_every: {checkpoint_every} is not a multiple of the "
            f"evaluation period {eval_every} (eval_every; default: one epoch = "
            f"{iters_per_epoch} iterations)"
        )
    return iters_per_epoch, max_iters, eval_every, checkpoint_every


def build_plan(config: TrainConfig, info: Any = None) -> dict[str, Any]:
    """What every worker needs beyond the config (see the module docstring); ``info``: the
    manifest ``check_dataset`` returned (read and checked here when not given)."""
    info = info if info is not None else check_dataset(config)  # its checks raise PlanError
    num_classes = info.num_classes
    iters_per_epoch, max_iters, eval_every, checkpoint_every = _schedule(config, info)
    class_weights: list[float] | None = None
    if config.class_weights == "median_frequency":
        class_weights = class_statistics(config, num_classes, info.ignore_index)
    elif config.class_weights is not None:
        class_weights = [float(v) for v in config.class_weights]
    _, _, run_uri = storage_for(config)
    mlflow_uri = _mlflow_uri(config)
    return {
        "dataset": info.to_json(),
        "num_classes": num_classes,
        "train_rows": info.splits[config.train_split],
        "iters_per_epoch": iters_per_epoch,
        "max_iters": max_iters,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "class_weights": class_weights,
        "overlay_ids": _overlay_ids(config) if mlflow_uri else [],
        "mlflow_uri": mlflow_uri,
        "run_storage_uri": run_uri,
        "local_mode": config.num_workers == 0,
        # The driver's choice of buffer directory (workers do not share its environment).
        "tracking_buffer": os.environ.get("SEGPLATFORM_TRACKING_BUFFER"),
        "storage_options": config.storage_options,
        "tags": {
            "dataset": config.data,
            "dataset_name": info.name,
            "manifest_version": str(info.version),
            "git_commit": git_commit(),
            "ray_run_name": config.name,
            "architecture": config.arch,
        },
    }


def _driver_tracker(config: TrainConfig, plan: dict[str, Any]) -> Any:
    from segplatform.tracking import RunTracker

    if not plan["mlflow_uri"]:
        return RunTracker.disabled()
    from segplatform.train.loop import tracking_buffer_root

    root = tracking_buffer_root(config.name, plan["tracking_buffer"])
    buffer = root / f"driver-{uuid.uuid4().hex[:8]}"
    return RunTracker(
        plan["mlflow_uri"],
        config.experiment,
        config.name,
        buffer_dir=buffer,
        run_key=config.name,
        tags=plan["tags"],
    )


def best_checkpoint(result: Any) -> tuple[Any, dict[str, Any]]:
    """The checkpoint with the highest ``val_miou`` and its metrics (the last one in local mode)."""
    if not result.best_checkpoints:  # local mode keeps no checkpoint history
        return result.checkpoint, dict(result.metrics or {})
    best = result.get_best_checkpoint("val_miou", "max") or result.checkpoint
    metrics = next((m for c, m in result.best_checkpoints if c.path == best.path), {})
    return best, dict(metrics or {})


def register_best(config: TrainConfig, plan: dict[str, Any], result: Any) -> Any:
    """Log the best checkpoint's model package to MLflow and register it; returns the checkpoint."""
    best, metrics = best_checkpoint(result)
    if best is None or not plan["mlflow_uri"]:
        return best
    tracker = _driver_tracker(config, plan)
    with best.as_directory() as directory:
        tracker.log_artifacts(Path(directory) / "model", "model")
        tracker.set_tags({"best_checkpoint": best.path, "best_step": metrics.get("step", "")})
        if "val_miou" in metrics:
            tracker.log_metrics({"best_val_miou": metrics["val_miou"]}, step=metrics.get("step", 0))
        if config.register_as:
            tags = {k: v for k, v in plan["tags"].items() if k != "architecture"}
            tags["val_miou"] = str(metrics.get("val_miou", ""))
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


def run(config: TrainConfig) -> Any:
    """Train ``config`` on Ray Train; returns the ``ray.train.Result`` (see module docstring).

    Refused before anything starts (not even Ray): DatasetError, PlanError; after joining the
    cluster: ClusterFitError, SharedStorageError.
    """
    info = check_dataset(config)  # fail fast, before Ray starts
    ensure_ray(config)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from segplatform.train.loop import train_loop_per_worker

    logger.info("placement check passed: %s", check_placement(config))
    plan = build_plan(config, info)
    storage_path, storage_filesystem, run_uri = storage_for(config)
    resources: dict[str, float] | None = config.worker_bundle()
    if config.num_workers == 0:
        resources = None  # local mode: nothing to reserve
    datasets = {
        "train": split_dataset(config, config.train_split),
        "val": split_dataset(config, config.val_split),
    }

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
                    checkpoint_score_attribute="val_miou",
                    checkpoint_score_order="max",
                ),
                failure_config=FailureConfig(max_failures=config.max_failures),
            ),
            datasets=datasets,
        )

    logger.info(
        "training %s (%s) on %d worker(s): %d iterations, checkpoints in %s",
        config.name,
        config.arch,
        config.num_workers,
        plan["max_iters"],
        run_uri,
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
            if plan["mlflow_uri"]:
                _driver_tracker(config, plan).finish("FAILED", timeout=30.0)
            raise
        except BaseException:
            if plan["mlflow_uri"]:
                _driver_tracker(config, plan).finish("FAILED", timeout=30.0)
            raise
    register_best(config, plan, result)
    return result
