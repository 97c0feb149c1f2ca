"""``segplatform tracking sync``: upload MLflow records kept while the server was unreachable."""

from __future__ import annotations

import argparse


def _sync(args: argparse.Namespace) -> int:
    from segplatform.tracking import sync_buffer

    sent = sync_buffer(args.buffer, tracking_uri=args.tracking_uri)
    print(f"sent {sent} record(s) from {args.buffer}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from segplatform.cli import HelpFormatter

    tracking = subparsers.add_parser(
        "tracking",
        help="MLflow tracking buffers",
        formatter_class=HelpFormatter,
        epilog="Example:\n  segplatform tracking sync ./ray_results/run-1/tracking-buffer\n",
    )
    commands = tracking.add_subparsers(dest="tracking_command", metavar="COMMAND", required=True)
    sync = commands.add_parser(
        "sync",
        help="upload the records a run kept while MLflow was unreachable",
        formatter_class=HelpFormatter,
        epilog="Example:\n  segplatform tracking sync ./buffer --tracking-uri http://127.0.0.1:5000\n",
    )
    sync.add_argument("buffer", help="the tracking buffer directory a run printed")
    sync.add_argument("--tracking-uri", help="MLflow URI (default: the one the run used)")
    sync.set_defaults(func=_sync)
