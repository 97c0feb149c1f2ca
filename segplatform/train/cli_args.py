"""The training command line shared by ``segplatform train`` and every ``jobs/train_<arch>.py``.

A job holds a ``JobRecipe`` with two recipes, each a ``TrainConfig`` plus the total batch size
its learning rate was tuned for:

- the paper's (fine-tuning) recipe, used when a pretrained backbone is given
  (``--pretrained-backbone URI``): the papers' learning rates assume ImageNet weights;
- a from-scratch recipe, used otherwise (nothing is downloaded, so a backbone starts random):
  AdamW with warmup, poly decay and gradient clipping, settings that converge from random
  initialisation.

``job_main`` prints which recipe runs and why, parses the same options as ``segplatform train``
over it, scales its learning rate linearly with the run's total batch (``batch_size ×
num_workers × grad_accum``: linearly for SGD, by the square root for AdamW) unless the
learning rate is given (``--lr``, ``--set lr=`` or the
``--config`` file), and calls ``run``.

Optimizer settings are per optimizer: a recipe's SGD ``momentum`` is dropped, with a one-line
note, when another optimizer is chosen (and AdamW's ``betas`` likewise for SGD); the same setting
given explicitly for the wrong optimizer is refused, naming the field.

Precedence: recipe < ``--config FILE.json`` < ``--tiny`` preset < explicit options < ``--set``.
Every value in the ``--config`` file counts as given, like an option.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segplatform.train.config import TrainConfig

__all__ = [
    "TINY_PRESET",
    "JobRecipe",
    "add_train_arguments",
    "build_parser",
    "config_from_args",
    "from_scratch",
    "job_main",
    "job_recipe",
    "run_from_args",
    "scaled_lr",
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
    """One architecture's recipes (module docstring), scaled to the cluster by ``job_main``."""

    config: TrainConfig  # the paper's settings, for a pretrained backbone (batch_size per worker)
    reference_batch: int  # total batch size of the paper, for which config.lr was tuned
    scratch: TrainConfig | None = None  # from-scratch settings; None: the paper's either way
    scratch_reference_batch: int = 8  # total batch for which scratch.lr was tuned
    tiny_overrides: dict[str, Any] = field(default_factory=dict)  # extra --tiny settings
    description: str = ""  # one line for --help (paper and dataset of the recipe)
    scratch_description: str = ""  # one line: what the from-scratch recipe changes and why

    def __post_init__(self) -> None:
        for name in ("reference_batch", "scratch_reference_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"JobRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.scratch is not None and self.scratch.arch != self.config.arch:
            raise ValueError("JobRecipe.scratch must train the same architecture as config")

    def choose(
        self, pretrained: str | None, asked: str | None = None
    ) -> tuple[TrainConfig, int, str]:
        """``(recipe, reference batch, why)``: the ``asked`` one ("paper" or "scratch"), else
        the paper's with a pretrained backbone and the from-scratch one without."""
        if asked == "paper" or (asked is None and pretrained):
            if not pretrained:
                return self.config, self.reference_batch, "paper recipe (--recipe paper)"
            return (
                self.config,
                self.reference_batch,
                f"paper recipe: the backbone starts from {pretrained}",
            )
        if self.scratch is None:
            return self.config, self.reference_batch, "paper recipe (it trains from scratch)"
        if asked == "scratch":
            why = "from-scratch recipe (--recipe scratch)"
        else:
            why = "from-scratch recipe: no --pretrained-backbone given, the backbone starts random"
        if self.scratch_description:
            why += f" ({self.scratch_description})"
        return self.scratch, self.scratch_reference_batch, why


# Each optimizer's own settings (TrainConfig refuses the other optimizer's).
OPTIMIZER_FIELDS = {"momentum": "sgd", "betas": "adamw"}


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


def _optional_float(text: str) -> float | _Unset:
    return NONE if text.lower() == "none" else float(text)


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
                ("--pretrained-backbone",),
                "pretrained_backbone",
                {"metavar": "URI"},
                "ImageNet weights of the backbone (a torchvision state dict, local path or URI); "
                "jobs then use the paper's fine-tuning recipe",
            ),
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
            (("--momentum",), "momentum", {"type": float}, "SGD momentum (SGD only)"),
            (
                ("--betas",),
                "betas",
                {"type": _pair(float), "metavar": "B1,B2"},
                "AdamW betas (AdamW only; default 0.9,0.999)",
            ),
            (("--weight-decay",), "weight_decay", {"type": float}, "weight decay"),
            (("--poly-power",), "poly_power", {"type": float}, "poly lr power (0: constant)"),
            (("--warmup-iters",), "warmup_iters", {"type": int}, "linear warmup iterations"),
            (
                ("--clip-grad-norm",),
                "grad_clip",
                {"type": _optional_float, "metavar": "MAX|none"},
                "clip the global gradient norm to MAX",
            ),
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
                "iterations between resume-only checkpoints (between evaluations, which always "
                "checkpoint): a lost worker costs at most this many iterations",
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
                ("--verbose",),
                "verbose",
                {"action": argparse.BooleanOptionalAction},
                "Ray Train's own INFO logs (worker set-up, checkpoint uploads) in the job log",
            ),
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
    notes: list[str] | None = None,
) -> TrainConfig:
    """The ``TrainConfig`` of parsed options over ``base`` (see the module docstring).

    Invalid values raise ValueError naming the field (or exit through ``parser.error``); what
    was dropped from the recipe is appended to ``notes``.
    """
    try:
        return _config_from_args(args, base, reference_batch, tiny_overrides, notes)
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
    notes: list[str] | None,
) -> TrainConfig:
    data: dict[str, Any] = base.to_dict(secrets=True) if base is not None else {}
    data["name"] = ""  # a recipe's import-time name is not a run name
    explicit: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a JSON object of TrainConfig fields")
        explicit.update(loaded)  # as explicit as an option
    options = {
        name: None if getattr(args, name) is NONE else getattr(args, name)
        for _, group in OPTIONS
        for _, name, _, _ in group
        if getattr(args, name, None) is not None
    }
    pretrained = options.pop("pretrained_backbone", None)
    explicit.update(options)
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
    if pretrained:
        arch_params["pretrained_backbone"] = pretrained
    if arch_params:
        data["arch_params"] = {**(data.get("arch_params") or {}), **arch_params}
    storage_options = _key_values(getattr(args, "storage_option", None), "--storage-option")
    if storage_options:
        data["storage_options"] = {**(data.get("storage_options") or {}), **storage_options}
    optimizer = data.get("optimizer", "sgd")
    for name, owner in OPTIMIZER_FIELDS.items():
        # A recipe's setting of another optimizer is dropped; a given one is refused by
        # TrainConfig, naming the field.
        if data.get(name) is not None and owner != optimizer and name not in explicit:
            if notes is not None:
                notes.append(
                    f"note: the recipe's {name} {data[name]} is {owner.upper()}'s; "
                    f"{optimizer} runs without it"
                )
            data[name] = None
    if base is not None and reference_batch and "lr" not in explicit:
        if optimizer != base.optimizer and notes is not None:
            notes.append(
                f"note: the recipe's lr {base.lr:g} was tuned for {base.optimizer}, not "
                f"{optimizer}; give --lr"
            )
        provisional = TrainConfig.from_dict(data, source="command line")
        workers = max(provisional.num_workers, 1)  # local mode (0) is one loop
        total = provisional.batch_size * workers * provisional.grad_accum
        data["lr"] = scaled_lr(base.lr, total / reference_batch, optimizer)
    return TrainConfig.from_dict(data, source="command line")


