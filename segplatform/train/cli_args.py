"""The training command line shared by ``segplatform train`` and every ``jobs/train_<arch>.py``.

A job holds a ``JobRecipe``: the paper's recipe as a ``TrainConfig`` plus the total batch size the
paper's learning rate was tuned for. ``job_main`` parses the same options as ``segplatform
train`` over that recipe, scales the learning rate linearly with the run's total batch
(``batch_size × num_workers × grad_accum``) unless ``--lr`` is given, and calls ``run``.

Precedence: recipe < ``--config FILE.json`` < ``--tiny`` preset < explicit options < ``--set``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from segplatform.train.config import TrainConfig

__all__ = [
    "TINY_PRESET",
    "JobRecipe",
    "add_train_arguments",
    "build_parser",
    "config_from_args",
    "job_main",
    "run_from_args",
]

# ``--tiny``: the architecture's tiny() config and a run that finishes in seconds on a CPU.
TINY_PRESET: dict[str, Any] = {
    "tiny": True,
    "crop_size": (64, 64),
    "batch_size": 2,
    "grad_accum": 1,
    "max_iters": 2,
    "epochs": None,
    "warmup_iters": 0,
    "eval_every": None,
    "checkpoint_every": None,
    "log_every": 1,
    "keep_checkpoints": 1,
    "ohem_min_kept": 256,
    "amp": None,
}


@dataclass(frozen=True)
class JobRecipe:
    """A paper's training recipe for one architecture, scaled to the cluster by ``job_main``."""

    config: TrainConfig  # the paper's settings (batch_size is per worker)
    reference_batch: int  # total batch size of the paper, for which config.lr was tuned
    tiny_overrides: dict[str, Any] = field(default_factory=dict)  # extra --tiny settings
    description: str = ""  # one line for --help (paper and dataset of the recipe)

    def __post_init__(self) -> None:
        if self.reference_batch < 1:
            raise ValueError(f"JobRecipe.reference_batch must be >= 1, got {self.reference_batch}")


# (flags, TrainConfig field, parser kwargs, help)
_Option = tuple[tuple[str, ...], str, dict[str, Any], str]


