"""The sweep command line shared by ``segplatform sweep`` and every ``jobs/sweep_<arch>.py``.

The training options are those of ``segplatform train`` and the job scripts
(``segplatform.train.cli_args``): they set what every trial shares (``--data``, ``--tiny``,
``--workers``, ``--max-iters``, ``--eval-every``, ``--storage``, ``--mlflow-uri``,
``--experiment``, ...); ``--name`` names the sweep, and ``--register-as`` / ``--promote``
register the sweep's winner. The sweep's own options choose the space, the number of trials, the
search, the scheduler and the concurrency.

The trials start from the run ``segplatform train`` would resolve for the same options
(``segplatform.train.recipes``: from scratch, or the paper's recipe with a pretrained backbone);
a job script presets its architecture, whose preset space (``segplatform.tune.presets``) is the
default.

Exit status: 0 when the sweep ran (and registered, if asked), 1 when no trial produced an
evaluation, 2 when the sweep was refused before any trial started (a bad space, options, data or
cluster fit), with one ``error: sweep NAME refused: ...`` line, 130 when it was interrupted
(Ctrl-C) before its trials ended (``--resume`` continues it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["add_sweep_arguments", "config_from_sweep_args", "sweep_main"]


def add_sweep_arguments(parser: argparse.ArgumentParser, *, default_space: str | None) -> None:
    """The sweep's own options (``default_space``: shown in --help; None = the arch's preset)."""
    from segplatform.tune.schedulers import SCHEDULERS
    from segplatform.tune.sweep import SEARCHES

    group = parser.add_argument_group("sweep")
    group.add_argument(
        "--space",
        metavar="FILE|PRESET",
        help="search space: a JSON/YAML file, or a preset named after an architecture "
        f"(default: {default_space or 'the preset of --arch'})",
    )
    group.add_argument("--show-space", action="store_true", help="print the space as YAML and exit")
    group.add_argument("--trials", type=int, help="trials (random search; default 8)")
    group.add_argument(
        "--search", choices=SEARCHES, default="random", help="random sampling or a full grid"
    )
    group.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="asha",
        help="ASHA stops poor trials early; PBT clones good ones; none runs every trial",
    )
    group.add_argument(
        "--grace-period",
        type=int,
        metavar="ITERS",
        help="ASHA: iterations before a trial can be stopped (default: the first evaluation)",
    )
    group.add_argument(
        "--reduction-factor", type=float, default=2.0, help="ASHA: keep the top 1/F at each rung"
    )
    group.add_argument(
        "--perturbation-interval",
        type=int,
        metavar="ITERS",
        help="PBT: iterations between exploits (default: two evaluations)",
    )
    group.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="trials at once (default: as many as the cluster's free resources hold)",
    )
    group.add_argument(
        "--sweep-seed", type=int, help="random search seed (default: the trials' --seed)"
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="restore the interrupted sweep --name (the same --name alone also resumes it)",
    )


def epilog(prog: str, arch: str | None) -> str:
    """The examples of ``--help``."""
    run = f"python {prog}" if prog.endswith(".py") else prog
    job = prog if prog.endswith(".py") else "jobs/sweep_deeplab_v3.py"
    options = "" if arch else " --arch deeplab_v3 --space deeplab_v3"
    model = f"{arch or 'deeplab_v3'}-sweep"
    return (
        "Examples:\n"
        f"  {run}{options} --data data/mni152-tissue --tiny --trials 4 --max-iters 8 "
        f"--eval-every 2 --mlflow-uri sqlite:///mlflow.db --register-as {model}\n"
        f"  ray job submit --working-dir . -- python {job} --data s3://bucket/voc "
        "--storage s3://bucket/runs --workers 4 --gpu --trials 16 --name voc-sweep\n"
        f"  {run}{options} ... --name voc-sweep --resume   # the same options: continues it\n"
    )


def config_from_sweep_args(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    arch: str | None = None,
    default_space: str | Mapping[str, Any] | None = None,
) -> Any:
    """The ``SweepConfig`` of parsed options (``parser.error`` on a malformed option): the
    trials start from the run ``segplatform train`` would resolve for the same options."""
    from segplatform.train.cli_args import resolve_from_args
    from segplatform.tune.space import load_space
    from segplatform.tune.sweep import SweepConfig

    resolved = resolve_from_args(args, parser, arch=arch)
    base = resolved.config
    notes = [resolved.line(), *resolved.notes]
    space = load_space(args.space or default_space or base.arch, base.arch)
    name = getattr(args, "name", None) or default_sweep_name(base.arch)
    if args.resume and not getattr(args, "name", None):
        parser.error("--resume needs --name (the sweep to restore)")
    for note in notes:
        print(note, flush=True)
    return SweepConfig(
        base=base,
        space=space,
        name=name,
        trials=args.trials,
        search=args.search,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        perturbation_interval=args.perturbation_interval,
        max_concurrent=args.max_concurrent,
        resume=args.resume,
        seed=args.sweep_seed,
    )


def default_sweep_name(arch: str) -> str:
    """``<arch>-sweep-<UTC time>``."""
    return f"{arch}-sweep-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"


def build_parser(
    prog: str, *, arch: str | None = None, default_space: str | None = None
) -> argparse.ArgumentParser:
    """The parser of a sweep command (``arch``: fixed by a job script)."""
    from segplatform.train.cli_args import add_train_arguments
    from segplatform.train.recipes import recipe_for

    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Search hyperparameters with Ray Tune: each trial is one training run (the "
            "options and recipe of segplatform train), ranked by validation mIoU; ASHA stops "
            "poor trials early. One MLflow parent run per sweep with a child run per trial, a "
            "results table and figure on the parent; --register-as registers the best trial's "
            "best checkpoint. The same --name resumes an interrupted sweep."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog(prog, arch),
    )
    add_train_arguments(parser, defaults=recipe_for(arch).config if arch else None)
    add_sweep_arguments(parser, default_space=default_space)
    return parser


def sweep_main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "segplatform sweep",
    arch: str | None = None,
    default_space: str | Mapping[str, Any] | None = None,
) -> int:
    """Entry point of ``segplatform sweep`` and ``jobs/sweep_<arch>.py`` (``arch`` preset; the
    space defaults to the architecture's preset); the exit status."""
    shown = default_space if isinstance(default_space, str) else None
    parser = build_parser(prog, arch=arch, default_space=shown)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_from_sweep_args(args, parser, arch=arch, default_space=default_space)


def run_from_sweep_args(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    arch: str | None = None,
    default_space: str | Mapping[str, Any] | None = None,
) -> int:
    from segplatform.data.format import DatasetError
    from segplatform.train.placement import ClusterFitError, SharedStorageError
    from segplatform.train.plan import PlanError
    from segplatform.tune.space import SpaceError
    from segplatform.tune.sweep import SweepError, SweepInterrupted, print_summary, run_sweep

    if arch is None and not getattr(args, "arch", None):
        parser.error("--arch is required (the architecture every trial trains)")
    if not getattr(args, "data", None) and not args.show_space and not args.show_recipe:
        parser.error("--data is required (a dataset directory or s3:// URI)")
    name = getattr(args, "name", None) or "(new)"
    try:
        if args.show_recipe:
            from segplatform.train.cli_args import resolve_from_args

            print(resolve_from_args(args, parser, arch=arch).table())
            return 0
        sweep = config_from_sweep_args(args, parser, arch=arch, default_space=default_space)
        if args.show_space:
            import yaml

            print(
                yaml.safe_dump(sweep.space.to_dict(), sort_keys=False, default_flow_style=None),
                end="",
            )
            return 0
        name = sweep.name
        result = run_sweep(sweep)
    except (
        SpaceError,
        SweepError,
        DatasetError,
        PlanError,
        ClusterFitError,
        SharedStorageError,
    ) as err:
        print(f"error: sweep {name} refused: {err}", file=sys.stderr, flush=True)
        return 2
    except ValueError as err:  # a trial setting TrainConfig refuses
        print(f"error: sweep {name} refused: {err}", file=sys.stderr, flush=True)
        return 2
    except SweepInterrupted as err:
        print(str(err), file=sys.stderr, flush=True)
        return 130
    print_summary(result)
    return 0 if result.best is not None else 1