def scaled_lr(lr: float, batch_ratio: float, optimizer: str) -> float:
    """The learning rate for ``batch_ratio`` × the recipe's total batch: linear for SGD (Goyal et
    al., "Accurate, Large Minibatch SGD", arXiv:1706.02677), square root for AdamW (Malladi et
    al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022)."""
    return lr * (batch_ratio if optimizer == "sgd" else math.sqrt(batch_ratio))


def from_scratch(paper: TrainConfig, **changes: Any) -> TrainConfig:
    """The from-scratch recipe of an architecture, derived from its paper recipe.

    The papers fine-tune ImageNet backbones with SGD at small learning rates (1e-4 to 1e-2) and
    a 10× rate on new layers. From random initialisation those settings barely move, so the
    from-scratch recipe is AdamW at 1e-3 (tuned for a total batch of 8, square-root scaled),
    weight decay 0.01, poly decay, gradient clipping at norm 1, one learning rate for every
    layer; crop, scale range, losses and schedule length stay the paper's unless ``changes``
    say otherwise.
    """
    settings: dict[str, Any] = {
        "optimizer": "adamw",
        "lr": 1e-3,
        "momentum": None,
        "betas": None,
        "weight_decay": 0.01,
        "poly_power": 0.9,
        "warmup_iters": 0,
        "head_lr_mult": 1.0,
        "grad_clip": 1.0,
    }
    settings.update(changes)
    return paper.replace(**settings)


