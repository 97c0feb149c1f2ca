"""An MLflow tracking server on loopback: SQLite backend store, one worker, artifacts proxied.

``MLflowServer(root_dir).start()`` runs ``mlflow server`` as its own process group with

- the run/registry store in ``root_dir/mlflow.db`` (SQLite; the server creates the schema once,
  so concurrent clients never race on the first migration);
- ``--artifacts-destination``: ``root_dir/artifacts`` by default, or any URI such as
  ``s3://bucket/prefix`` (give the server the S3 endpoint and keys through ``env``, e.g.
  ``MLFLOW_S3_ENDPOINT_URL`` and the ``AWS_*`` variables). Clients upload and download through the
  server (``mlflow-artifacts:/``) and need no storage credentials themselves;
- ``--workers 1`` and ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: ready in ~6 s with ~0.5 GB,
  instead of ~17 s and ~2.7 GB with the defaults;
- output in ``root_dir/mlflow.log``.

``start()`` returns once ``GET /health`` answers; ``stop()`` terminates the process group.
"""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from segplatform.services.process import (
    INSTANCE_ENV_VAR,
    ServiceProcess,
    port_is_open,
    send_signal,
    terminate_process_group,
    venv_executable,
    wait_while,
)
from segplatform.services.ray_head import free_port


class MLflowServerError(RuntimeError):
    """The MLflow server could not be started."""


class MLflowServer:
    """One ``mlflow server`` process on ``host:port`` (a free port when ``port`` is None)."""

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        artifacts_destination: str | None = None,
        *,
        env: dict[str, str] | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.root_dir = Path(root_dir).resolve()
        self.host = host
        self.port = port
        self.artifacts_destination = artifacts_destination or str(self.root_dir / "artifacts")
        self.extra_env = dict(env or {})
        # Marks the server's processes (environment variable INSTANCE_ENV_VAR).
        self.marker = f"{instance_id}/mlflow" if instance_id else None
        self.db_path = self.root_dir / "mlflow.db"
        self.log_path = self.root_dir / "mlflow.log"
        self.pid: int | None = None
        self._service = ServiceProcess(self.log_path, tail_lines=30)

    @property
    def tracking_uri(self) -> str:
        """``http://HOST:PORT`` (``MLFLOW_TRACKING_URI`` for clients)."""
        if self.port is None:
            raise MLflowServerError("the MLflow server has not been started")
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        return [
            venv_executable("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.db_path}",
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def launch(self) -> MLflowServer:
        """Start the server process without waiting; ``wait_ready`` waits."""
        if self._service.running():
            return self
        self.root_dir.mkdir(parents=True, exist_ok=True)
        if not self.artifacts_destination.partition("://")[1]:
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        env = dict(os.environ)
        env.update(self.extra_env)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        if self.marker:
            env[INSTANCE_ENV_VAR] = self.marker
        self.pid = self._service.launch(self._command(), cwd=self.root_dir, env=env)
        return self

    def wait_ready(self, timeout: float = 90.0) -> MLflowServer:
        """Wait for ``GET /health``; MLflowServerError with the log tail if it never answers."""
        self._service.wait_ready(
            self.healthy,
            timeout=timeout,
            poll_interval=0.3,
            stop=self.stop,
            error=MLflowServerError,
            exited=f"mlflow server exited during start-up; log {self.log_path}",
            timed_out=(
                f"mlflow server did not answer /health within {timeout} s; log {self.log_path}"
            ),
        )
        return self

    def start(self, timeout: float = 90.0) -> MLflowServer:
        """``launch()`` then ``wait_ready()``."""
        return self.launch().wait_ready(timeout)

    def healthy(self, timeout: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200."""
        if self.port is None:
            return False
        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=timeout) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def is_alive(self) -> bool:
        """Whether the server's process (group leader) runs."""
        if self._service.popen is not None:
            return self._service.running()
        if self.pid is None:
            return False
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server's process group: SIGTERM, then SIGKILL once the HTTP port is
        closed (``mlflow server`` itself idles ~5 s after its uvicorn child has exited) or after
        ``timeout``."""
        if self.pid is not None:
            send_signal(self.pid, signal.SIGTERM, group=True)
            wait_while(
                lambda: self.port is not None and port_is_open(self.host, self.port),
                timeout,
                0.1,
            )
            terminate_process_group(self.pid, timeout=2.0)
        self._service.release()

    def to_record(self) -> dict[str, Any]:
        """What ``from_record`` needs to find and stop this server from another process."""
        return {
            "pid": self.pid,
            "host": self.host,
            "port": self.port,
            "tracking_uri": self.tracking_uri,
            "artifacts_destination": self.artifacts_destination,
            "backend_store_uri": f"sqlite:///{self.db_path}",
            "log": str(self.log_path),
        }

    @classmethod
    def from_record(cls, root_dir: str | os.PathLike[str], record: dict[str, Any]) -> MLflowServer:
        """A handle on a server started by another process."""
        server = cls(root_dir, record["host"], record["port"], record["artifacts_destination"])
        server.pid = record.get("pid")
        return server

    def __enter__(self) -> MLflowServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.tracking_uri if self.port is not None else "not started"
        return f"MLflowServer({str(self.root_dir)!r}, {where})"
