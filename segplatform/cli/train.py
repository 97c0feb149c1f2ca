"""``segplatform train``: one distributed training run (the options of ``jobs/train_<arch>.py``)."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from segplatform.train.cli_args import train_main

    return train_main(args, args.parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    from segplatform.cli import HelpFormatter
    from segplatform.train.cli_args import add_train_arguments

    parser = subparsers.add_parser(
        "train",
        help="train a model on Ray Train (local Ray, or RAY_ADDRESS / --ray-address)",
        formatter_class=HelpFormatter,
        description="Train a segmentation architecture on a dataset with Ray Train: data-parallel "
        "workers, evaluation on the validation split, checkpoints (best k by val mIoU) under "
        "--storage/NAME, resume with the same --name, MLflow tracking with --mlflow-uri. The run "
        "starts from the architecture's recipe, as jobs/train_<arch>.py does: the paper's with "
        "--pretrained-backbone, else the from-scratch one; --show-recipe prints it.",
        epilog="Examples:\n"
        "  segplatform train --arch unet --tiny --data data/mni152-tissue --workers 2 "
        "--max-iters 50\n"
        "  segplatform train --arch deeplab_v3 --data s3://bucket/voc --show-recipe\n"
        "  segplatform train --arch deeplab_v3 --data s3://bucket/voc --workers 8 --gpu "
        "--storage s3://bucket/runs --name dlv3-voc --mlflow-uri http://127.0.0.1:5000\n",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=_train, parser=parser)