def run_from_args(config: TrainConfig) -> int:
    """Train ``config`` and print where the results are; the exit status."""
    from segplatform.data.format import DatasetError
    from segplatform.local import ClusterAddressError
    from segplatform.train.placement import ClusterFitError, SharedStorageError
    from segplatform.train.run import (
        PlanError,
        TrainingFailure,
        best_checkpoint,
        run,
        storage_for,
    )

    try:
        result = run(config)
    except (
        DatasetError,
        PlanError,
        ClusterAddressError,
        ClusterFitError,
        SharedStorageError,
    ) as err:
        # Refused before anything started: a message, not a traceback.
        print(f"error: run {config.name} refused: {err}", file=sys.stderr)
        return 2
    except TrainingFailure as err:
        # Stopped by the workers (bad data, divergence): not retried, nothing registered.
        print(f"error: run {config.name} stopped ({err.kind}): {err}", file=sys.stderr)
        return 1
    best, _ = best_checkpoint(result)
    metrics = result.metrics or {}
    _, _, run_uri = storage_for(config)
    print(f"run {config.name}: {metrics.get('step', '?')} iterations, checkpoints in {run_uri}")
    if best is not None:
        print(f"best checkpoint: {best.path}")
    if "val_miou" in metrics:
        print(f"final val mIoU: {metrics['val_miou']:.4f}")
    return 0


def job_recipe(path: str | os.PathLike[str]) -> JobRecipe:
    """The ``RECIPE`` of the job script at ``path`` (``jobs/train_<arch>.py``), which the script's
    ``__main__`` guard keeps from running: how a sweep job starts its trials from a training
    job's recipe."""
    import importlib.util

    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"job_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: not a job script")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RECIPE


def job_main(recipe: JobRecipe, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/train_<arch>.py``: choose the recipe, parse overrides, train."""
    prog = f"jobs/train_{recipe.config.arch}.py"
    scratch = (
        "\nWithout --pretrained-backbone the from-scratch recipe runs: "
        f"{recipe.scratch_description} (lr tuned for a total batch of "
        f"{recipe.scratch_reference_batch})."
        if recipe.scratch is not None
        else ""
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(recipe.description or f"Train {recipe.config.arch}.")
        + f"\nThis is the paper's recipe, for a pretrained backbone (--pretrained-backbone URI); "
        f"its lr is tuned for a total batch of {recipe.reference_batch}."
        + scratch
        + "\nThe learning rate is scaled linearly to batch_size × workers × grad_accum unless "
        "it is given (--lr, --set lr=..., --config).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Example:\n  ray job submit --working-dir . -- python {prog} "
            "--data s3://bucket/voc --workers 8 --gpu --pretrained-backbone s3://bucket/r101.pth\n"
            f"  python {prog} --data ./data/mni152-tissue --tiny --workers 2"
        ),
    )
    add_train_arguments(parser, defaults=recipe.config)
    parser.add_argument(
        "--recipe",
        choices=("paper", "scratch"),
        default=None,
        help="the recipe to start from (default: paper with --pretrained-backbone, else scratch)",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "data", None) is None and not recipe.config.data:
        parser.error("--data is required (a dataset directory or s3:// URI)")
    pretrained = getattr(args, "pretrained_backbone", None) or _pretrained_in(args)
    base, reference_batch, why = recipe.choose(pretrained, args.recipe)
    notes: list[str] = []
    config = config_from_args(
        args,
        base=base,
        reference_batch=reference_batch,
        tiny_overrides=recipe.tiny_overrides,
        parser=parser,
        notes=notes,
    )
    print(f"{prog}: {why}; {config.optimizer_settings()}", flush=True)
    for note in notes:
        print(note, flush=True)
    return run_from_args(config)


def _pretrained_in(args: argparse.Namespace) -> str | None:
    """A pretrained backbone named by ``--arch-param``, ``--set arch_params=`` or ``--config``."""
    arch_params = _key_values(getattr(args, "arch_param", None), "--arch-param")
    explicit = _key_values(getattr(args, "set", None), "--set").get("arch_params") or {}
    from_file: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config) as f:
            loaded = json.load(f)
        from_file = (loaded.get("arch_params") or {}) if isinstance(loaded, dict) else {}
    for source in (arch_params, explicit, from_file):
        if isinstance(source, dict) and source.get("pretrained_backbone"):
            return str(source["pretrained_backbone"])
    return None
