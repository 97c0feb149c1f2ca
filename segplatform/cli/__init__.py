"""The ``segplatform`` command line.

Each command group lives in its own module under ``segplatform.cli`` and exposes
``register(subparsers)``; this module only assembles them. Heavy imports (torch, ray, mlflow)
happen inside the command functions so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    # [commands]
    "quickstart",
    "train",
    "sweep",
    "data",
    "local",
    "flops",
    "evaluate",
    "tracking",
    "bench",
    "serve",
    "export",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks and shows defaults."""


def image_size(text: str) -> tuple[int, int]:
    """Argument type ``HxW`` (or ``H,W``, or one number for a square) -> ``(H, W)``."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 512x512), got {text!r}") from None
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 512x512), got {text!r}")
    return values[0], values[1]


def build_parser(commands: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The parser with the subcommands of ``commands`` (all of them by default)."""
    parser = argparse.ArgumentParser(
        prog="segplatform",
        description="Distributed training, tuning and serving of semantic segmentation on Ray.",
        formatter_class=HelpFormatter,
        epilog="Example:\n  segplatform data convert mni152-tissue ./data/mni152\n",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in commands:
        importlib.import_module(f"segplatform.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # ``segplatform COMMAND ...`` builds only COMMAND's parser: a command group's options can
    # import torch or the model registry, which ``local status`` has no use for.
    command = argv[0] if argv else ""
    parser = build_parser((command,) if command in COMMAND_MODULES else COMMAND_MODULES)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
