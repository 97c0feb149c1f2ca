"""``segplatform serve``: an autoscaled HTTP segmentation endpoint on Ray Serve.

See ``segplatform.serve`` for the endpoint and ``segplatform.serve.runner`` for how the command
joins or starts Ray and cleans up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from segplatform.cli import HelpFormatter

_EPILOG = """\
Examples:
  segplatform serve --model models:/unet-mni152@champion
  segplatform serve --model ./runs/best/model --port 8080 --replicas 2
  segplatform serve --model models:/dlv3@champion --autoscale 1:4 --gpu
  segplatform serve --model s3://bucket/models/unet --api-key-env SEGPLATFORM_API_KEY

  curl -H 'Content-Type: image/png' --data-binary @scan.png \\
      'http://127.0.0.1:8000/v1/segment?format=json'

Ray: --address, else RAY_ADDRESS (on the local platform: `eval "$(segplatform local env)"`),
else a local Ray in this process. MLflow: MLFLOW_TRACKING_URI or --tracking-uri. A model given as
models:/NAME@ALIAS is followed: when the alias moves, replicas switch to the new version.
"""


def _autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        values = (int(low), int(high)) if sep else (1, int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX (e.g. 1:4), got {text!r}") from None
    if not 0 <= values[0] <= values[1] or values[1] < 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, MAX >= 1, got {text!r}")
    return values


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model as an autoscaled HTTP endpoint (Ray Serve)",
        description="Serve a model package (directory, s3:// URI, models:/NAME@ALIAS or "
        "models:/NAME/VERSION) over HTTP: POST /v1/segment, GET /v1/model, GET /v1/health and "
        "a web page at /. Prints the URL; Ctrl-C stops everything the command started.",
        formatter_class=HelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument("--model", required=True, help="model URI")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--address", help="Ray cluster (HOST:PORT); default RAY_ADDRESS or local")
    parser.add_argument("--name", default="segplatform", help="Serve application name")
    parser.add_argument("--route-prefix", default="/", help="URL prefix of the application")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    scale = parser.add_argument_group("replicas")
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    scale.add_argument(
        "--autoscale", type=_autoscale, metavar="MIN:MAX", help="autoscale between MIN and MAX"
    )
    scale.add_argument(
        "--target-ongoing", type=float, default=2.0, help="autoscaling: requests per replica"
    )
    scale.add_argument("--upscale-delay", type=float, default=5.0, help="autoscaling: seconds")
    scale.add_argument("--downscale-delay", type=float, default=30.0, help="autoscaling: seconds")
    scale.add_argument("--cpus-per-replica", type=float, default=1.0, help="logical CPUs")
    scale.add_argument("--gpu", action="store_true", help="one GPU per replica")
    limits = parser.add_argument_group("requests")
    limits.add_argument(
        "--max-inflight", type=int, default=4, help="requests a replica admits (then 503)"
    )
    limits.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit")
    limits.add_argument(
        "--max-pixels", type=int, default=4096 * 4096, help="image width x height limit"
    )
    limits.add_argument(
        "--batching",
        choices=("auto", "on", "off"),
        default="auto",
        help="dynamic batching (auto: on with a GPU, off on CPU)",
    )
    limits.add_argument(
        "--reload-interval",
        type=float,
        default=30.0,
        help="seconds between checks of a models:/NAME@ALIAS alias (0: never)",
    )
    limits.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require 'Authorization: Bearer KEY' with KEY read from environment variable VAR",
    )
    parser.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any ServeSettings field (JSON value), e.g. --set max_batch_size=4",
    )
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> tuple[Any, str | None]:
    """``(ServeSettings, api_key)`` for the command line."""
    from segplatform.serve.settings import ServeSettings, api_key_digest

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is empty")
    autoscaling = None
    if args.autoscale:
        autoscaling = {
            "min_replicas": args.autoscale[0],
            "max_replicas": args.autoscale[1],
            "target_ongoing_requests": args.target_ongoing,
            "upscale_delay_s": args.upscale_delay,
            "downscale_delay_s": args.downscale_delay,
        }
    fields: dict[str, Any] = {
        "model": args.model,
        "tracking_uri": args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
        "num_replicas": args.replicas,
        "autoscaling": autoscaling,
        "num_cpus": args.cpus_per_replica,
        "num_gpus": 1.0 if args.gpu else 0.0,
        "max_inflight": args.max_inflight,
        "max_body_bytes": int(args.max_body_mb * (1 << 20)),
        "max_pixels": args.max_pixels,
        "batching": {"auto": None, "on": True, "off": False}[args.batching],
        "reload_interval_s": args.reload_interval,
        "api_key_sha256": api_key_digest(api_key) if api_key else None,
    }
    for key, value in args.set:
        if key == "autoscaling" and isinstance(value, dict) and autoscaling:
            value = {**autoscaling, **value}
        fields[key] = value
    return ServeSettings.from_dict(fields), api_key


def run(args: argparse.Namespace) -> int:
    from segplatform.serve.runner import ServeRunError, serve_until_stopped
    from segplatform.serve.settings import SettingsError

    try:
        settings, api_key = settings_from_args(args)
    except (SettingsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return serve_until_stopped(
            settings,
            api_key=api_key,
            host=args.host,
            port=args.port,
            app_name=args.name,
            route_prefix=args.route_prefix,
            address=args.address,
            log=lambda message: print(message, flush=True),
        )
    except ServeRunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
