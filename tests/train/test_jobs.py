"""Every ``jobs/train_<arch>.py`` runs one tiny iteration through the real training service.

The jobs run in Ray Train's local mode (``--workers 0``: the same loop in this process, no worker
actors) so that twelve architectures fit the test budget; the distributed path is covered by
``test_train_local.py``. Mask R-CNN trains on a dataset with instance maps.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import architectures
from segplatform.train.cli_args import job_main
from segplatform.train.recipes import RECIPES

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"


def run_job_script(arch: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``python jobs/train_<arch>.py ARGV`` in this process (its ``__main__``); the exit status."""
    script = JOBS_DIR / f"train_{arch}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(script), run_name="__main__")
    return int(ended.value.code or 0)


def test_one_job_per_registry_entry() -> None:
    jobs = {p.stem.removeprefix("train_") for p in JOBS_DIR.glob("train_*.py")}
    assert jobs == set(architectures.ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(architectures.ARCHITECTURES))
def test_job_has_the_papers_recipe_and_a_from_scratch_one(arch: str) -> None:
    from segplatform.train.cli_args import build_parser, config_from_args

    recipe = RECIPES[arch]
    assert recipe.config.arch == arch and recipe.scratch is not None
    assert recipe.description and recipe.reference_batch >= 1
    parser = build_parser(defaults=recipe.config)
    argv = ["--data", "/d", "--workers", "4", "--batch-size", "1"]
    # With a pretrained backbone: the paper's recipe, its lr scaled linearly with the batch.
    paper, batch, why = recipe.choose("/weights/backbone.pth")
    assert paper is recipe.config and why.startswith("paper recipe")
    config = config_from_args(parser.parse_args(argv), base=paper, reference_batch=batch)
    assert config.lr == pytest.approx(recipe.config.lr * 4 / recipe.reference_batch)
    assert config.crop_size == recipe.config.crop_size
    # Without one: the from-scratch recipe, AdamW (no SGD momentum), square-root lr scaling.
    scratch, batch, why = recipe.choose(None)
    assert why.startswith("from-scratch recipe: no --pretrained-backbone given")
    config = config_from_args(parser.parse_args(argv), base=scratch, reference_batch=batch)
    assert config.optimizer == "adamw" and config.momentum is None
    assert config.lr == pytest.approx(scratch.lr * (4 / recipe.scratch_reference_batch) ** 0.5)
    assert config.grad_clip is not None and config.head_lr_mult == 1.0
    assert recipe.choose(None, "paper")[0] is recipe.config


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(architectures.ARCHITECTURES))
def test_job_runs_one_tiny_iteration(
    arch: str,
    ray_cluster: None,
    shapes_dataset: str,
    instances_dataset: str,
    storage: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = instances_dataset if arch == "mask_rcnn" else shapes_dataset
    argv = [
        "--data", data, "--tiny", "--workers", "0", "--max-iters", "1", "--storage", storage,
        "--name", f"job-{arch}", "--set", "overlay_samples=0",
    ]  # fmt: skip
    assert run_job_script(arch, argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert f"recipe {arch}: from-scratch recipe: no --pretrained-backbone given" in out
    assert "run job-" in out
    checkpoints = list((Path(storage) / f"job-{arch}").glob("checkpoint_step00000001_*"))
    assert len(checkpoints) == 1
    meta = json.loads((checkpoints[0] / "model" / "model.json").read_text())
    assert meta["architecture"] == arch and meta["extra"]["step"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "{missing}"], "not a dataset: the location does not exist"),
        (["--data", "{shapes}", "--train-split", "test"], "has no split 'test'"),
        (["--data", "{shapes}", "--arch-param", "num_classes=7"], "num_classes=7 but"),
        (["--data", "{shapes}", "--batch-size", "500"], "too few for 1 workers × batch_size 500"),
    ],
)
def test_a_run_the_dataset_cannot_serve_is_refused_before_ray_starts(
    argv: list[str],
    message: str,
    shapes_dataset: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_ray_cluster: None,
) -> None:
    import ray

    values = {"missing": str(tmp_path / "missing"), "shapes": shapes_dataset}
    argv = [arg.format(**values) for arg in argv]
    argv += ["--tiny", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", "refused"]
    assert job_main("unet", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run refused refused: ") and message in err, err
    assert not ray.is_initialized()  # no Ray cluster was started for it
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_channels_last_training_writes_a_package_that_loads(
    ray_cluster: None, shapes_dataset: str, storage: str
) -> None:
    from segplatform.package import load_package

    argv = [
        "--data", shapes_dataset, "--tiny", "--workers", "0", "--max-iters", "1",
        "--storage", storage, "--name", "nhwc", "--channels-last", "--set", "overlay_samples=0",
    ]  # fmt: skip
    assert job_main("segnet", argv) == 0  # max-unpooling indices in NHWC
    (checkpoint,) = (Path(storage) / "nhwc").glob("checkpoint_step00000001_*")
    model, meta = load_package(checkpoint / "model")
    assert meta.architecture == "segnet"
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 32, 32))["out"]
    assert logits.shape == (1, len(meta.classes), 32, 32) and torch.isfinite(logits).all()


def test_a_dashboard_url_as_ray_address_is_refused_before_ray_starts(
    shapes_dataset: str, tmp_path: Path
) -> None:
    """``ray.init`` cannot join through a dashboard URL (what ``ray job submit`` takes); one
    that is not the local platform's is refused with the way out, before any Ray starts."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "SEGPLATFORM_HOME": str(tmp_path / "no-platform"),
        "RAY_ADDRESS": "http://127.0.0.1:8265",
    }
    command = [
        sys.executable, str(JOBS_DIR / "train_unet.py"), "--data", shapes_dataset, "--tiny",
        "--workers", "2", "--name", "dash", "--storage", str(tmp_path / "runs"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        "error: run dash refused: RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard URL"
        in done.stderr
    )
    assert not (tmp_path / "runs").exists()
