"""The local platform: a Ray head, an MLflow server and an S3 server on 127.0.0.1.

``segplatform local up|status|down`` manage one platform whose whole state lives in one directory
(``--state-dir``, else ``$SEGPLATFORM_HOME``, else ``.segplatform/`` in the current directory)::

    state.json          pids, ports and addresses of the running services (removed by ``down``)
    env.sh              the ``export`` lines for clients (mode 0600: holds the S3 secret)
    s3/                 SeaweedFS data, ``credentials.json`` (generated once, mode 0600), weed.log
    mlflow/             mlflow.db (SQLite tracking + model registry), mlflow.log
    ray/                auth_token (mode 0600), ray.log, tmp/ (Ray's temp dir, when the path is
                        short enough for Ray's unix sockets; else a /tmp/segp-ray-* dir)

Services, in start order:

1. S3: SeaweedFS (``weed mini``) with the generated access key enforced, bucket ``segplatform``.
2. MLflow: ``mlflow server`` on SQLite; artifacts go to ``s3://segplatform/mlflow-artifacts`` on
   the local S3 server and are proxied by the tracking server (clients need only
   ``MLFLOW_TRACKING_URI``).
3. Ray head: dashboard and job server at ``RAY_ADDRESS``, token authentication on. The head's
   environment carries the ``MLFLOW_TRACKING_URI``, ``AWS_*`` and ``SEGPLATFORM_S3_BUCKET``
   variables, so jobs submitted with ``ray job submit`` reach the tracking server and S3 without
   further set-up.

A failure at any step stops what was already started. Data (runs, registered models, S3 objects)
survives ``down`` and is served again by the next ``up``. Every process started for one ``up``
carries a random instance id in its environment, which ``down`` uses to find stragglers; other
users' and engineers' Ray clusters are never touched. Extra Ray nodes (a later ``--nodes N``) fit
as records in ``state.json["services"]["ray_nodes"]`` that join ``ray_head.gcs_address``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import string
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from segplatform.services.mlflow_server import MLflowServer
from segplatform.services.ray_head import (
    RayHead,
    kill_processes,
    port_is_open,
    processes_marked,
    terminate_process_group,
)

# Environment variable naming the state directory when --state-dir is not given.
HOME_ENV_VAR = "SEGPLATFORM_HOME"
# State directory (relative to the current directory) when neither is given.
DEFAULT_STATE_DIR = ".segplatform"
# Bucket created on the local S3 server for datasets, checkpoints and MLflow artifacts.
BUCKET = "segplatform"
# Region reported to S3 clients (SeaweedFS accepts any).
REGION = "us-east-1"
STATE_FILE = "state.json"
ENV_FILE = "env.sh"
STATE_VERSION = 1
# Client variables ``up`` prints, in this order.
ENV_KEYS: tuple[str, ...] = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "SEGPLATFORM_S3_BUCKET",
    HOME_ENV_VAR,
)


class LocalPlatformError(RuntimeError):
    """The local platform could not be started, found or stopped."""


def resolve_state_dir(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """``state_dir``, else ``$SEGPLATFORM_HOME``, else ``./.segplatform`` (absolute)."""
    chosen = state_dir or os.environ.get(HOME_ENV_VAR) or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (atomically, via a temporary file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def format_exports(env: dict[str, str]) -> str:
    """``export KEY=VALUE`` lines (shell-quoted) that ``eval`` can consume."""
    return "\n".join(f"export {key}={shlex.quote(env[key])}" for key in ENV_KEYS if key in env)


@dataclass(frozen=True)
class ServiceStatus:
    """The state of one service as ``status`` reports it."""

    name: str  # "s3", "mlflow" or "ray_head"
    address: str  # where clients reach it
    pid: int | None  # process (group leader) id
    alive: bool  # the process runs
    healthy: bool  # the service answered its health check
    detail: str  # what the health check saw


class LocalPlatform:
    """The services of one state directory. ``up``, ``status`` and ``down`` may run in different
    processes: everything they share is in ``state.json``."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self.state_dir = resolve_state_dir(state_dir)
        self.state_path = self.state_dir / STATE_FILE
        self.env_path = self.state_dir / ENV_FILE
        self.credentials_path = self.state_dir / "s3" / "credentials.json"

    # ------------------------------------------------------------------------------ state
    def read_state(self) -> dict[str, Any] | None:
        """The contents of ``state.json``, or None when the platform is not up."""
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as error:
            raise LocalPlatformError(f"{self.state_path}: not valid JSON ({error})") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise LocalPlatformError(
                f"{self.state_path}: unknown state version {state.get('version')!r} "
                f"(expected {STATE_VERSION}); run `segplatform local down` with the version "
                "that wrote it, or remove the file"
            )
        return state

    def env(self) -> dict[str, str]:
        """The client variables of the running platform (LocalPlatformError if it is not up)."""
        state = self.read_state()
        if state is None:
            raise LocalPlatformError(
                f"the local platform is not up in {self.state_dir}; run `segplatform local up`"
            )
        return dict(state["env"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serializes ``up`` and ``down`` on one state directory."""
        if not self.state_dir.exists():
            self.state_dir.mkdir(parents=True, mode=0o700)  # holds the token and S3 secret
        with open(self.state_dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LocalPlatformError(
                    f"another `segplatform local` command is working on {self.state_dir}"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _credentials(self) -> tuple[str, str]:
        """The S3 access key and secret, generated on first use and kept (mode 0600)."""
        if self.credentials_path.exists():
            data = json.loads(self.credentials_path.read_text())
            return data["access_key"], data["secret_key"]
        alphabet = string.ascii_uppercase + string.digits
        access_key = "SEGP" + "".join(secrets.choice(alphabet) for _ in range(16))
        secret_key = secrets.token_urlsafe(30)
        self.credentials_path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(
            self.credentials_path,
            json.dumps({"access_key": access_key, "secret_key": secret_key}, indent=2),
        )
        return access_key, secret_key

    # ------------------------------------------------------------------------------ up
    def up(
        self,
        *,
        num_cpus: int | None = None,
        timeout: float = 180.0,
        log: Callable[[str], None] = lambda message: None,
    ) -> tuple[dict[str, Any], bool]:
        """Start the platform; returns ``(state, started)``, ``started`` False if already up.

        Raises LocalPlatformError (after stopping whatever it started) when a service fails.
        """
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be at least 1, got {num_cpus}")
        with self._locked():
            state = self.read_state()
            if state is not None:
                if any(status.alive for status in self._statuses(state)):
                    return state, False
                log("stale state from a platform that is no longer running: cleaning up")
                self._stop_all(state, log)
            return self._start(num_cpus=num_cpus, timeout=timeout, log=log), True

    def _start(
        self, *, num_cpus: int | None, timeout: float, log: Callable[[str], None]
    ) -> dict[str, Any]:
        from segplatform.services.seaweed import SeaweedServer

        instance_id = uuid.uuid4().hex
        access_key, secret_key = self._credentials()
        started: list[Callable[[], None]] = []
        deadline = time.monotonic() + timeout
        s3 = mlflow = head = None
        try:
            begin = time.monotonic()
            s3 = SeaweedServer(self.state_dir / "s3", access_key=access_key, secret_key=secret_key)
            started.append(s3.stop)
            s3.start(timeout=max(1.0, deadline - time.monotonic()))
            s3.create_bucket(BUCKET)
            log(f"S3 (SeaweedFS)   {s3.endpoint_url}  ready in {time.monotonic() - begin:.1f} s")
            client_s3_env = {**s3.env(), "AWS_DEFAULT_REGION": REGION}

            begin = time.monotonic()
            mlflow = MLflowServer(
                self.state_dir / "mlflow",
                artifacts_destination=f"s3://{BUCKET}/mlflow-artifacts",
                env={"MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url, **client_s3_env},
                instance_id=instance_id,
            )
            started.append(mlflow.stop)
            mlflow.launch()

            head = RayHead(
                self.state_dir / "ray",
                num_cpus=num_cpus,
                instance_id=instance_id,
                env={
                    "MLFLOW_TRACKING_URI": mlflow.tracking_uri,
                    "SEGPLATFORM_S3_BUCKET": BUCKET,
                    **client_s3_env,
                },
            )
            started.append(head.stop)
            head.launch()

            mlflow.wait_ready(max(1.0, deadline - time.monotonic()))
            log(
                f"MLflow           {mlflow.tracking_uri}  ready in {time.monotonic() - begin:.1f} s"
            )
            head.wait_ready(max(1.0, deadline - time.monotonic()))
            log(f"Ray head         {head.dashboard_url}  ready in {time.monotonic() - begin:.1f} s")

            env = {
                **head.env(),
                "MLFLOW_TRACKING_URI": mlflow.tracking_uri,
                **client_s3_env,
                "SEGPLATFORM_S3_BUCKET": BUCKET,
                HOME_ENV_VAR: str(self.state_dir),
            }
            state = {
                "version": STATE_VERSION,
                "instance_id": instance_id,
                "state_dir": str(self.state_dir),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "services": {
                    "s3": {
                        "pid": s3.pid,
                        "endpoint_url": s3.endpoint_url,
                        "ports": dict(s3.ports),
                        "bucket": BUCKET,
                        "data_dir": str(s3.root_dir / "data"),
                        "log": str(s3.log_path),
                    },
                    "mlflow": mlflow.to_record(),
                    "ray_head": head.to_record(),
                    "ray_nodes": [],
                },
                "env": env,
            }
            _write_private(self.env_path, format_exports(env) + "\n")
            _write_private(self.state_path, json.dumps(state, indent=2) + "\n")
            return state
        except BaseException as error:
            log(f"start-up failed ({error.__class__.__name__}); stopping what was started")
            begin = time.monotonic()
            for stop in reversed(started):
                with contextlib.suppress(Exception):
                    stop()
            kill_processes(self._stragglers(instance_id, head))
            log(f"stopped in {time.monotonic() - begin:.1f} s")
            if isinstance(error, Exception) and not isinstance(error, LocalPlatformError):
                raise LocalPlatformError(f"segplatform local up failed: {error}") from error
            raise

    # ------------------------------------------------------------------------------ status
    def status(self) -> list[ServiceStatus] | None:
        """The state of each service, or None when the platform is not up."""
        state = self.read_state()
        return None if state is None else self._statuses(state)

    def _statuses(self, state: dict[str, Any]) -> list[ServiceStatus]:
        services = state["services"]
        s3 = services["s3"]
        s3_alive = _group_leader_alive(s3["pid"])
        s3_code = _http_status(s3["endpoint_url"] + "/")
        mlflow = services["mlflow"]
        mlflow_alive = _group_leader_alive(mlflow["pid"])
        mlflow_code = _http_status(mlflow["tracking_uri"] + "/health")
        head = RayHead.from_record(self.state_dir / "ray", services["ray_head"])
        head_alive = head.is_alive()
        head_healthy = head_alive and head.healthy()
        return [
            ServiceStatus(
                "s3",
                s3["endpoint_url"],
                s3["pid"],
                s3_alive,
                s3_alive and s3_code == 403,
                f"anonymous request -> HTTP {s3_code}" if s3_code else "no answer",
            ),
            ServiceStatus(
                "mlflow",
                mlflow["tracking_uri"],
                mlflow["pid"],
                mlflow_alive,
                mlflow_alive and mlflow_code == 200,
                f"/health -> HTTP {mlflow_code}" if mlflow_code else "no answer",
            ),
            ServiceStatus(
                "ray_head",
                head.dashboard_url,
                head.pid,
                head_alive,
                head_healthy,
                "job server answers with the token" if head_healthy else "job server not ready",
            ),
        ]

    # ------------------------------------------------------------------------------ down
    def down(self, log: Callable[[str], None] = lambda message: None) -> bool:
        """Stop every service; returns False when the platform was not up."""
        with self._locked():
            state = self.read_state()
            if state is None:
                return False
            self._stop_all(state, log)
            return True

    def _stop_all(self, state: dict[str, Any], log: Callable[[str], None]) -> None:
        services = state["services"]
        head = RayHead.from_record(self.state_dir / "ray", services["ray_head"])
        begin = time.monotonic()
        head.stop()
        log(f"Ray head stopped in {time.monotonic() - begin:.1f} s")
        begin = time.monotonic()
        MLflowServer.from_record(self.state_dir / "mlflow", services["mlflow"]).stop()
        log(f"MLflow stopped in {time.monotonic() - begin:.1f} s")
        begin = time.monotonic()
        if services["s3"].get("pid"):
            terminate_process_group(services["s3"]["pid"], timeout=15.0)
        log(f"S3 stopped in {time.monotonic() - begin:.1f} s")
        begin = time.monotonic()
        kill_processes(self._stragglers(state["instance_id"], head, services["s3"]["data_dir"]))
        ports = _state_ports(state)
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and any(port_is_open("127.0.0.1", p) for p in ports):
            time.sleep(0.2)
        still_open = [port for port in ports if port_is_open("127.0.0.1", port)]
        log(f"stragglers and ports checked in {time.monotonic() - begin:.1f} s")
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.env_path.unlink()
        if still_open:
            raise LocalPlatformError(
                f"services stopped but ports {still_open} are still open on 127.0.0.1"
            )

    def _stragglers(
        self, instance_id: str, head: RayHead | None, s3_data_dir: str | None = None
    ) -> list[psutil.Process]:
        """Processes of this instance still running, never this process or its ancestors."""
        paths = [
            f"sqlite:///{self.state_dir / 'mlflow' / 'mlflow.db'}",
            f"-dir={s3_data_dir or self.state_dir / 's3' / 'data'}",
        ]
        if head is not None and head.temp_dir is not None:
            paths.append(f"{head.temp_dir}/session_")
        return processes_marked(f"{instance_id}/", tuple(paths))


def _state_ports(state: dict[str, Any]) -> list[int]:
    services = state["services"]
    ports = [services["mlflow"]["port"], *services["ray_head"]["ports"].values()]
    ports += list(services["s3"]["ports"].values())
    return [int(port) for port in ports]


def _group_leader_alive(pid: int | None) -> bool:
    if not pid:
        return False
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of ``GET url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def print_lines(message: str) -> None:
    """Progress output of ``up``/``down`` (stderr, so stdout stays eval-able)."""
    print(message, file=sys.stderr, flush=True)
