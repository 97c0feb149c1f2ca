"""``segplatform sweep``: a hyperparameter sweep with Ray Tune (``segplatform.tune.cli``)."""

from __future__ import annotations

import argparse


def _sweep(args: argparse.Namespace) -> int:
    from segplatform.tune.cli import run_from_sweep_args

    return run_from_sweep_args(args, args.parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    from segplatform.cli import HelpFormatter
    from segplatform.train.cli_args import add_train_arguments
    from segplatform.tune.cli import add_sweep_arguments, epilog

    parser = subparsers.add_parser(
        "sweep",
        help="search hyperparameters with Ray Tune (ASHA on val mIoU), register the best model",
        formatter_class=HelpFormatter,
        description="Search hyperparameters of one architecture with Ray Tune: each trial is "
        "one training run with the options of segplatform train (TrainConfig defaults), "
        "varied by a search space (a JSON/YAML file or a preset named after an architecture: "
        "deeplab_v2, deeplab_v3, pspnet, icnet, refinenet). ASHA stops poor trials early; one "
        "MLflow parent run per sweep with a child run per trial, a results table and figure on "
        "the parent; --register-as registers the best trial's best checkpoint. The same --name "
        "resumes an interrupted sweep.",
        epilog=epilog("segplatform sweep", None),
    )
    add_train_arguments(parser)
    add_sweep_arguments(parser, default_space=None)
    parser.set_defaults(func=_sweep, parser=parser)
