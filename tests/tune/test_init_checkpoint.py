"""``TrainConfig.init_checkpoint``: a new run starts from another run's weights (what a PBT clone
does), with its own step counter; Ray Train local mode keeps it to seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segplatform.train import TrainConfig, run


def weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(Path(checkpoint_dir) / "model" / "model.safetensors"))


def test_new_run_starts_from_the_given_checkpoint(
    ray_cluster: None, tmp_path: Path, tiny_dataset
) -> None:
    import architectures
    from segplatform.train.run import best_checkpoint
    from segplatform.train.state import seed_everything

    data = str(tmp_path / "data")
    tiny_dataset(data)
    common = {
        "arch": "unet",
        "tiny": True,
        "arch_params": {"padding": "same"},
        "data": data,
        "crop_size": (32, 32),
        "batch_size": 2,
        "num_workers": 0,
        "storage_path": str(tmp_path / "runs"),
        "overlay_samples": 0,
        "loader_tasks": 0,
    }
    first = run(TrainConfig(**common, name="donor", max_iters=2, lr=0.05))
    donor, _ = best_checkpoint(first)
    # lr 1e-12: the clone's single step leaves the weights it started from.
    clone = TrainConfig(**common, name="clone", max_iters=1, lr=1e-12, init_checkpoint=donor.path)
    result = run(clone)
    assert result.metrics["step"] == 1 and result.metrics["start_step"] == 0
    cloned, _ = best_checkpoint(result)
    seed_everything(clone.seed)
    fresh = architectures.build_from_config("unet", clone.model_config(num_classes=3)).state_dict()
    started, ended = weights(donor.path), weights(cloned.path)
    changed = [k for k in started if k in fresh and not torch.equal(started[k], fresh[k])]
    assert changed, "the donor's training changed no weight"
    for key, value in started.items():
        assert torch.allclose(ended[key].float(), value.float(), atol=1e-6), key
    with pytest.raises(ValueError, match="init_checkpoint"):
        TrainConfig(**common, init_checkpoint="")
