"""The *plan*: what the driver resolves for a run before any worker starts.

``check_dataset`` reads the manifest and checks the config against it (splits, classes, rows,
periods) before Ray starts; ``build_plan`` adds what the workers need beyond the config: the
schedule in iterations, class weights, the splits' indexes from their shards' footers
(``segplatform.data.shards``: the rows are read where they are decoded), where the run's storage
and MLflow are, its provenance tags, and the *resume fingerprint*.

Resume fingerprint: the settings that shape the model and the schedule (architecture and its
resolved config, class count, optimizer settings, learning-rate schedule, ``max_iters``, total
batch, seed). Every checkpoint stores it (``fingerprint.json``); a run that would resume from a
checkpoint with another fingerprint is refused before it starts, naming the fields that differ
(``ResumeMismatchError``): resuming under a changed schedule or model would train something that
is neither run.

Secrets: the storage options (S3 keys) go to the workers as a Ray object reference
(``Plan.storage_ref``), not inside the train loop config, so Ray's run state never holds them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from segplatform.train.config import TrainConfig

__all__ = [
    "FINGERPRINT_FILE",
    "Plan",
    "PlanError",
    "ResumeMismatchError",
    "check_dataset",
    "compare_fingerprints",
    "mlflow_uri",
    "resume_fingerprint",
    "schedule",
]

FINGERPRINT_FILE = "fingerprint.json"


class PlanError(ValueError):
    """The config does not fit its dataset (splits, classes, rows, periods): nothing started."""


class ResumeMismatchError(PlanError):
    """The run's latest checkpoint was written under another model or schedule."""


@dataclass(frozen=True)
class Plan:
    """What every worker needs beyond the config (see the module docstring)."""

    dataset: dict[str, Any]  # the manifest (DatasetInfo.to_json())
    num_classes: int
    train_rows: int  # rows of the train split
    iters_per_epoch: int  # optimizer steps per pass over the train split
    max_iters: int
    eval_every: int  # iterations between evaluations (each writes a checkpoint)
    checkpoint_every: int | None  # iterations between resume-only checkpoints
    fingerprint: dict[str, Any]  # resume fingerprint (module docstring)
    run_storage_uri: str  # <storage_path>/<name>
    mlflow_uri: str | None
    tracking_buffer: str | None  # the driver's SEGPLATFORM_TRACKING_BUFFER
    class_weights: list[float] | None = None
    overlay_count: int = 0  # the first rows of the val split drawn as overlays
    local_mode: bool = False  # num_workers == 0: the loop runs in the driver
    tags: dict[str, str] = field(default_factory=dict)  # provenance tags of the MLflow run
    train: Any = None  # SplitIndex of the train split (segplatform.data.shards)
    val: Any = None  # SplitIndex of the val split
    storage_ref: Any = None  # ray.ObjectRef of the storage options (credentials), or None

    def storage_options(self) -> dict[str, Any] | None:
        """The storage options with their credentials (resolved from the object store)."""
        if self.storage_ref is None:
            return None
        import ray

        return ray.get(self.storage_ref)


def mlflow_uri(config: TrainConfig) -> str | None:
    """``config.mlflow_uri`` or ``MLFLOW_TRACKING_URI``; a relative SQLite path made absolute
    (Ray workers run in other directories)."""
    uri = config.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return uri


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
    if info.splits[config.val_split] < 1:
        raise PlanError(f"TrainConfig.val_split: {config.data} split {config.val_split!r} is empty")
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
    schedule(config, info)
    return info


def schedule(config: TrainConfig, info: Any) -> tuple[int, int, int]:
    """``(iters_per_epoch, max_iters, eval_every)``; PlanError when not even one iteration fits
    the train split."""
    rows = info.splits[config.train_split]
    workers = max(config.num_workers, 1)  # local mode (0) runs one loop
    total_batch = workers * config.batch_size * config.grad_accum
    iters_per_epoch = rows // total_batch
    if iters_per_epoch < 1:
        raise PlanError(
            f"{config.data}: split {config.train_split!r} has {rows} rows, too few for "
            f"{workers} workers × batch_size {config.batch_size} × grad_accum "
            f"{config.grad_accum} (one iteration needs {total_batch} rows)"
        )
    max_iters = config.max_iters or config.epochs * iters_per_epoch
    eval_every = config.eval_every or iters_per_epoch
    return iters_per_epoch, max_iters, eval_every


def resume_fingerprint(config: TrainConfig, num_classes: int, max_iters: int) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (module docstring)."""
    import architectures

    model = architectures.config_to_dict(config.model_config(num_classes=num_classes))
    model.pop("pretrained_backbone", None)  # where the initial weights came from: not the model
    optimizer: dict[str, Any] = {"optimizer": config.optimizer}
    if config.optimizer == "adamw":
        optimizer["betas"] = list(config.resolved_betas())
    else:
        optimizer["momentum"] = config.resolved_momentum()
    fingerprint = {
        "arch": config.arch,
        "model": model,
        **optimizer,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "head_lr_mult": config.head_lr_mult,
        "poly_power": config.poly_power,
        "warmup_iters": config.warmup_iters,
        "warmup_factor": config.warmup_factor,
        "max_iters": max_iters,
        "total_batch": max(config.num_workers, 1) * config.batch_size * config.grad_accum,
        "seed": config.seed,
    }
    return json.loads(json.dumps(fingerprint))  # JSON types: what a checkpoint gives back


def compare_fingerprints(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: stored -> current`` for every setting that differs (model fields flattened)."""

    def flat(values: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in values.items() if k != "model"}
        out.update({f"model.{k}": v for k, v in (values.get("model") or {}).items()})
        return out

    old, new = flat(stored), flat(current)
    return [
        f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
