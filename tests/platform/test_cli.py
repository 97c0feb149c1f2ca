"""The ``segplatform`` command line builds only the parser of the command it runs: a command that
needs no model (``local``, ``tracking``, ``serve --help``) never imports torch, and the top-level
help still lists every command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from segplatform.cli import COMMAND_MODULES

PROBE = """
import sys
from segplatform.cli import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules, "exit", code)
"""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120
    )


def test_local_status_does_not_import_torch(tmp_path: Path) -> None:
    result = _run("local", "status", "--state-dir", str(tmp_path / "none"), "--json")
    assert '"up": false' in result.stdout, result.stdout + result.stderr
    assert "torch imported: False exit 3" in result.stdout, result.stdout + result.stderr


def test_top_level_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "segplatform", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^    ([a-z]+)\b", result.stdout, re.MULTILINE))
    assert set(COMMAND_MODULES) | {"predict"} <= listed, listed
    # ``predict`` is registered by the ``evaluate`` module: a name that is no module of its own
    # gets the parser of every command.
    predict = _run("predict", "--help")
    assert "usage: segplatform predict" in predict.stdout, predict.stdout + predict.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "segplatform", "nosuch"], capture_output=True, text=True, timeout=120
    )
    assert unknown.returncode == 2 and "invalid choice: 'nosuch'" in unknown.stderr
