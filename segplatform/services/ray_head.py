"""A Ray head node on 127.0.0.1 with its dashboard and job server, token authentication on.

``RayHead(state_dir).start()`` runs ``ray start --head --block`` as its own process group, so the
head's processes (GCS, raylet, dashboard, job server, workers) belong to this object alone and
``stop()`` never touches another Ray cluster on the machine (a plain ``ray stop`` would kill every
Ray process of the user). Everything lives under ``state_dir``:

- ``auth_token``: a random token (mode 0600). The head runs with ``RAY_AUTH_MODE=token`` and
  ``RAY_AUTH_TOKEN_PATH`` pointing at it; clients need the same two variables (see ``env()``).
- ``tmp``: Ray's ``--temp-dir`` (sessions, logs, sockets). Unix socket paths must stay under 107
  bytes, so when ``state_dir`` is long the temp dir is a short ``/tmp/segp-ray-*`` directory
  instead (``temp_dir`` records it; ``stop()`` removes it).
- ``ray.log``: output of ``ray start``.

Ports: the GCS port is chosen outside Ray's default worker range 10002–19999 (``ray start`` refuses
it otherwise), workers bind random ports (``--min-worker-port=0 --max-worker-port=0``), and the
dashboard, dashboard agent and Ray client ports are explicit free ports, so several heads coexist.
The GCS listens on all interfaces even with ``--node-ip-address=127.0.0.1``: the token is what
protects it. The venv's ``bin`` goes first on the head's PATH so that a job's ``python`` has Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from segplatform.services.process import (
    INSTANCE_ENV_VAR,
    ServiceProcess,
    kill_processes,
    marked_process_alive,
    port_is_open,
    processes_marked,
    send_signal,
    terminate_process_group,
    venv_executable,
    wait_while,
)

# Names of ``segplatform.services.process`` that other modules import from here are listed too.
__all__ = [
    "INSTANCE_ENV_VAR",
    "MAX_TEMP_DIR_LENGTH",
    "WORKER_PORT_RANGE",
    "RayHead",
    "RayHeadError",
    "free_port",
    "kill_processes",
    "port_is_open",
    "processes_marked",
    "ray_ports",
    "ray_start_command",
    "ray_start_env",
    "ray_temp_dir",
    "remove_ray_temp_dir",
    "stop_ray_start",
    "terminate_process_group",
]

# Ray's default worker port range: the GCS port must lie outside it.
WORKER_PORT_RANGE = range(10002, 20000)
# Longest Ray temp dir path that keeps the session's unix socket paths under 107 bytes
# (``<temp>/session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store`` adds ~70 bytes).
MAX_TEMP_DIR_LENGTH = 36


# ``ray start --block`` output: colour codes, and one line per process that died.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
DEAD_PROCESS_LINE = re.compile(r"(?:^|-- )\s*(\S+) \[exit code=([^\]]+)\]\s*$")


class RayHeadError(RuntimeError):
    """The Ray head could not be started or reached."""


def free_port(host: str = "127.0.0.1", exclude: set[int] | range | None = None) -> int:
    """A currently free TCP port on ``host`` outside ``exclude`` (chosen by the kernel)."""
    exclude = exclude if exclude is not None else set()
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port not in exclude:
            return port
    raise RayHeadError(f"no free port found on {host} outside the excluded ports")


def ray_ports(host: str, names: Iterable[str]) -> dict[str, int]:
    """A distinct free port on ``host`` for each of ``names``, all outside ``WORKER_PORT_RANGE``."""
    ports: dict[str, int] = {}
    for name in names:
        ports[name] = free_port(host, exclude=set(ports.values()) | set(WORKER_PORT_RANGE))
    return ports


def ray_start_command(
    options: list[str],
    *,
    temp_dir: Path | None,
    num_cpus: int | None,
    num_gpus: int | None = None,
    object_store_bytes: int | None = None,
) -> list[str]:
    """``ray start OPTIONS`` with random worker ports, ``temp_dir`` as Ray's temp dir, usage stats
    off, and ``--num-cpus`` / ``--num-gpus`` / ``--object-store-memory`` when given."""
    command = [
        venv_executable("ray"),
        "start",
        *options,
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    if object_store_bytes is not None:
        command.append(f"--object-store-memory={object_store_bytes}")
    return command


def ray_temp_dir(state_dir: Path, prefix: str) -> Path:
    """``state_dir/tmp`` when its path is short enough for Ray's unix sockets, else a new
    ``/tmp/<prefix>*`` directory."""
    candidate = state_dir / "tmp"
    if len(str(candidate)) <= MAX_TEMP_DIR_LENGTH:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_ray_temp_dir(temp_dir: Path | None, state_dir: Path) -> None:
    """Remove a temp dir ``ray_temp_dir`` made under /tmp (one inside ``state_dir`` stays)."""
    if temp_dir is not None and not temp_dir.is_relative_to(state_dir):
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_start_env(
    extra_env: dict[str, str], *, token_path: Path, address: str, marker: str
) -> dict[str, str]:
    """The environment of a ``ray start`` process: ours without ``RAY_*`` variables, plus
    ``extra_env``, the venv's ``bin`` first on PATH, token authentication with ``token_path``,
    usage stats off, ``RAY_ADDRESS=address`` and the instance marker."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("RAY_") and key != INSTANCE_ENV_VAR
    }
    env.update(extra_env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Workers inherit it: Ray code that looks its cluster up (e.g. Ray Train's placement
    # group cleaner) would otherwise find every cluster on the machine and give up.
    env["RAY_ADDRESS"] = address
    env[INSTANCE_ENV_VAR] = marker
    return env


def stop_ray_start(
    service: ServiceProcess,
    pid: int | None,
    *,
    first_signal: int | None,
    alive: Callable[[], bool],
    timeout: float,
) -> None:
    """Stop a ``ray start --block`` process: send ``first_signal`` to it while it runs (None:
    skip this orderly step) and wait up to ``timeout`` s for it to exit, then terminate its
    process group and reap it."""
    if first_signal is not None and pid is not None and alive():
        send_signal(pid, first_signal)
        wait_while(alive, timeout, 0.2)
    if pid is not None:
        terminate_process_group(pid, timeout=5.0)
    service.release()


class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with token auth, dashboard and job server."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        num_cpus: int | None = None,
        instance_id: str | None = None,
        env: dict[str, str] | None = None,
        object_store_bytes: int | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.host = host
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes  # None: Ray's default (30% of memory)
        # Marks this head's processes (environment variable INSTANCE_ENV_VAR) for stop().
        self.instance_id = instance_id or uuid.uuid4().hex
        self.marker = f"{self.instance_id}/ray"
        # Extra environment for the head, inherited by every job (e.g. MLFLOW_TRACKING_URI).
        self.extra_env = dict(env or {})
        self.token_path = self.state_dir / "auth_token"
        self.log_path = self.state_dir / "ray.log"
        self.temp_dir: Path | None = None
        self.ports: dict[str, int] = {}
        self.pid: int | None = None
        self._service = ServiceProcess(self.log_path, tail_lines=40)

    # ------------------------------------------------------------------------------ addresses
    @property
    def gcs_address(self) -> str:
        """``HOST:PORT`` of the GCS (for ``ray.init(address=...)`` and ``ray start --address``)."""
        return f"{self.host}:{self._port('gcs')}"

    @property
    def dashboard_url(self) -> str:
        """``http://HOST:PORT`` of the dashboard and job server (``RAY_ADDRESS`` for jobs)."""
        return f"http://{self.host}:{self._port('dashboard')}"

    def _port(self, name: str) -> int:
        if name not in self.ports:
            raise RayHeadError("the Ray head has not been started")
        return self.ports[name]

    def token(self) -> str:
        """The cluster's authentication token."""
        return self.token_path.read_text().strip()

    def env(self) -> dict[str, str]:
        """What a client (``ray job submit``, the Jobs SDK) needs to reach this head."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }

    # ------------------------------------------------------------------------------ lifecycle
    def _write_token(self) -> None:
        if self.token_path.exists() and self.token_path.read_text().strip():
            return
        descriptor = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))

    def _command(self) -> list[str]:
        options = [
            "--head",
            "--block",
            f"--node-ip-address={self.host}",
            f"--port={self.ports['gcs']}",
            "--include-dashboard=true",
            f"--dashboard-host={self.host}",
            f"--dashboard-port={self.ports['dashboard']}",
            f"--dashboard-agent-listen-port={self.ports['dashboard_agent']}",
            f"--ray-client-server-port={self.ports['client']}",
        ]
        return ray_start_command(
            options,
            temp_dir=self.temp_dir,
            num_cpus=self.num_cpus,
            object_store_bytes=self.object_store_bytes,
        )

    def launch(self) -> RayHead:
        """Start ``ray start --head --block`` without waiting; ``wait_ready`` waits."""
        if self._service.running():
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_token()
        self.temp_dir = ray_temp_dir(self.state_dir, "segp-ray-")
        self.ports.update(ray_ports(self.host, ("gcs", "dashboard", "dashboard_agent", "client")))
        env = ray_start_env(
            self.extra_env,
            token_path=self.token_path,
            address=f"{self.host}:{self.ports['gcs']}",
            marker=self.marker,
        )
        self.pid = self._service.launch(self._command(), cwd=self.state_dir, env=env)
        return self

    def wait_ready(self, timeout: float = 120.0) -> RayHead:
        """Wait until the job server answers an authenticated request; RayHeadError if not."""
        self._service.wait_ready(
            self.healthy,
            timeout=timeout,
            poll_interval=0.5,
            stop=self.stop,
            error=RayHeadError,
            exited=f"ray start exited during start-up; log {self.log_path}",
            timed_out=f"the Ray head was not ready after {timeout} s; log",
        )
        return self

    def start(self, timeout: float = 120.0) -> RayHead:
        """``launch()`` then ``wait_ready()``."""
        return self.launch().wait_ready(timeout)

    def healthy(self, timeout: float = 2.0) -> bool:
        """The job server lists jobs for the token (and so is up and authenticating)."""
        if "dashboard" not in self.ports:
            return False
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/jobs/",
            headers={"Authorization": f"Bearer {self.token()}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def cluster_nodes(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every node the cluster knows (alive and dead), from the dashboard's state API.

        Each dict has ``node_id``, ``state`` ("ALIVE" or "DEAD"), ``is_head_node``,
        ``resources_total`` (e.g. ``{"CPU": 2.0, ...}``), ``node_ip`` and ``state_message``.
        RayHeadError when the dashboard does not answer.
        """
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=10000&detail=true",
            headers={"Authorization": f"Bearer {self.token()}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.load(response)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise RayHeadError(f"{self.dashboard_url}: node list not available ({error})") from None
        try:
            return list(reply["data"]["result"]["result"])
        except (KeyError, TypeError):
            raise RayHeadError(
                f"{self.dashboard_url}: unexpected node list {str(reply)[:200]}"
            ) from None

    def exit_reason(self) -> str | None:
        """Why ``ray start --block`` ended, from its log: it stops the whole head when one of its
        processes dies and names that process and its exit code ("dashboard [exit code=-9]").
        None when the log says nothing of the kind."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        lines = [ANSI_ESCAPE.sub("", line) for line in lines]
        heading = [i for i, line in enumerate(lines) if "Some Ray subprocesses exited" in line]
        if not heading:
            return None
        dead = []
        for line in lines[heading[-1] + 1 :]:
            found = DEAD_PROCESS_LINE.search(line)
            if found is None:
                if line.strip():
                    break
                continue
            dead.append(f"{found[1]} [exit code={found[2]}]")
        which = ", ".join(dead) or "a Ray process died"
        return f"exited: {which}; log {self.log_path}"

    def is_alive(self) -> bool:
        """Whether the ``ray start --block`` process runs."""
        if self._service.popen is not None:
            return self._service.running()
        return self.pid is not None and marked_process_alive(self.pid, self.marker)

    def instance_marker_matches(self, process: psutil.Process) -> bool:
        """Whether ``process`` was started for this head (guards against reused pids)."""
        with contextlib.suppress(psutil.Error, OSError):
            return process.environ().get(INSTANCE_ENV_VAR) == self.marker
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop this head and everything it started; other Ray clusters are left alone.

        SIGINT lets ``ray start --block`` shut its processes down in order; then the process
        group is killed, and finally any process still carrying this head's instance marker or
        temp dir (job drivers, workers that left the group) is killed too.
        """
        stop_ray_start(
            self._service,
            self.pid,
            first_signal=signal.SIGINT,
            alive=self.is_alive,
            timeout=timeout,
        )
        paths = (str(self.temp_dir),) if self.temp_dir is not None else ()
        kill_processes(processes_marked(self.marker, paths))
        remove_ray_temp_dir(self.temp_dir, self.state_dir)

    # ------------------------------------------------------------------------------ records
    def to_record(self) -> dict[str, Any]:
        """What ``from_record`` needs to find and stop this head from another process."""
        return {
            "pid": self.pid,
            "instance_id": self.instance_id,
            "host": self.host,
            "num_cpus": self.num_cpus,
            "ports": dict(self.ports),
            "temp_dir": str(self.temp_dir) if self.temp_dir is not None else None,
            "token_path": str(self.token_path),
            "log": str(self.log_path),
            "gcs_address": self.gcs_address,
            "dashboard_url": self.dashboard_url,
        }

    @classmethod
    def from_record(cls, state_dir: str | os.PathLike[str], record: dict[str, Any]) -> RayHead:
        """A handle on a head started by another process (``segplatform local down``)."""
        head = cls(
            state_dir,
            host=record["host"],
            instance_id=record["instance_id"],
            num_cpus=record.get("num_cpus"),
        )
        head.ports = {name: int(port) for name, port in record["ports"].items()}
        head.pid = record.get("pid")
        head.temp_dir = Path(record["temp_dir"]) if record.get("temp_dir") else None
        head.token_path = Path(record["token_path"])
        return head

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.dashboard_url if self.ports else "not started"
        return f"RayHead({str(self.state_dir)!r}, {where})"
