"""Fixtures of the serving tests: a tiny model package, free ports, HTTP helpers, artifacts.

- ``tiny_package``: a U-Net (tiny config, "same" padding, 3 classes, random weights with a
  fixed seed) saved as a model package; loads in well under a second.
- ``artifacts_dir``: where tests leave files for people to look at (screenshots):
  ``$SEGPLATFORM_TEST_ARTIFACTS`` or ``outputs/test-artifacts`` in the repository.
- ``replica_pids(app)``: pids of the Serve replica processes of application ``app`` (their
  process title is ``ray::ServeReplica:APP:DEPLOYMENT``); tests use unique app names.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("background", "left", "right")
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def replica_pids(app_name: str, deployment: str = "SegmentationService") -> list[int]:
    """Pids of the live replica processes of ``app_name``'s ``deployment``."""
    from segplatform.serve.runner import replica_pids as find

    return find(app_name, deployment)


def write_tiny_package(directory: Path, seed: int = 0) -> str:
    import torch

    from architectures import ARCHITECTURES, build_from_config
    from segplatform.package import save_package

    torch.manual_seed(seed)
    config = ARCHITECTURES["unet"][0].tiny(padding="same", num_classes=len(CLASSES))
    model = build_from_config("unet", config).eval()
    return save_package(
        directory,
        model,
        "unet",
        config,
        classes=CLASSES,
        palette=PALETTE,
        normalization={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        metrics={"val_miou": 0.5},
    )


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_package(tmp_path_factory.mktemp("serve-package") / "unet")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(os.environ.get("SEGPLATFORM_TEST_ARTIFACTS", ROOT / "outputs" / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
