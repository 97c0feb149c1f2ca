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
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from segplatform.services.process import (
    ServiceProcess,
    kill_processes,
    marked_process_alive,
    processes_marked,
    send_signal,
)
from segplatform.services.ray_head import (
    ray_ports,
    ray_start_command,
    ray_start_env,
    ray_temp_dir,
    remove_ray_temp_dir,
    stop_ray_start,
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
        self._service = ServiceProcess(self.log_path, tail_lines=40)
        self._launched_at = 0.0  # time.time() of launch()

    # ------------------------------------------------------------------------------ start
    def _command(self) -> list[str]:
        options = [
            "--block",
            f"--address={self.gcs_address}",
            f"--node-ip-address={self.host}",
            f"--node-manager-port={self.ports['node_manager']}",
            f"--object-manager-port={self.ports['object_manager']}",
            f"--dashboard-agent-listen-port={self.ports['dashboard_agent']}",
            f"--dashboard-agent-grpc-port={self.ports['dashboard_agent_grpc']}",
            f"--runtime-env-agent-port={self.ports['runtime_env_agent']}",
            f"--metrics-export-port={self.ports['metrics_export']}",
        ]
        return ray_start_command(
            options, temp_dir=self.temp_dir, num_cpus=self.num_cpus, num_gpus=self.num_gpus
        )

    def launch(self) -> RayWorkerNode:
        """Start ``ray start --address ... --block`` without waiting; ``wait_joined`` waits."""
        if self._service.running():
            return self
        if not self.token_path.is_file():
            raise RayNodeError(f"{self.name}: the head's token file {self.token_path} is missing")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = ray_temp_dir(self.state_dir, "segp-node-")
        self.ports.update(ray_ports(self.host, NODE_PORT_NAMES))
        env = ray_start_env(
            self.extra_env, token_path=self.token_path, address=self.gcs_address, marker=self.marker
        )
        self._launched_at = time.time()
        self.pid = self._service.launch(self._command(), cwd=self.state_dir, env=env)
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
        self._service.wait_ready(
            lambda: self._joined(cluster_nodes),
            timeout=timeout,
            poll_interval=0.5,
            stop=self.stop,
            error=RayNodeError,
            exited=f"{self.name}: ray start exited before the node joined; log {self.log_path}",
            timed_out=(
                f"{self.name}: the node did not join {self.gcs_address} within {timeout} s; log"
            ),
            has_exited=lambda: not self.is_alive(),
        )
        return self

    def _joined(self, cluster_nodes: Any) -> bool:
        """Whether the cluster counts this node ALIVE (False while its id is unknown)."""
        self.node_id = self.node_id or self.find_node_id()
        if self.node_id is not None:
            with contextlib.suppress(Exception):
                states = {node["node_id"]: node["state"] for node in cluster_nodes()}
                return states.get(self.node_id) == "ALIVE"
        return False

    # ------------------------------------------------------------------------------ state
    def is_alive(self) -> bool:
        """Whether the ``ray start --block`` process of this node runs."""
        if self._service.popen is not None:
            return self._service.running()
        return self.pid is not None and marked_process_alive(self.pid, self.marker)

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
                send_signal(self.pid, signal.SIGKILL, group=True)
            for process in self.processes():
                with contextlib.suppress(psutil.Error):
                    process.kill()
        # Orderly: on SIGTERM ``ray start --block`` drains the node (up to 30 s) and stops its
        # processes.
        stop_ray_start(
            self._service,
            self.pid,
            first_signal=None if force else signal.SIGTERM,
            alive=self.is_alive,
            timeout=timeout,
        )
        kill_processes(self.processes())
        remove_ray_temp_dir(self.temp_dir, self.state_dir)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the node's ``ray start`` output."""
        return self._service.log_tail(lines)

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
