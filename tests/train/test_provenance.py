"""The ``git_commit`` tag of a run: from the environment for uploaded job directories, else from
the checkout the code runs from, whatever the working directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from segplatform.train.run import GIT_COMMIT_ENV_VAR, git_commit

REPO = Path(__file__).resolve().parents[2]


def test_commit_of_the_checkout_holding_the_code_not_of_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(GIT_COMMIT_ENV_VAR, raising=False)
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    monkeypatch.chdir(other)  # a different (empty) repository: its HEAD does not resolve
    expected = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_commit() == expected


def test_environment_names_the_commit_of_an_uploaded_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GIT_COMMIT_ENV_VAR, " 0123abcd ")
    assert git_commit() == "0123abcd"
