"""``segplatform export``: a model package as ONNX or ``torch.export`` with dynamic H and W."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from segplatform.cli import HelpFormatter, image_size

_EPILOG = """\
The export takes normalized images (N, C, H, W) and gives logits (N, K, H, W); export.json
beside it holds the normalization, classes, palette and the checks against the network.

Examples:
  segplatform export --model models:/unet-mni152@champion --format onnx --out exported/
  segplatform export --model ./runs/best/model --format torch-export --out exported/ \\
      --check-size 128x128 --check-size 161x97
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX or torch.export (dynamic height and width)",
        description="Export a model package's network with dynamic batch, height and width, "
        "and check the export against the network at two input sizes.",
        formatter_class=HelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument("--model", required=True, help="model URI (directory, s3://, models:/)")
    parser.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--check-size",
        type=image_size,
        action="append",
        metavar="HxW",
        help="sizes to compare with the network (repeatable; default 64x64 and 97x71)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segplatform.export import CHECK_SIZES, ExportError, export_package

    try:
        result = export_package(
            args.model, args.out, args.format, check_sizes=args.check_size or CHECK_SIZES
        )
    except ExportError as error:
        print(f"error: cannot export: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"wrote {result.path} ({args.format}, {result.architecture}, {result.seconds} s)")
    for check in result.checks:
        height, width = check["size"]
        print(f"  {height}x{width}: max |export - network| = {check['max_abs_diff']:.2e}")
    return 0
