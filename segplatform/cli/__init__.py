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
    "data",
    "local",
    "flops",
    "evaluate",
    "tracking",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks and shows defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segplatform",
        description="Distributed training, tuning and serving of semantic segmentation on Ray.",
        formatter_class=HelpFormatter,
        epilog="Example:\n  segplatform data convert mni152-tissue ./data/mni152\n",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"segplatform.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
