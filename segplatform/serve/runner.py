"""What ``segplatform serve`` does: join or start Ray, start Serve, run the app, clean up.

- Ray: ``--address`` / ``RAY_ADDRESS`` names a cluster (``HOST:PORT`` of its GCS, or ``auto``);
  a dashboard URL (``http://...``, what ``segplatform local env`` exports for ``ray job
  submit``) is turned into the GCS address through the local platform's state file
  (``$SEGPLATFORM_HOME/state.json``) when it is that platform's; otherwise a local Ray starts
  in this process (token authentication on, dashboard on 127.0.0.1) and stops with it.
- Serve: its HTTP proxy listens on ``host:port`` (127.0.0.1 unless told otherwise), on the head
  node only by default (several local nodes on one machine cannot share a port). If Serve
  already runs on the cluster, its HTTP settings stay as they are and only the application is
  added.
- The application ``name`` (route prefix ``/`` by default) is deployed with ``serve.run``; the
  command prints its URL and waits. SIGINT (Ctrl-C) or SIGTERM deletes the application, shuts
  Serve down if this command started it, and stops the local Ray if it started one.

The cluster's workers import ``segplatform.serve.app``: on a cluster started from this project's
environment (the local platform, the image of ``deploy/Dockerfile``) that is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from segplatform.serve.settings import ServeSettings


class ServeRunError(RuntimeError):
    """The endpoint could not be started."""


@dataclass(frozen=True)
class Endpoint:
    """Where a started application answers."""

    url: str  # http://HOST:PORT/PREFIX/
    app_name: str
    started_ray: bool
    started_serve: bool


def resolve_address(address: str | None) -> str | None:
    """The Ray address to join (``segplatform.local.cluster_address``); None to start one."""
    from segplatform.local import ClusterAddressError, cluster_address

    try:
        return cluster_address(address)
    except ClusterAddressError as err:
        raise ServeRunError(
            f"{err}; or deploy through the dashboard with "
            "`serve deploy deploy/serve.yaml --address URL`"
        ) from None


def ensure_ray(address: str | None, num_cpus: float) -> bool:
    """Connect to ``address`` or start a local Ray; True when this call started one."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return False
    from segplatform.services.ray_head import free_port

    token_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = token_log.level
    token_log.setLevel(logging.ERROR)
    try:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(num_cpus + 0.999) + 1),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    finally:
        token_log.setLevel(level)
    return True


def replica_pids(app_name: str, deployment: str = "") -> list[int]:
    """Pids of the live replica processes of ``app_name`` on this machine (all its deployments,
    or ``deployment``'s), found by the process title Ray gives a Serve replica."""
    import psutil

    title = f"ServeReplica:{app_name}:{deployment}"
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if title in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process.info["pid"])
    return found


def start_endpoint(
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    app_name: str = "segplatform",
    route_prefix: str = "/",
    address: str | None = None,
    proxy_location: str = "HeadOnly",
    log: Callable[[str], None] = lambda message: None,
) -> Endpoint:
    """Deploy the endpoint for ``settings`` and return where it answers."""
    from ray import serve

    from segplatform.serve.app import build_app

    replicas = (settings.autoscaling or {}).get("max_replicas", settings.num_replicas)
    started_ray = ensure_ray(resolve_address(address), settings.num_cpus * replicas)
    status = serve.status()
    started_serve = not status.proxies and not status.applications
    if started_serve:
        serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
    else:
        log("Serve already runs on this cluster: its HTTP host and port stay as they are")
    begin = time.monotonic()
    try:
        serve.run(build_app(settings.to_dict()), name=app_name, route_prefix=route_prefix)
    except BaseException as error:  # Ctrl-C during start-up too: leave nothing behind
        stop_endpoint(Endpoint("", app_name, started_ray, started_serve))
        if isinstance(error, Exception):
            raise ServeRunError(f"the application did not start: {error}") from error
        raise
    prefix = route_prefix.strip("/")
    url = f"http://{_url_host(host)}:{port}/{prefix + '/' if prefix else ''}"
    log(f"application {app_name!r} running in {time.monotonic() - begin:.1f} s")
    return Endpoint(url, app_name, started_ray, started_serve)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def stop_endpoint(endpoint: Endpoint) -> None:
    """Delete the application; stop Serve and Ray if ``endpoint`` started them."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    with contextlib.suppress(Exception):
        serve.delete(endpoint.app_name)
    if endpoint.started_serve:
        with contextlib.suppress(Exception):
            serve.shutdown()
    if endpoint.started_ray:
        ray.shutdown()
    else:
        with contextlib.suppress(Exception):
            ray.shutdown()  # only disconnects this driver from the cluster


def fetch_json(url: str, api_key: str | None = None, timeout: float = 10.0) -> Any:
    """GET ``url`` as JSON (with the bearer key when given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def serve_until_stopped(
    settings: ServeSettings,
    *,
    api_key: str | None = None,
    log: Callable[[str], None] = print,
    **options: Any,
) -> int:
    """``start_endpoint``, print the URL and the model, wait for SIGINT/SIGTERM, clean up."""

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    endpoint = None
    handlers: dict[int, Any] = {}
    try:
        endpoint = start_endpoint(settings, log=log, **options)
        # After ray.init, which installs its own SIGTERM handler; SIGINT explicitly, since a
        # shell starts background commands with SIGINT ignored.
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, on_signal)
        try:
            info = fetch_json(endpoint.url + "v1/model", api_key)
            version = f" version {info['version']}" if info.get("version") else ""
            model = (
                f"{info['name']}{version} ({info['architecture']}, {len(info['classes'])} classes)"
            )
        except (urllib.error.URLError, OSError, ValueError, KeyError) as error:
            model = f"{settings.model} (model info not available: {error})"
        log(f"serving {model}")
        log(f"  {endpoint.url}              web page")
        log(f"  {endpoint.url}v1/segment    POST an image (format=png|json|overlay)")
        log("Ctrl-C stops it")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping")
        return 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if endpoint is not None:
            stop_endpoint(endpoint)
            log("stopped")
