"""``segplatform local up|status|down|env|node``: the local platform on 127.0.0.1.

A Ray head (dashboard and job server, token authentication), optionally more Ray nodes joining it
(``up --nodes N``, ``node add``, ``node remove``), an MLflow tracking server (SQLite, artifacts on
the local S3 bucket) and an S3 server (SeaweedFS, generated credentials), all state in one
directory. See ``segplatform.local``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable

_EXAMPLE_UP = (
    "Example:\n"
    "  segplatform local up\n"
    '  eval "$(segplatform local env)"\n'
    "  ray job submit --working-dir . -- python jobs/train_unet.py --data s3://segplatform/mni\n"
    "  segplatform local down\n"
    "\n"
    "A two-node cluster (head + node-1, 1 logical CPU each):\n"
    "  segplatform local up --nodes 2 --num-cpus 1\n"
    "  segplatform local status\n"
)
_EXAMPLE_NODE = (
    "Example:\n"
    "  segplatform local node add --num-cpus 1\n"
    "  segplatform local node remove node-1          # orderly: the raylet drains and leaves\n"
    "  segplatform local node remove node-2 --force  # a crash, as a lost machine\n"
)


def _reports_platform_errors(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """``command`` with a LocalPlatformError printed as ``error: MESSAGE`` on stderr (exit 1)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from segplatform.local import LocalPlatformError

        try:
            return command(args)
        except LocalPlatformError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return run


@_reports_platform_errors
def _up(args: argparse.Namespace) -> int:
    from segplatform.local import LocalPlatform, format_exports, print_lines

    platform = LocalPlatform(args.state_dir)
    state, started = platform.up(
        num_cpus=args.num_cpus,
        nodes=args.nodes,
        timeout=args.timeout,
        log=print_lines,
        head_object_store_mb=args.head_object_store_mb,
    )
    exports = format_exports(state["env"])
    if args.print_env:
        if not started:
            print_lines(f"the local platform is already up in {platform.state_dir}")
        print(exports)
        return 0
    services = state["services"]
    workers = services.get("ray_nodes", [])
    if not started:
        print(f"The local platform is already up in {platform.state_dir}.")
        if len(workers) + 1 != args.nodes:
            print(
                f"It has {len(workers) + 1} Ray node(s), not {args.nodes}: use "
                "`segplatform local node add|remove`, or `local down` and `local up` again."
            )
    node_lines = "".join(
        f"Ray node        {record['name']}  {record.get('node_id') or '?'}  "
        f"{record.get('num_cpus') or 'all'} CPU\n"
        for record in workers
    )
    print(
        f"state dir       {platform.state_dir}\n"
        f"Ray dashboard   {services['ray_head']['dashboard_url']}  (jobs: ray job submit)\n"
        f"Ray GCS         {services['ray_head']['gcs_address']}\n"
        f"{node_lines}"
        f"MLflow          {services['mlflow']['tracking_uri']}\n"
        f"S3              {services['s3']['endpoint_url']}  bucket s3://{services['s3']['bucket']}\n"
        f'\nSet these in your shell (or run: eval "$(segplatform local env'
        f'{_state_dir_flag(args)})"):\n{exports}'
    )
    return 0


def _state_dir_flag(args: argparse.Namespace) -> str:
    return f" --state-dir {args.state_dir}" if args.state_dir else ""


@_reports_platform_errors
def _status(args: argparse.Namespace) -> int:
    from segplatform.local import LocalPlatform

    platform = LocalPlatform(args.state_dir)
    statuses = platform.status()
    nodes = platform.nodes() if statuses is not None else None
    if statuses is None:
        if args.json:
            print(json.dumps({"state_dir": str(platform.state_dir), "up": False}))
        else:
            print(f"the local platform is not up in {platform.state_dir}")
        return 3
    healthy = all(status.healthy for status in statuses)
    if args.json:
        print(
            json.dumps(
                {
                    "state_dir": str(platform.state_dir),
                    "up": True,
                    "healthy": healthy,
                    "services": [status.__dict__ for status in statuses],
                    "nodes": [node.__dict__ for node in nodes or []],
                },
                indent=2,
            )
        )
    else:
        for status in statuses:
            state = "OK" if status.healthy else ("UNHEALTHY" if status.alive else "DOWN")
            where = f"{status.address:<28} pid {status.pid}"
            print(f"{status.name:<16} {state:<9} {where}  {status.detail}")
        print(f"\n{'node':<16} {'state':<10} {'node id':<56} {'CPU':>4} {'GPU':>4}  pid")
        for node in nodes or []:
            print(
                f"{node.name:<16} {node.state:<10} {node.node_id or '-':<56} {node.cpus:>4g} "
                f"{node.gpus:>4g}  {node.pid or '-'}"
                + (f"  ({node.detail})" if node.detail and node.state != "ALIVE" else "")
            )
    return 0 if healthy else 1


