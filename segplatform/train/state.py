"""Train state and checkpoints: what a worker needs to continue a run exactly where it stopped.

A checkpoint directory holds

- ``model/``: the model package (``segplatform.package``: ``model.json`` +
  ``model.safetensors``), which is what evaluation, prediction, serving and the registry use;
- ``train_state.pt``: ``TrainState`` (step, attempt, best mIoU), the optimizer, scheduler and
  grad-scaler states and every rank's RNG states; only tensors and plain containers, so it loads
  with ``torch.load(weights_only=True)`` (nothing is unpickled);
- ``fingerprint.json``: the resume fingerprint (``segplatform.train.plan``), which the driver reads
  before a resumed run starts.

Weights load strictly: a checkpoint whose tensors do not match the model exactly is an error.
The data position needs no state of its own: the step alone says which epoch and which batch come
next (``segplatform.train.batches``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segplatform.train.plan import FINGERPRINT_FILE

__all__ = [
    "MODEL_DIR",
    "TRAIN_STATE",
    "TrainState",
    "latest_fingerprint",
    "load_checkpoint",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "write_train_state",
]

TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"


@dataclass
class TrainState:
    """Where a worker is in the run."""

    step: int = 0  # optimizer steps done
    attempt: int = 1  # 1 + restarts (a restart after a lost worker or a resubmission)
    best_miou: float = math.nan  # best validation mIoU so far
    start_step: int = 0  # the step this attempt started from

    @classmethod
    def resumed(cls, saved: dict[str, Any]) -> TrainState:
        """The state of a new attempt that continues from a checkpoint's ``saved`` state."""
        step = int(saved["step"])
        return cls(
            step=step,
            attempt=int(saved.get("attempt", 1)) + 1,
            best_miou=float(saved.get("best_miou", math.nan)),
            start_step=step,
        )


# ---- RNG state (only tensors and primitive containers, for weights_only loading) ------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- checkpoints ----------------------------------------------------------------------------


def write_train_state(
    directory: Path,
    state: TrainState,
    *,
    world_size: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    rngs: list[dict[str, Any]],
    fingerprint: dict[str, Any],
) -> None:
    """``train_state.pt`` and ``fingerprint.json`` into ``directory`` (the package goes beside)."""
    payload = {
        **asdict(state),
        "world_size": world_size,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "rng": rngs,
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    torch.save(payload, directory / TRAIN_STATE)
    (directory / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1, sort_keys=True))


def load_checkpoint(model: nn.Module, directory: Path, device: torch.device) -> dict[str, Any]:
    """Load the package's weights into ``model`` (strictly) and return the saved train state."""
    import safetensors.torch

    from segplatform.package import WEIGHTS

    missing, unexpected = safetensors.torch.load_model(
        model, str(directory / MODEL_DIR / WEIGHTS), strict=False
    )
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {directory.name} does not match the model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return torch.load(directory / TRAIN_STATE, map_location=device, weights_only=True)


def latest_fingerprint(
    run_uri: str, storage_options: dict[str, Any] | None
) -> tuple[str, dict[str, Any]] | None:
    """``(checkpoint name, fingerprint)`` of the run's latest checkpoint, or None (a new run)."""
    import pyarrow.fs as pafs

    from segplatform.data import io as dio

    fs, root = dio.resolve(run_uri, storage_options)
    selector = pafs.FileSelector(root, allow_not_found=True)
    names = sorted(
        info.base_name
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_step")
    )
    for name in reversed(names):
        path = dio.join(dio.join(root, name), FINGERPRINT_FILE)
        try:
            with fs.open_input_stream(path) as stream:
                return name, json.loads(stream.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            continue  # a checkpoint still uploading, or one of an older format
    return None
