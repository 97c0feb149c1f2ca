"""An extra Ray node (raylet) on this machine that joins a running head: a multi-node cluster on
one host.

``RayWorkerNode(state_dir, name=..., gcs_address=..., token_path=...).start()`` runs
``ray start --address=GCS --block`` as its own process group with token authentication
(``RAY_AUTH_MODE=token`` and the head's token file), the project's venv first on PATH and an
instance marker in its environment (``INSTANCE_ENV_VAR``, inherited by every worker process the
raylet starts, so ``stop()`` finds workers that left the process group). Each node gets:

- explicit free ports (node manager, object manager, dashboard agent HTTP and gRPC, runtime-env
  agent, metrics export), so several raylets coexist on one host, and random worker ports;
- its own ``--temp-dir`` (``state_dir/tmp`` when short enough for Ray's unix sockets, else a
  ``/tmp/segp-node-*`` directory), where the raylet writes files named after its node id:
  that is how the node learns its id without connecting a driver;
- ``num_cpus`` logical CPUs (logical CPUs may exceed the physical ones: two 1-CPU nodes fit a
  2-core machine).

``stop()`` is an orderly shutdown (SIGTERM: the raylet drains and the GCS marks the node DEAD at
once); ``stop(force=True)`` is a crash (SIGKILL of every process of the node: the GCS notices
through missed health checks, about 10-15 s later). Either way no process of the node is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from segplatform.services.ray_head import (
    INSTANCE_ENV_VAR,
    MAX_TEMP_DIR_LENGTH,
    WORKER_PORT_RANGE,
    free_port,
    kill_processes,
    processes_marked,
    terminate_process_group,
)

# Ports a worker node binds besides its workers' (names as in ``to_record()["ports"]``).
NODE_PORT_NAMES: tuple[str, ...] = (
    "node_manager",
    "object_manager",
    "dashboard_agent",
    "dashboard_agent_grpc",
    "runtime_env_agent",
    "metrics_export",
)


class RayNodeError(RuntimeError):
    """A Ray worker node could not be started, joined or stopped."""


class RayWorkerNode:
    """``ray start --address=GCS --block`` on 127.0.0.1: one extra node of a local cluster."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        name: str,
        gcs_address: str,
        token_path: str | os.PathLike[str],
        instance_id: str,
        host: str = "127.0.0.1",
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.name = name
        self.gcs_address = gcs_address
        self.token_path = Path(token_path)
        self.host = host
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.instance_id = instance_id
        # Marks this node's processes; distinct from the head's "<id>/ray" (prefix-matched).
        self.marker = f"{instance_id}/node/{name}"
        # Extra environment inherited by the node's workers (S3 and MLflow settings).
        self.extra_env = dict(env or {})
        self.log_path = self.state_dir / "ray.log"
        self.temp_dir: Path | None = None
        self.ports: dict[str, int] = {}
        self.pid: int | None = None
        self.node_id: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._launched_at = 0.0  # time.time() of launch()

    # ------------------------------------------------------------------------------ start
    def _choose_temp_dir(self) -> Path:
        candidate = self.state_dir / "tmp"
        if len(str(candidate)) <= MAX_TEMP_DIR_LENGTH:
            candidate.mkdir(parents=True, exist_ok=True)
            return candidate
        return Path(tempfile.mkdtemp(prefix="segp-node-", dir="/tmp"))

    def _command(self) -> list[str]:
        ray_cli = Path(sys.executable).with_name("ray")
        command = [
            str(ray_cli) if ray_cli.exists() else "ray",
            "start",
            "--block",
            f"--address={self.gcs_address}",
            f"--node-ip-address={self.host}",
            f"--node-manager-port={self.ports['node_manager']}",
            f"--object-manager-port={self.ports['object_manager']}",
            f"--dashboard-agent-listen-port={self.ports['dashboard_agent']}",
            f"--dashboard-agent-grpc-port={self.ports['dashboard_agent_grpc']}",
            f"--runtime-env-agent-port={self.ports['runtime_env_agent']}",
            f"--metrics-export-port={self.ports['metrics_export']}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            command.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            command.append(f"--num-gpus={self.num_gpus}")
        return command

    def _child_env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("RAY_") and key != INSTANCE_ENV_VAR
        }
        env.update(self.extra_env)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Workers inherit it, so Ray code that looks its cluster up finds this one (not every
        # cluster on the machine).
        env["RAY_ADDRESS"] = self.gcs_address
        env[INSTANCE_ENV_VAR] = self.marker
        return env

    def launch(self) -> RayWorkerNode:
        """Start ``ray start --address ... --block`` without waiting; ``wait_joined`` waits."""
        if self._process is not None and self._process.poll() is None:
            return self
        if not self.token_path.is_file():
            raise RayNodeError(f"{self.name}: the head's token file {self.token_path} is missing")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = self._choose_temp_dir()
        used: set[int] = set()
        for port_name in NODE_PORT_NAMES:
            port = free_port(self.host, exclude=used | set(WORKER_PORT_RANGE))
            used.add(port)
            self.ports[port_name] = port
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._launched_at = time.time()
        self._process = subprocess.Popen(
            self._command(),
            cwd=self.state_dir,
            env=self._child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group and session
        )
        self.pid = self._process.pid
        return self

    def find_node_id(self) -> str | None:
        """The node id the raylet wrote into its temp dir (None before the raylet is up)."""
        if self.temp_dir is None:
            return None
        # The temp dir may keep sessions of earlier nodes: only files of this launch count.
        for path in self.temp_dir.glob("session_*/dashboard_agent_listen_port_*"):
            with contextlib.suppress(OSError):
                if (
                    path.parent.name != "session_latest"
                    and path.stat().st_mtime >= self._launched_at - 1.0
                ):
                    return path.name.rsplit("_", 1)[-1]
        return None

    def wait_joined(self, cluster_nodes: Any, timeout: float = 90.0) -> RayWorkerNode:
        """Wait until the node is ALIVE in ``cluster_nodes()`` (a list of state-API node dicts);
        RayNodeError (after stopping the node) if it exits or does not join in ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_alive():
                tail = self.log_tail()
                self.stop()
                raise RayNodeError(
                    f"{self.name}: ray start exited before the node joined; log "
                    f"{self.log_path}:\n{tail}"
                )
            self.node_id = self.node_id or self.find_node_id()
            if self.node_id is not None:
                with contextlib.suppress(Exception):
                    states = {node["node_id"]: node["state"] for node in cluster_nodes()}
                    if states.get(self.node_id) == "ALIVE":
                        return self
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise RayNodeError(
            f"{self.name}: the node did not join {self.gcs_address} within {timeout} s; log:\n"
            f"{tail}"
        )

    # ------------------------------------------------------------------------------ state
    def is_alive(self) -> bool:
        """Whether the ``ray start --block`` process of this node runs."""
        if self._process is not None:
            return self._process.poll() is None
        if self.pid is None:
            return False
        with contextlib.suppress(psutil.Error, OSError):
            process = psutil.Process(self.pid)
            return (
                process.status() != psutil.STATUS_ZOMBIE
                and process.environ().get(INSTANCE_ENV_VAR) == self.marker
            )
        return False

    def processes(self) -> list[psutil.Process]:
        """Every process of this node still running (raylet, agents, workers)."""
        paths = (f"{self.temp_dir}/session_",) if self.temp_dir is not None else ()
        return processes_marked(self.marker, paths)

    # ------------------------------------------------------------------------------ stop
    def stop(self, *, force: bool = False, timeout: float = 40.0) -> None:
        """Stop the node and every process it started; ``force`` kills them all at once (a
        crash, as a lost machine looks to the cluster) instead of letting the raylet drain."""
        if force:
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
            for process in self.processes():
                with contextlib.suppress(psutil.Error):
                    process.kill()
        elif self.pid is not None and self.is_alive():
            # SIGTERM: ``ray start --block`` drains the node (up to 30 s) and stops its processes.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.is_alive():
                time.sleep(0.2)
        if self.pid is not None:
            terminate_process_group(self.pid, timeout=5.0)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        kill_processes(self.processes())
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._process = None
        if self.temp_dir is not None and not self.temp_dir.is_relative_to(self.state_dir):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the node's ``ray start`` output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------------------ records
    def to_record(self) -> dict[str, Any]:
        """What ``from_record`` needs to find and stop this node from another process."""
        return {
            "name": self.name,
            "pid": self.pid,
            "node_id": self.node_id,
            "instance_id": self.instance_id,
            "host": self.host,
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "ports": dict(self.ports),
            "temp_dir": str(self.temp_dir) if self.temp_dir is not None else None,
            "state_dir": str(self.state_dir),
            "gcs_address": self.gcs_address,
            "token_path": str(self.token_path),
            "log": str(self.log_path),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RayWorkerNode:
        """A handle on a node started by another process (``segplatform local node remove``)."""
        node = cls(
            record["state_dir"],
            name=record["name"],
            gcs_address=record["gcs_address"],
            token_path=record["token_path"],
            instance_id=record["instance_id"],
            host=record["host"],
            num_cpus=record.get("num_cpus"),
            num_gpus=record.get("num_gpus"),
        )
        node.ports = {name: int(port) for name, port in record["ports"].items()}
        node.pid = record.get("pid")
        node.node_id = record.get("node_id")
        node.temp_dir = Path(record["temp_dir"]) if record.get("temp_dir") else None
        return node

    def __repr__(self) -> str:
        return f"RayWorkerNode({self.name!r}, node_id={self.node_id!r}, pid={self.pid})"