@_reports_platform_errors
def _down(args: argparse.Namespace) -> int:
    from segplatform.local import LocalPlatform, print_lines

    platform = LocalPlatform(args.state_dir)
    if platform.down(log=print_lines):
        print(f"the local platform in {platform.state_dir} is stopped")
    else:
        print(f"the local platform is not up in {platform.state_dir}")
    return 0


@_reports_platform_errors
def _node_add(args: argparse.Namespace) -> int:
    from segplatform.local import LocalPlatform, print_lines

    record = LocalPlatform(args.state_dir).add_node(
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, timeout=args.timeout, log=print_lines
    )
    print(f"{record['name']} {record['node_id']}")
    return 0


@_reports_platform_errors
def _node_remove(args: argparse.Namespace) -> int:
    from segplatform.local import LocalPlatform, print_lines

    record = LocalPlatform(args.state_dir).remove_node(args.node, force=args.force, log=print_lines)
    print(f"{record['name']} {record.get('node_id') or '-'} removed")
    return 0


@_reports_platform_errors
def _env(args: argparse.Namespace) -> int:
    from segplatform.local import LocalPlatform, format_exports

    print(format_exports(LocalPlatform(args.state_dir).env()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from segplatform.cli import HelpFormatter

    local = subparsers.add_parser(
        "local",
        help="start/stop the local platform (Ray head, MLflow, S3) on 127.0.0.1",
        description=(
            "The local platform on 127.0.0.1: a Ray head (dashboard and job server, token\n"
            "authentication), an MLflow tracking server (SQLite, artifacts on the local S3\n"
            "bucket) and an S3 server (SeaweedFS, generated credentials). All state lives in\n"
            "one directory: --state-dir, else $SEGPLATFORM_HOME, else ./.segplatform"
        ),
        formatter_class=HelpFormatter,
        epilog=_EXAMPLE_UP,
    )
    commands = local.add_subparsers(dest="local_command", metavar="COMMAND", required=True)
    # Every command takes --state-dir (first among its options).
    state_dir = argparse.ArgumentParser(add_help=False)
    state_dir.add_argument(
        "--state-dir",
        help="directory holding all state (default: $SEGPLATFORM_HOME, else ./.segplatform)",
    )

    def add_command(
        group: argparse._SubParsersAction,
        name: str,
        func: Callable[[argparse.Namespace], int],
        *,
        help: str,
        epilog: str,
    ) -> argparse.ArgumentParser:
        parser = group.add_parser(
            name, help=help, formatter_class=HelpFormatter, epilog=epilog, parents=[state_dir]
        )
        parser.set_defaults(func=func)
        return parser

    up = add_command(
        commands,
        "up",
        _up,
        help="start the Ray head, the MLflow server and the S3 server",
        epilog=_EXAMPLE_UP,
    )
    up.add_argument(
        "--nodes",
        type=_positive_int,
        default=1,
        help="Ray nodes in all: the head plus NODES-1 worker nodes joining it on this machine",
    )
    up.add_argument(
        "--num-cpus",
        type=_positive_int,
        help="logical CPUs per Ray node (default: all for one node, else CPUs/NODES, at least 1)",
    )
    up.add_argument(
        "--head-object-store-mb",
        type=_positive_int,
        help="cap the head's Ray object store (MiB; Ray's minimum is 75; default: Ray's, 30%% "
        "of memory): training data never passes through it",
    )
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for services")
    up.add_argument(
        "--print-env",
        action="store_true",
        help='print only the export lines, for eval "$(segplatform local up --print-env)"',
    )

    status = add_command(
        commands,
        "status",
        _status,
        help="check each service (exit 0 healthy, 1 unhealthy, 3 not up)",
        epilog="Example:\n  segplatform local status --json\n",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    add_command(
        commands,
        "down",
        _down,
        help="stop every service (data stays in the state dir)",
        epilog="Example:\n  segplatform local down --state-dir /tmp/segplatform\n",
    )

    node = commands.add_parser(
        "node",
        help="add or remove a Ray worker node of the running platform",
        formatter_class=HelpFormatter,
        epilog=_EXAMPLE_NODE,
    )
    node_commands = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    add = add_command(
        node_commands,
        "add",
        _node_add,
        help="start one more Ray node that joins the head (prints its name and node id)",
        epilog=_EXAMPLE_NODE,
    )
    add.add_argument(
        "--num-cpus", type=_positive_int, help="logical CPUs of the node (default: the head's)"
    )
    add.add_argument("--num-gpus", type=int, help="GPUs of the node (default: detected)")
    add.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the join")
    remove = add_command(
        node_commands,
        "remove",
        _node_remove,
        help="stop a Ray worker node and every process it started",
        epilog=_EXAMPLE_NODE,
    )
    remove.add_argument("node", metavar="NODE", help="node name (node-1) or node id (prefix)")
    remove.add_argument(
        "--force",
        action="store_true",
        help="kill the node at once (a crash) instead of letting it drain and leave",
    )

    add_command(
        commands,
        "env",
        _env,
        help="print the export lines of the running platform",
        epilog='Example:\n  eval "$(segplatform local env)"\n',
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
