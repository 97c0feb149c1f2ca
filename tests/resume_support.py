"""Resume checked by state: a run that was interrupted and resumed must hold, at the same step,
the same training state as an uninterrupted run of the same seed and settings.

``checkpoint_state`` reads a checkpoint directory (local path or ``s3://``) as the worker wrote
it: the model package's weights (``model/model.safetensors``) and ``train_state.pt`` (step, the
optimizer, learning-rate schedule and every rank's RNG states; loaded with ``weights_only=True``).
``assert_same_state`` compares two of them field by field and names the first that differs.
On CPU the runs are bit-identical (gloo sums two ranks in a fixed order), so the default
tolerance is zero.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = re.compile(r"^checkpoint_step(\d{8})_")


@dataclass
class CheckpointState:
    where: str  # the checkpoint directory it was read from
    weights: dict[str, torch.Tensor]
    train_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.train_state["step"])


def checkpoints(
    run_uri: str, storage_options: dict[str, Any] | None = None
) -> dict[int, list[str]]:
    """Step -> the checkpoint directories (URIs) under the run directory ``run_uri`` that hold a
    train state (a resumed run may have written a second one for a step)."""
    import pyarrow.fs as pafs

    from segplatform.data import io as dio

    fs, root = dio.resolve(run_uri, storage_options)
    prefix = "s3://" if dio.is_s3(run_uri) else ""
    found: dict[int, list[str]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        match = CHECKPOINT_DIR.match(info.base_name)
        if not match or info.type != pafs.FileType.Directory:
            continue
        state = fs.get_file_info(dio.join(info.path, "train_state.pt"))
        if state.type == pafs.FileType.File:
            found.setdefault(int(match[1]), []).append(prefix + info.path)
    return {step: sorted(paths) for step, paths in sorted(found.items())}


def checkpoint_state(uri: str, storage_options: dict[str, Any] | None = None) -> CheckpointState:
    """The weights and train state of the checkpoint directory ``uri``."""
    import pyarrow.fs as pafs
    import safetensors.torch

    from segplatform.data import io as dio

    fs, path = dio.resolve(uri, storage_options)
    with tempfile.TemporaryDirectory(prefix="resume-check-") as local:
        pafs.copy_files(path, local, source_filesystem=fs)
        weights = safetensors.torch.load_file(str(Path(local) / "model" / "model.safetensors"))
        state = torch.load(Path(local) / "train_state.pt", weights_only=True)
    return CheckpointState(uri, weights, state)


def _differences(a: Any, b: Any, where: str, rtol: float, atol: float) -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        if a.is_floating_point():
            close = torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        else:
            close = torch.equal(a, b)
        if close:
            return []
        gap = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        return [f"{where}: differs (largest difference {gap:.3g})"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))[:6]} in one only"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}", rtol, atol)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b))
            for d in _differences(x, y, f"{where}[{i}]", rtol, atol)
        ]
    if isinstance(a, float) and isinstance(b, float):
        same = a == b or abs(a - b) <= atol + rtol * abs(b) or (a != a and b != b)
        return [] if same else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def state_differences(
    a: CheckpointState, b: CheckpointState, *, rtol: float = 0.0, atol: float = 0.0
) -> list[str]:
    """What differs between two checkpoints' weights, optimizer, schedule, grad scaler, RNG
    states, world size and resume fingerprint (empty: nothing)."""
    differences = _differences(a.weights, b.weights, "weights", rtol, atol)
    for field in ("optimizer", "scheduler", "scaler", "rng", "world_size", "fingerprint"):
        differences += _differences(a.train_state[field], b.train_state[field], field, rtol, atol)
    return differences


def assert_same_state(
    resumed: CheckpointState,
    reference: CheckpointState,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """The resumed run's weights, optimizer state, learning-rate schedule and RNG states equal
    the uninterrupted run's at the same step (within ``rtol``/``atol`` for floating tensors)."""
    assert resumed.step == reference.step, (resumed.where, resumed.step, reference.step)
    assert resumed.train_state["attempt"] > 1 or resumed.train_state["start_step"] > 0, (
        f"{resumed.where} was not resumed: attempt {resumed.train_state['attempt']}, "
        f"start step {resumed.train_state['start_step']}"
    )
    differences = state_differences(resumed, reference, rtol=rtol, atol=atol)
    assert not differences, (
        f"{resumed.where} (resumed) and {reference.where} (uninterrupted) differ at step "
        f"{resumed.step}:\n" + "\n".join(differences[:20])
    )
