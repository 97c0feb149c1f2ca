"""``segplatform quickstart``: the main job on one machine (what ``make run`` runs)."""

from __future__ import annotations

import argparse


def _quickstart(args: argparse.Namespace) -> int:
    from segplatform.quickstart import run_quickstart

    result = run_quickstart(
        args.workdir, max_iters=args.iters, workers=args.workers, verbose=args.verbose
    )
    print(f"dataset:         {result.dataset}")
    print(f"checkpoints:     {result.run_dir}")
    print(f"MLflow:          {result.tracking_uri}  (mlflow ui --backend-store-uri ...)")
    print(f"registered:      {result.model_uri}")
    print(f"val mIoU:        {result.val_miou:.3f} (majority-class {result.majority_miou:.3f})")
    print(f"overlay image:   {result.overlay}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from segplatform.cli import HelpFormatter

    parser = subparsers.add_parser(
        "quickstart",
        help="the main job on this machine: built-in data, Ray Train, MLflow, predictions",
        formatter_class=HelpFormatter,
        description="Build the built-in mni152-tissue dataset, train a U-Net with Ray "
        "Train workers on a local Ray cluster, track it in MLflow on SQLite, register the best "
        "model, evaluate it from the registry and write an overlay image.",
        epilog="Example:\n  segplatform quickstart --workdir . --iters 150\n",
    )
    parser.add_argument("--workdir", default=".", help="where data/, runs/, mlflow.db go")
    parser.add_argument("--iters", type=int, default=150, help="training iterations")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument(
        "--verbose", action="store_true", help="Ray Train's own INFO logs in the output"
    )
    parser.set_defaults(func=_quickstart)
