"""Helpers for tests that run the local platform (``segplatform local up``) as a user would:
the ``segplatform`` and ``ray`` commands as subprocesses with a minimal environment, a platform
started for a test module and stopped afterwards, and checks that nothing of it is left behind.

Test modules under ``tests/`` import it as ``tests.platform_support`` (pytest's importlib mode
imports ``tests`` as a package of the rootdir).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

VENV_BIN = Path(sys.executable).parent
# Variables that could point a client at another cluster or store; never passed to subprocesses.
FOREIGN_PREFIXES = ("RAY_", "AWS_", "MLFLOW_", "SEGPLATFORM_")


def clean_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: PATH (venv first), HOME, locale, plus ``extra``; nothing else."""
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def run_venv(
    args: list[str], *, env: dict[str, str], timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``args[0]`` from the venv's ``bin`` with ``args[1:]``, output captured as text."""
    return subprocess.run(
        [str(VENV_BIN / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``segplatform ARGS`` as a subprocess (env defaults to ours minus foreign RAY_/AWS_/...)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES)}
    return run_venv(["segplatform", *args], env=env, timeout=timeout)


def parse_exports(stdout: str) -> dict[str, str]:
    """The ``export KEY=VALUE`` lines of ``segplatform local up`` as a dict."""
    exports = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            key, _, value = shlex.split(line[len("export ") :])[0].partition("=")
            exports[key] = value
    return exports


@dataclass
class RunningPlatform:
    """A platform started by ``segplatform local up`` in a temporary state dir."""

    state_dir: Path
    up_output: subprocess.CompletedProcess[str]
    exports: dict[str, str]  # the ``export`` lines ``up`` printed
    state: dict[str, Any]  # state.json as written by ``up``
    home: Path  # an empty HOME for clients: no ~/.ray/auth_token, no ~/.aws

    def read_state(self) -> dict[str, Any]:
        """state.json as it is now (``local node add|remove`` change it)."""
        return json.loads((self.state_dir / "state.json").read_text())

    def diagnostics(self, lines: int = 60) -> str:
        """``local status --json`` and the end of the Ray head's log, for a failure message."""
        try:
            status = json.dumps(self.status_report(), indent=1)
        except (AssertionError, ValueError, subprocess.SubprocessError) as error:
            status = f"local status failed: {error}"
        log_path = self.state_dir / "ray" / "ray.log"
        try:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            tail = str(error)
        return f"--- local status\n{status}\n--- {log_path} (last {lines} lines)\n{tail}"

    def status_report(self) -> dict[str, Any]:
        """The report of ``segplatform local status --json`` (healthy or not)."""
        result = run_cli(["local", "status", "--state-dir", str(self.state_dir), "--json"])
        assert result.returncode in (0, 1), result.stdout + result.stderr
        return json.loads(result.stdout)


@contextlib.contextmanager
def platform_up(
    tmp_path_factory: pytest.TempPathFactory, name: str, options: list[str], timeout: float = 240
) -> Iterator[RunningPlatform]:
    """``segplatform local up OPTIONS`` in a new temporary directory ``name``; ``local down``
    afterwards, whatever happened (a no-op after a test's own ``down``)."""
    base = tmp_path_factory.mktemp(name)
    state_dir = base / "state"
    home = base / "home"
    home.mkdir()
    result = run_cli(["local", "up", "--state-dir", str(state_dir), *options], timeout=timeout)
    try:
        assert result.returncode == 0, f"local up failed:\n{result.stdout}\n{result.stderr}"
        state = json.loads((state_dir / "state.json").read_text())
        yield RunningPlatform(state_dir, result, parse_exports(result.stdout), state, home)
    finally:
        run_cli(["local", "down", "--state-dir", str(state_dir)])


def alive_nodes(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Node name -> node entry of the nodes a status report counts ALIVE."""
    return {node["name"]: node for node in report["nodes"] if node["state"] == "ALIVE"}


def s3_client(
    exports: dict[str, str], *, secret: str | None = None, max_attempts: int | None = None
) -> Any:
    """A boto3 S3 client for the platform's S3 server (``secret`` replaces the real one)."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {"s3": {"addressing_style": "path"}}
    if max_attempts is not None:
        options["retries"] = {"max_attempts": max_attempts}
    return boto3.client(
        "s3",
        endpoint_url=exports["AWS_ENDPOINT_URL"],
        aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret or exports["AWS_SECRET_ACCESS_KEY"],
        region_name=exports["AWS_DEFAULT_REGION"],
        config=Config(**options),
    )


def service_ports(state: dict[str, Any]) -> set[int]:
    """The ports of the S3 server, the MLflow server and the Ray head in ``state``."""
    services = state["services"]
    ports = {services["mlflow"]["port"], *services["ray_head"]["ports"].values()}
    return ports | set(services["s3"]["ports"].values())


def open_ports(ports: Iterable[int]) -> list[int]:
    """Those of ``ports`` that accept connections on 127.0.0.1."""
    found = []
    for port in sorted(ports):
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                found.append(port)
    return found


def leftover_processes(
    *,
    paths: Iterable[str] = (),
    ports: Iterable[int] = (),
    token_path: str | None = None,
    marker_prefix: str | None = None,
) -> list[str]:
    """``"PID COMMAND"`` of the processes (other than this one) whose command line mentions one
    of ``paths`` or ``ports`` (as ``=PORT`` or ``:PORT``), or whose environment has
    ``RAY_AUTH_TOKEN_PATH`` equal to ``token_path`` or an instance marker
    (``SEGPLATFORM_INSTANCE``) starting with ``marker_prefix``."""
    texts = [str(path) for path in paths]
    numbers = [str(port) for port in ports]
    port_pattern = re.compile(r"[=:](" + "|".join(numbers) + r")(?!\d)")
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            mentions = any(text in cmdline for text in texts)
            mentions = mentions or bool(numbers and port_pattern.search(cmdline))
            if not mentions and (token_path or marker_prefix):
                environ = process.environ()
                mentions = bool(token_path) and environ.get("RAY_AUTH_TOKEN_PATH") == token_path
                mentions = mentions or (
                    marker_prefix is not None
                    and environ.get("SEGPLATFORM_INSTANCE", "").startswith(marker_prefix)
                )
        except (psutil.Error, OSError):
            continue
        if mentions:
            found.append(f"{process.pid} {cmdline[:200]}")
    return found


def wait_for(
    condition: Callable[[], Any], timeout: float, message: str, poll_interval: float = 0.5
) -> Any:
    """The first truthy value of ``condition()`` within ``timeout`` s; AssertionError(message)
    if none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_interval)
    raise AssertionError(message)


# ---- the session's Ray clusters -------------------------------------------------------------

# The local platforms the tests share (``segplatform local up`` options). One logical CPU per
# node on the two-node platform, so that STRICT_SPREAD needs both nodes; four on the single
# node: two 0.5-CPU workers (or two one-worker trials) with CPU left for decoding. The two-node
# head's object store is capped (HEAD_OBJECT_STORE_MB) so that a dataset larger than it trains.
HEAD_OBJECT_STORE_MB = 80
PLATFORMS: dict[str, list[str]] = {
    "single-node": ["--num-cpus", "4"],
    "two-node": [
        "--nodes", "2", "--num-cpus", "1", "--timeout", "400",
        "--head-object-store-mb", str(HEAD_OBJECT_STORE_MB),
    ],
}  # fmt: skip
# Ray Train's controller polls its workers every 2 s by default, and every report and checkpoint
# commit waits for a poll; the tests' training runs poll every 0.5 s (what it changes is only how
# long those waits last): the in-process cluster has it in its environment, jobs submitted to a
# platform in their runtime environment (``job_runtime_env``).
TEST_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def job_runtime_env(**env_vars: str) -> str:
    """``--runtime-env-json`` of a job the tests submit: ``TEST_RAY_ENV`` plus ``env_vars``."""
    return json.dumps({"env_vars": {**TEST_RAY_ENV, **env_vars}})


class RayClusters:
    """The Ray clusters of one test session, at most one running at any time: the in-process
    cluster (``ray.init(address="local", num_cpus=4)``) or one of the ``PLATFORMS``.

    ``use(kind)`` stops whatever else runs and starts ``kind`` unless it is up already (a
    platform that a test brought down with ``local down`` is started afresh); ``use(None)``
    leaves no cluster running. Stopping a platform checks that ``local down`` left none of its
    processes or ports behind. ``tests/conftest.py`` orders the tests by the cluster they use,
    so each cluster starts once per session.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.factory = tmp_path_factory
        self.active: str | None = None
        self.platform: RunningPlatform | None = None
        self._platform_context: contextlib.AbstractContextManager[RunningPlatform] | None = None

    def use(self, kind: str | None) -> RunningPlatform | None:
        import ray

        if kind in PLATFORMS and self.active == kind and self.platform is not None:
            if (self.platform.state_dir / "state.json").exists():
                return self.platform
        elif (kind == "in-process" and self.active == kind and ray.is_initialized()) or (
            kind is None and self.active is None and not ray.is_initialized()
        ):
            return None
        self.stop()
        if kind == "in-process":
            os.environ.update(TEST_RAY_ENV)
            os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
        elif kind in PLATFORMS:
            context = platform_up(self.factory, kind, PLATFORMS[kind], timeout=450)
            self.platform = context.__enter__()
            self._platform_context = context
        elif kind is not None:
            raise ValueError(f"unknown Ray cluster {kind!r}")
        self.active = kind
        return self.platform

    def stop(self) -> None:
        """Stop the running cluster; a platform must leave nothing behind."""
        import ray

        if ray.is_initialized():  # ours, or one that a test's code started in this process
            ray.shutdown()
        platform, context = self.platform, self._platform_context
        self.platform = self._platform_context = None
        self.active = None
        if context is None or platform is None:
            return
        marker_prefix = f"{platform.state['instance_id']}/"
        context.__exit__(None, None, None)  # local down (a no-op after a test's own)
        left = leftover_processes(marker_prefix=marker_prefix)
        left += leftover_processes(paths=(platform.state_dir,))
        assert not left, f"local down left processes of {platform.state_dir}:\n" + "\n".join(left)
        assert open_ports(service_ports(platform.state)) == [], "local down left ports open"
