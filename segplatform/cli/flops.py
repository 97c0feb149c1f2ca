"""``segplatform flops``: parameters and multiply-accumulates of a registry architecture."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any

from segplatform.cli import HelpFormatter, image_size

_EPILOG = """\
MACs are counted with torch.utils.flop_counter (MACs = FLOPs / 2, convolutions and matrix
products only), for one forward pass in eval mode. Parameter values are Python literals
(numbers, tuples, None, True/False); anything else is a string.

Examples:
  segplatform flops --arch deeplab_v3 --input 513x513
  segplatform flops --arch deeplab_v3 --input 513x513 --param output_stride=8 --json
  segplatform flops --arch deeplab_v2 --input 321x321 --param atrous_rates=6,12,18,24 --tiny
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="count parameters and MACs of an architecture",
        description="Count the parameters and multiply-accumulates (MACs) of a registry "
        "architecture for one input size.",
        formatter_class=HelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument("--arch", required=True, help="registry name, e.g. deeplab_v3")
    parser.add_argument(
        "--input", type=image_size, default=(512, 512), metavar="HxW", help="input size"
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="architecture parameter (repeatable), e.g. output_stride=8",
    )
    parser.add_argument("--tiny", action="store_true", help="use the architecture's tiny config")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def parse_param(text: str) -> tuple[str, Any]:
    """``"k=v"`` → ``(k, value)``; the value is a Python literal if it parses as one."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--param {text!r}: expected KEY=VALUE")
    raw = raw.strip()
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered in ("none", "null"):
        return key, None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw
    if isinstance(value, list):
        value = tuple(value)
    return key, value


def run(args: argparse.Namespace) -> int:
    import architectures
    from architectures.flops import count_macs, count_params

    try:
        params = dict(parse_param(p) for p in args.param)
        if args.tiny:
            config_cls = architectures.config_class(args.arch)
            model = architectures.build_from_config(args.arch, config_cls.tiny(**params))
        else:
            model = architectures.build_model(args.arch, **params)
    except (KeyError, TypeError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"segplatform flops: {message}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("segplatform flops: --batch-size must be >= 1", file=sys.stderr)
        return 2
    config = getattr(model, "config", None)
    in_channels = int(getattr(config, "in_channels", 3))
    height, width = args.input
    num_params = count_params(model)
    macs = count_macs(
        model, input_size=(height, width), in_channels=in_channels, batch_size=args.batch_size
    )
    if args.json:
        report = {
            "arch": args.arch,
            "tiny": args.tiny,
            "arch_params": dict(params),
            "input": [args.batch_size, in_channels, height, width],
            "num_params": num_params,
            "macs": macs,
            "gmacs": macs / 1e9,
        }
        print(json.dumps(report, default=list))
    else:
        name = f"{args.arch} (tiny)" if args.tiny else args.arch
        print(f"arch    {name}")
        print(f"input   {args.batch_size}x{in_channels}x{height}x{width}")
        print(f"params  {num_params:,} ({num_params / 1e6:.2f} M)")
        print(f"MACs    {macs:,} ({macs / 1e9:.2f} GMACs)")
    return 0
