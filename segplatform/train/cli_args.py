"""The training command line shared by ``segplatform train``, every ``jobs/train_<arch>.py`` and
the sweeps: it parses options into the layers of what was given (a ``--config`` file, the
options, ``--set``) and leaves every recipe decision to ``segplatform.train.recipes``, so each
entry point trains the same run for the same architecture, data and flags.

``--show-recipe`` prints the resolved recipe, each value with where it came from, and exits;
``--recipe paper|scratch`` picks a recipe whatever the backbone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from segplatform.train.config import TrainConfig
from segplatform.train.recipes import Resolved, merge, recipe_for, resolve

__all__ = [
    "add_train_arguments",
    "build_parser",
    "config_from_args",
    "given_layers",
    "job_main",
    "resolve_from_args",
    "run_from_args",
]

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
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument(
        "--recipe",
        choices=("paper", "scratch"),
        default=None,
        help="the recipe to start from (default: paper with --pretrained-backbone, else scratch)",
    )
    recipe.add_argument(
        "--show-recipe",
        action="store_true",
        help="print the resolved recipe, each value with where it came from, and exit",
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
    """The ``TrainConfig`` of parsed options over ``base`` (None: TrainConfig's defaults, no
    recipe), by ``recipes.merge``'s rule.

    Invalid values raise ValueError naming the field (or exit through ``parser.error``); what
    was dropped from the recipe is appended to ``notes``.
    """
    try:
        resolved = merge(
            base,
            given_layers(args),
            reference_batch=reference_batch,
            tiny_overrides=tiny_overrides,
        )
    except ValueError as err:
        if parser is None:
            raise
        parser.error(str(err))
        raise  # unreachable: parser.error exits
    if notes is not None:
        notes.extend(resolved.notes)
    return resolved.config


def resolve_from_args(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser | None = None,
    *,
    arch: str | None = None,
) -> Resolved:
    """The run the parsed options ask for, over the recipe of their architecture (``--arch``,
    the ``--config`` file's, else ``arch``): ``recipes.resolve``."""
    try:
        return resolve(given_layers(args), arch=arch, recipe=getattr(args, "recipe", None))
    except ValueError as err:
        if parser is None:
            raise
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def given_layers(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """What the options give, as ``(source, fields)`` layers in precedence order: the
    ``--config`` file, the options (``--arch-param``, ``--pretrained-backbone`` and
    ``--storage-option`` into their mappings), ``--set``."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if getattr(args, "config", None):
        with open(args.config) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a JSON object of TrainConfig fields")
        layers.append((f"--config {args.config}", loaded))
    options = {
        name: None if getattr(args, name) is NONE else getattr(args, name)
        for _, group in OPTIONS
        for _, name, _, _ in group
        if getattr(args, name, None) is not None
    }
    pretrained = options.pop("pretrained_backbone", None)
    arch_params = _key_values(getattr(args, "arch_param", None), "--arch-param")
    if pretrained:
        arch_params["pretrained_backbone"] = pretrained
    if arch_params:
        options["arch_params"] = arch_params
    storage_options = _key_values(getattr(args, "storage_option", None), "--storage-option")
    if storage_options:
        options["storage_options"] = storage_options
    layers.append(("option", options))
    given = _key_values(getattr(args, "set", None), "--set")
    if given:
        layers.append(("--set", given))
    return layers


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


def job_main(arch: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/train_<arch>.py``: the options of ``segplatform train``, with the
    architecture preset and its recipes described in --help."""
    recipes = recipe_for(arch)
    prog = f"jobs/train_{arch}.py"
    scratch = (
        "\nWithout --pretrained-backbone the from-scratch recipe runs: "
        f"{recipes.scratch_description or 'AdamW, poly decay, gradient clipping'} (lr tuned for "
        f"a total batch of {recipes.scratch_reference_batch})."
        if recipes.scratch is not None
        else ""
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(recipes.description or f"Train {arch}.")
        + f"\nThis is the paper's recipe, for a pretrained backbone (--pretrained-backbone URI); "
        f"its lr is tuned for a total batch of {recipes.reference_batch}."
        + scratch
        + "\nThe learning rate is scaled to batch_size × workers × grad_accum unless "
        "it is given (--lr, --set lr=..., --config). --show-recipe prints the run's recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Example:\n  ray job submit --working-dir . -- python {prog} "
            "--data s3://bucket/voc --workers 8 --gpu --pretrained-backbone s3://bucket/r101.pth\n"
            f"  python {prog} --data ./data/mni152-tissue --tiny --workers 2"
        ),
    )
    add_train_arguments(parser, defaults=recipes.config)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return train_main(args, parser, arch=arch)


def train_main(
    args: argparse.Namespace, parser: argparse.ArgumentParser, *, arch: str | None = None
) -> int:
    """``segplatform train`` and the job scripts: resolve the run, print its recipe line (or
    the whole recipe with --show-recipe), train."""
    resolved = resolve_from_args(args, parser, arch=arch)
    if getattr(args, "show_recipe", False):
        print(resolved.table())
        for note in resolved.notes:
            print(note)
        return 0
    if not resolved.config.data:
        parser.error("--data is required (a dataset directory or s3:// URI)")
    print(resolved.line(), flush=True)
    for note in resolved.notes:
        print(note, flush=True)
    return run_from_args(resolved.config)