def _pair(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> tuple[Any, Any]:
        parts = [p for p in text.replace("x", ",").split(",") if p]
        if len(parts) == 1:
            return (kind(parts[0]), kind(parts[0]))
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected one value or two (A,B), got {text!r}")
        return (kind(parts[0]), kind(parts[1]))

    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _class_weights(text: str) -> str | tuple[float, ...]:
    return text if text == "median_frequency" else _floats(text)


class _Unset:
    """An option given as "none": sets the field to None (None itself means "not given")."""

    def __repr__(self) -> str:
        return "none"


NONE = _Unset()


def _optional_str(text: str) -> str | _Unset:
    return NONE if text.lower() in ("none", "") else text


def _optional_int(text: str) -> int | _Unset:
    return NONE if text.lower() == "none" else int(text)


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _resource_dict(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object such as {"memory": 8e9}')
    return value


def _key_values(pairs: Sequence[str] | None, option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{option}: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = _json_value(value)
    return out


OPTIONS: tuple[tuple[str, tuple[_Option, ...]], ...] = (
    (
        "model",
        (
            (("--arch",), "arch", {}, "architecture registry name"),
            (
                ("--tiny",),
                "tiny",
                {"action": argparse.BooleanOptionalAction},
                "tiny model and a seconds-long CPU run (the architecture's tiny() config)",
            ),
        ),
    ),
    (
        "data",
        (
            (("--data",), "data", {}, "dataset URI: DIR, file://DIR or s3://bucket/prefix"),
            (("--train-split",), "train_split", {}, "split to train on"),
            (("--val-split",), "val_split", {}, "split to evaluate on"),
            (
                ("--crop-size",),
                "crop_size",
                {"type": _pair(int), "metavar": "H[,W]"},
                "training crop",
            ),
            (
                ("--scale-range",),
                "scale_range",
                {"type": _pair(float), "metavar": "LOW,HIGH"},
                "random rescale range",
            ),
            (
                ("--hflip",),
                "hflip",
                {"action": argparse.BooleanOptionalAction},
                "random horizontal flip",
            ),
            (("--color-jitter",), "color_jitter", {"type": float}, "colour jitter strength"),
        ),
    ),
    (
        "optimisation",
        (
            (("--batch-size",), "batch_size", {"type": int}, "images per worker per step"),
            (("--grad-accum",), "grad_accum", {"type": int}, "micro-batches per step"),
            (("--max-iters",), "max_iters", {"type": int}, "optimizer steps"),
            (("--epochs",), "epochs", {"type": int}, "epochs (instead of --max-iters)"),
            (("--optimizer",), "optimizer", {"choices": ("sgd", "adamw")}, "optimizer"),
            (("--lr",), "lr", {"type": float}, "base learning rate (not rescaled when given)"),
            (("--momentum",), "momentum", {"type": float}, "SGD momentum / AdamW beta1"),
            (("--weight-decay",), "weight_decay", {"type": float}, "weight decay"),
            (("--poly-power",), "poly_power", {"type": float}, "poly lr power (0: constant)"),
            (("--warmup-iters",), "warmup_iters", {"type": int}, "linear warmup iterations"),
            (
                ("--head-lr-mult",),
                "head_lr_mult",
                {"type": float},
                "lr multiplier of non-backbone parameters",
            ),
            (("--loss",), "loss", {"choices": ("ce", "ohem", "dice", "ce+dice")}, "pixel loss"),
            (
                ("--class-weights",),
                "class_weights",
                {"type": _class_weights},
                "median_frequency or comma-separated weights",
            ),
            (
                ("--border-weights",),
                "border_weights",
                {"action": argparse.BooleanOptionalAction},
                "U-Net border weight map (eq. 2)",
            ),
            (
                ("--amp",),
                "amp",
                {"type": _optional_str, "metavar": "{bf16,fp16,none}"},
                "autocast dtype",
            ),
            (
                ("--channels-last",),
                "channels_last",
                {"action": argparse.BooleanOptionalAction},
                "NHWC memory format for weights and images (default: on with --gpu)",
            ),
        ),
    ),
    (
        "cluster",
        (
            (
                ("--workers",),
                "num_workers",
                {"type": int},
                "Ray Train workers (0: local mode, the loop runs in this process)",
            ),
            (
                ("--gpu",),
                "use_gpu",
                {"action": argparse.BooleanOptionalAction},
                "one GPU per worker",
            ),
            (
                ("--cpus-per-worker",),
                "cpus_per_worker",
                {"type": float},
                "CPUs per worker (default 0.5 on CPU, 4 with a GPU)",
            ),
            (
                ("--placement", "--placement-strategy"),
                "placement_strategy",
                {"choices": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")},
                "worker placement: PACK (few nodes), SPREAD, STRICT_SPREAD (one worker per "
                "node), STRICT_PACK (one node)",
            ),
            (
                ("--worker-resources",),
                "worker_resources",
                {"type": _resource_dict, "metavar": "JSON"},
                "extra Ray resources per worker, e.g. '{\"memory\": 8e9}'",
            ),
            (
                ("--check-cluster",),
                "check_cluster",
                {"action": argparse.BooleanOptionalAction},
                "refuse at once a placement the alive nodes cannot hold (off: autoscaling "
                "clusters whose nodes join later)",
            ),
            (
                ("--shared-local-storage",),
                "shared_local_storage",
                {"action": argparse.BooleanOptionalAction},
                "local --storage/--data paths are mounted on every node (NFS); otherwise refused "
                "on a multi-node cluster",
            ),
            (("--ray-address",), "ray_address", {}, "Ray cluster (default: RAY_ADDRESS or local)"),
            (
                ("--max-failures",),
                "max_failures",
                {"type": int},
                "worker-group restarts from the last checkpoint",
            ),
        ),
    ),
    (
        "run",
        (
            (("--storage",), "storage_path", {}, "checkpoint root: DIR or s3://bucket/prefix"),
            (("--name",), "name", {}, "run name (the same name resumes; default <arch>-<time>)"),
            (
                ("--eval-every",),
                "eval_every",
                {"type": _optional_int},
                "iterations between evaluations (none: once per epoch)",
            ),
            (
                ("--checkpoint-every",),
                "checkpoint_every",
                {"type": _optional_int},
                "iterations between checkpoints (multiple of --eval-every)",
            ),
            (
                ("--keep-checkpoints",),
                "keep_checkpoints",
                {"type": int},
                "checkpoints kept (best val mIoU)",
            ),
            (("--log-every",), "log_every", {"type": int}, "iterations between metric reports"),
            (("--seed",), "seed", {"type": int}, "random seed"),
            (
                ("--mlflow-uri",),
                "mlflow_uri",
                {},
                "MLflow tracking URI (default MLFLOW_TRACKING_URI)",
            ),
            (("--experiment",), "experiment", {}, "MLflow experiment"),
            (("--register-as",), "register_as", {}, "register the best model under this name"),
            (
                ("--promote",),
                "promote",
                {"choices": ("if_better", "always", "never")},
                "move the alias (champion) to the new version: if_better = its val mIoU is at "
                "least the current holder's on the same dataset",
            ),
        ),
    ),
)


def add_train_arguments(
    parser: argparse.ArgumentParser, *, defaults: TrainConfig | None = None
) -> None:
    """Add the training options to ``parser``; an option not given is absent from the result."""
    shown = defaults.to_dict() if defaults is not None else {}
    for title, options in OPTIONS:
        group = parser.add_argument_group(title)
        for flags, name, kwargs, text in options:
            if name in shown and shown[name] not in (None, "", {}) and name != "name":
                value = shown[name]
                value = ",".join(str(v) for v in value) if isinstance(value, list) else value
                text = f"{text} (default: {value})"
            group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=text, **kwargs)
    extra = parser.add_argument_group("more")
    extra.add_argument(
        "--arch-param",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="architecture config field, JSON value (repeatable), e.g. output_stride=8",
    )
    extra.add_argument(
        "--storage-option",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="S3 option endpoint_url/key/secret/region (default: the AWS_* variables)",
    )
    extra.add_argument(
        "--set",
        action="append",
        default=argparse.SUPPRESS,
        metavar="FIELD=VALUE",
        help="any TrainConfig field, JSON value (repeatable), e.g. eval_recipe='{\"flip\": true}'",
    )
    extra.add_argument(
        "--config", metavar="FILE.json", default=argparse.SUPPRESS, help="TrainConfig as JSON"
    )


def build_parser(
    prog: str = "segplatform train", *, defaults: TrainConfig | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a segmentation model on Ray Train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser, defaults=defaults)
    return parser


def config_from_args(
    args: argparse.Namespace,
    *,
    base: TrainConfig | None = None,
    reference_batch: int | None = None,
    tiny_overrides: dict[str, Any] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> TrainConfig:
    """The ``TrainConfig`` of parsed options over ``base`` (see the module docstring).

    Invalid values raise ValueError naming the field (or exit through ``parser.error``).
    """
    try:
        return _config_from_args(args, base, reference_batch, tiny_overrides)
    except ValueError as err:
        if parser is None:
            raise
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def _config_from_args(
    args: argparse.Namespace,
    base: TrainConfig | None,
    reference_batch: int | None,
    tiny_overrides: dict[str, Any] | None,
) -> TrainConfig:
    data: dict[str, Any] = base.to_dict() if base is not None else {}
    data["name"] = ""  # a recipe's import-time name is not a run name
    if getattr(args, "config", None):
        with open(args.config) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a JSON object of TrainConfig fields")
        data.update(loaded)
    explicit = {
        name: None if getattr(args, name) is NONE else getattr(args, name)
        for _, options in OPTIONS
        for _, name, _, _ in options
        if getattr(args, name, None) is not None
    }
    explicit.update(_key_values(getattr(args, "set", None), "--set"))
    if explicit.get("tiny"):
        data.update(TINY_PRESET)
        data.update(tiny_overrides or {})
    if "epochs" in explicit and "max_iters" not in explicit:
        data["max_iters"] = None
    if "max_iters" in explicit and "epochs" not in explicit:
        data["epochs"] = None
    data.update(explicit)
    arch_params = _key_values(getattr(args, "arch_param", None), "--arch-param")
    if arch_params:
        data["arch_params"] = {**(data.get("arch_params") or {}), **arch_params}
    storage_options = _key_values(getattr(args, "storage_option", None), "--storage-option")
    if storage_options:
        data["storage_options"] = {**(data.get("storage_options") or {}), **storage_options}
    if base is not None and reference_batch and "lr" not in explicit:
        provisional = TrainConfig.from_dict(data, source="command line")
        workers = max(provisional.num_workers, 1)  # local mode (0) is one loop
        total = provisional.batch_size * workers * provisional.grad_accum
        data["lr"] = base.lr * total / reference_batch
    return TrainConfig.from_dict(data, source="command line")


def run_from_args(config: TrainConfig) -> int:
    """Train ``config`` and print where the results are; the exit status."""
    from segplatform.data.format import DatasetError
    from segplatform.train.placement import ClusterFitError, SharedStorageError
    from segplatform.train.run import PlanError, best_checkpoint, run, storage_for

    try:
        result = run(config)
    except (DatasetError, PlanError, ClusterFitError, SharedStorageError) as err:
        # Refused before anything started: a message, not a traceback.
        print(f"error: run {config.name} refused: {err}", file=sys.stderr)
        return 2
    best, _ = best_checkpoint(result)
    metrics = result.metrics or {}
    _, _, run_uri = storage_for(config)
    print(f"run {config.name}: {metrics.get('step', '?')} iterations, checkpoints in {run_uri}")
    if best is not None:
        print(f"best checkpoint: {best.path}")
    if "val_miou" in metrics:
        print(f"final val mIoU: {metrics['val_miou']:.4f}")
    return 0


def job_main(recipe: JobRecipe, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/train_<arch>.py``: parse overrides over ``recipe`` and train."""
    prog = f"jobs/train_{recipe.config.arch}.py"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(recipe.description or f"Train {recipe.config.arch}.")
        + f"\nThe learning rate is scaled linearly from the paper's total batch of "
        f"{recipe.reference_batch} to batch_size × workers × grad_accum unless --lr is given.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Example:\n  ray job submit --working-dir . -- python {prog} "
            "--data s3://bucket/voc --workers 8 --gpu\n"
            f"  python {prog} --data ./data/mni152-tissue --tiny --workers 2"
        ),
    )
    add_train_arguments(parser, defaults=recipe.config)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "data", None) is None and not recipe.config.data:
        parser.error("--data is required (a dataset directory or s3:// URI)")
    config = config_from_args(
        args,
        base=recipe.config,
        reference_batch=recipe.reference_batch,
        tiny_overrides=recipe.tiny_overrides,
        parser=parser,
    )
    return run_from_args(config)
