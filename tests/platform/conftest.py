"""Fixtures for the platform tests: one local platform (Ray head, MLflow, SeaweedFS S3) started
with ``segplatform local up`` for a module (helpers in ``tests/platform_support.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.platform_support import RunningPlatform, platform_up


@pytest.fixture(scope="module")
def local_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    with platform_up(tmp_path_factory, "local", ["--num-cpus", "2"]) as platform:
        yield platform
