"""Fixtures for the platform tests: the ``segplatform`` CLI run as a subprocess, and one local
platform (Ray head, MLflow, SeaweedFS S3) started with ``segplatform local up`` for a module."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
# Variables that could point a client at another cluster or store; never passed to subprocesses.
_FOREIGN_PREFIXES = ("RAY_", "AWS_", "MLFLOW_", "SEGPLATFORM_")


def clean_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: PATH (venv first), HOME, locale, plus ``extra``; nothing else."""
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``segplatform ARGS`` as a subprocess (env defaults to ours minus foreign RAY_/AWS_/...)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    return subprocess.run(
        [str(VENV_BIN / "segplatform"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_exports(stdout: str) -> dict[str, str]:
    """The ``export KEY=VALUE`` lines of ``segplatform local up`` as a dict."""
    exports = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            key, _, value = shlex.split(line[len("export ") :])[0].partition("=")
            exports[key] = value
    return exports


@pytest.fixture(scope="session")
def cli() -> object:
    """``run_cli``: runs ``segplatform ARGS`` as a subprocess."""
    return run_cli


@pytest.fixture(scope="session")
def client_env() -> object:
    """``clean_env``: a minimal environment for client subprocesses."""
    return clean_env


@dataclass
class RunningPlatform:
    """A platform started by ``segplatform local up`` in a temporary state dir."""

    state_dir: Path
    up_output: subprocess.CompletedProcess[str]
    exports: dict[str, str]
    state: dict  # state.json as written by ``up``
    home: Path  # an empty HOME for clients (no ~/.ray/auth_token)


@pytest.fixture(scope="module")
def local_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    base = tmp_path_factory.mktemp("local")
    state_dir = base / "state"
    home = base / "home"
    home.mkdir()
    result = run_cli(["local", "up", "--state-dir", str(state_dir), "--num-cpus", "2"])
    try:
        assert result.returncode == 0, f"local up failed:\n{result.stdout}\n{result.stderr}"
        state = json.loads((state_dir / "state.json").read_text())
        yield RunningPlatform(state_dir, result, parse_exports(result.stdout), state, home)
    finally:
        # Whatever a test did, leave no process behind (a no-op after a successful `down`).
        run_cli(["local", "down", "--state-dir", str(state_dir)])
