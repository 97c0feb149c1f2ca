"""``segplatform evaluate`` and ``segplatform predict``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segplatform.cli import HelpFormatter, image_size


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference recipe (defaults: the model package's)")
    group.add_argument("--slide", action="store_true", help="sliding-window inference")
    group.add_argument("--crop", type=image_size, help="window size HxW for --slide")
    group.add_argument(
        "--stride", type=image_size, help="window stride HxW (default 2/3 of --crop)"
    )
    group.add_argument("--flip", action="store_true", help="add horizontally flipped predictions")
    group.add_argument(
        "--scales", type=float, nargs="+", help="multi-scale factors, e.g. 0.75 1 1.25"
    )
    group.add_argument("--crf", action="store_true", help="dense CRF post-processing (crf extra)")
    group.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def _recipe_overrides(args: argparse.Namespace) -> dict:
    overrides = {
        "mode": "slide" if args.slide else None,
        "crop_size": args.crop,
        "stride": args.stride,
        "flip": True if args.flip else None,
        "scales": tuple(args.scales) if args.scales else None,
        "crf": True if args.crf else None,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def _evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from segplatform.data.format import read_manifest
    from segplatform.evaluate import evaluate_model, result_json
    from segplatform.metrics import format_table

    info = read_manifest(args.data)
    total = info.splits.get(args.split)
    if total is None:
        print(
            f"error: {args.data} has no split {args.split!r} ({', '.join(info.splits)})",
            file=sys.stderr,
        )
        return 2
    if args.limit:
        total = min(total, args.limit)
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=args.quiet) as progress:
        task = progress.add_task(f"evaluating {args.split}", total=total)

        class _Advance:
            def advance(self) -> None:
                progress.advance(task)

        result = evaluate_model(
            args.model,
            args.data,
            split=args.split,
            recipe_overrides=_recipe_overrides(args),
            limit=args.limit,
            device=args.device,
            progress=_Advance(),
        )
    text = result_json(result)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.json == "-":
        print(text)
    else:
        print(format_table(result, result["classes"]))
        if args.json:
            print(f"wrote {args.json}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from segplatform.evaluate import predict_files

    written = predict_files(
        args.model,
        args.images,
        args.out,
        recipe_overrides=_recipe_overrides(args),
        device=args.device,
    )
    for item in written:
        print(f"{item['image']} -> {item['mask']}, {item['overlay']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:

    evaluate = subparsers.add_parser(
        "evaluate",
        help="metrics of a model package on a dataset split",
        formatter_class=HelpFormatter,
        description="Evaluate a model (package path, s3:// URI or models:/NAME@ALIAS) on a "
        "dataset split: pixel accuracy, mean accuracy, mean IoU, frequency-weighted IoU and "
        "per-class IoU, over one confusion matrix for the whole split (FCN §5).",
        epilog="Example:\n  segplatform evaluate --model models:/unet@champion "
        "--data data/mni152-tissue --flip --json metrics.json\n",
    )
    evaluate.add_argument("--model", required=True, help="model package path/URI")
    evaluate.add_argument("--data", required=True, help="dataset URI (path, file://, s3://)")
    evaluate.add_argument("--split", default="val", help="dataset split")
    evaluate.add_argument("--limit", type=int, help="evaluate at most this many images")
    evaluate.add_argument("--json", help="write the result as JSON to this file ('-' = stdout)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_recipe_options(evaluate)
    evaluate.set_defaults(func=_evaluate)

    predict = subparsers.add_parser(
        "predict",
        help="masks and overlays for image files",
        formatter_class=HelpFormatter,
        description="Segment image files with a model package; writes NAME_mask.png (palette "
        "PNG of class ids) and NAME_overlay.png per image.",
        epilog="Example:\n  segplatform predict --model ./runs/best/model scan1.png scan2.png "
        "--out predictions/\n",
    )
    predict.add_argument("--model", required=True, help="model package path/URI")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", required=True, help="output directory")
    _add_recipe_options(predict)
    predict.set_defaults(func=_predict)
