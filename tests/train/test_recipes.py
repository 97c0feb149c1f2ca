"""One recipe source: every entry point resolves the same run for the same architecture, data
and flags (``segplatform train``, ``jobs/train_<arch>.py``, ``segplatform sweep``, the sweep
jobs, ``recipe_config`` from Python), and ``--show-recipe`` says where each value comes from."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

import architectures
from segplatform.cli import main
from segplatform.train import recipe_config
from segplatform.train.recipes import PAPER, RECIPES, SCRATCH, resolve

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--data", "/d", "--workers", "2", "--batch-size", "4"]


def script_output(
    script: Path, argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch
) -> str:
    """The standard output of ``python SCRIPT ARGV`` run in this process (it must exit 0)."""
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert ended.value.code in (0, None), out
    return out


def command_output(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_every_architecture_has_its_recipes() -> None:
    assert set(RECIPES) == set(PAPER) == set(architectures.ARCHITECTURES)
    for arch, recipe in RECIPES.items():
        assert recipe.config.arch == arch and recipe.scratch is not None
        assert recipe.scratch.optimizer == SCRATCH["settings"]["optimizer"]
        assert recipe.scratch.momentum is None and recipe.scratch.grad_clip is not None
        # The paper's schedule length and crop stay in the from-scratch recipe.
        assert recipe.scratch.crop_size == recipe.config.crop_size
        assert recipe.scratch.max_iters == recipe.config.max_iters


@pytest.mark.parametrize("arch", sorted(architectures.ARCHITECTURES))
def test_train_command_job_script_sweep_and_python_resolve_the_same_run(
    arch: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = ["--show-recipe", *FLAGS]
    train = command_output(["train", "--arch", arch, *shown], capsys)
    job = script_output(ROOT / "jobs" / f"train_{arch}.py", shown, capsys, monkeypatch)
    sweep = command_output(["sweep", "--arch", arch, *shown], capsys)
    assert train == job == sweep
    line = train.splitlines()[0]
    assert line.startswith(f"recipe {arch}: from-scratch recipe: no --pretrained-backbone given")
    python = recipe_config(arch, data="/d", num_workers=2, batch_size=4)
    assert python.optimizer_settings() in line
    # From scratch: AdamW's lr for a total batch of 8 is the run's (2 workers x 4) as it is.
    assert python.optimizer == "adamw" and python.lr == pytest.approx(SCRATCH["settings"]["lr"])
    assert python.crop_size == RECIPES[arch].config.crop_size


@pytest.mark.parametrize(
    "given",
    [
        ["--pretrained-backbone", "/weights/r101.pth"],
        ["--arch-param", 'pretrained_backbone="/weights/r101.pth"'],
        ["--set", 'arch_params={"pretrained_backbone": "/weights/r101.pth"}'],
    ],
)
def test_a_pretrained_backbone_picks_the_papers_recipe_in_training_and_in_sweeps(
    given: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--arch", "pspnet", "--show-recipe", *FLAGS, *given]
    train = command_output(["train", *argv], capsys)
    sweep = command_output(["sweep", *argv], capsys)
    assert train == sweep
    assert train.startswith("recipe pspnet: paper recipe: the backbone starts from /weights/r101")
    paper = RECIPES["pspnet"]
    # SGD: the paper's lr for its total batch of 16, scaled linearly to 2 x 4 = 8.
    assert "SGD lr 0.005 momentum 0.9" in train.splitlines()[0]
    assert f"paper recipe's {paper.config.lr:g} for a total batch of 16, scaled linearly to 8" in (
        train
    )


def test_show_recipe_names_the_source_of_each_value(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"seed": 5, "arch_params": {"output_stride": 8}}')
    out = command_output(
        [
            "train", "--arch", "deeplab_v3", "--data", "/d", "--workers", "4", "--tiny",
            "--max-iters", "30", "--config", str(config), "--set", "log_every=3", "--show-recipe",
        ],
        capsys,
    )  # fmt: skip
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("  ")}
    assert rows["optimizer"].endswith("from-scratch recipe")
    assert rows["crop_size"].split()[1:] == ["64,64", "--tiny"]
    assert rows["max_iters"].split()[1:] == ["30", "option"]
    assert rows["seed"].split()[1:] == ["5", "--config", str(config)]
    assert rows["log_every"].split()[1:] == ["3", "--set"]
    # The --config file's arch_params merge over the recipe's; lr is scaled to 4 x 2 images.
    assert "'output_stride': 8" in rows["arch_params"]
    assert "scaled by the square root to 8" not in rows["lr"]  # 8 is the recipe's own batch
    assert rows["lr"].split()[1:3] == ["0.001", "from-scratch"]
    more = command_output(
        ["train", "--arch", "deeplab_v3", "--data", "/d", "--workers", "8", "--show-recipe"],
        capsys,
    )
    (lr,) = [line for line in more.splitlines() if line.split()[0] == "lr"]
    assert "from-scratch recipe's 0.001 for a total batch of 8, scaled by the square root" in lr


def test_an_sgd_setting_never_carries_into_adamw(capsys: pytest.CaptureFixture[str]) -> None:
    out = command_output(
        ["train", "--arch", "unet", "--recipe", "paper", "--optimizer", "adamw", *FLAGS,
         "--show-recipe"],
        capsys,
    )  # fmt: skip
    assert "AdamW lr" in out.splitlines()[0] and "betas (0.9, 0.999)" in out
    assert "note: the recipe's momentum 0.99 is SGD's; adamw runs without it" in out
    assert "note: the recipe's lr 0.01 was tuned for sgd, not adamw; give --lr" in out


def test_sweep_jobs_read_the_preset_spaces(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for arch in ("pspnet", "deeplab_v3"):
        job = script_output(
            ROOT / "jobs" / f"sweep_{arch}.py", ["--show-space"], capsys, monkeypatch
        )
        command = command_output(["sweep", "--arch", arch, "--show-space"], capsys)
        assert job == command and "lr:" in job


def test_an_unknown_architecture_is_refused_naming_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError, match=r"no recipe for 'unet3d'; architectures: deeplab_v1"):
        recipe_config("unet3d", data="/d")
    with pytest.raises(SystemExit):
        main(["train", "--arch", "unet3d", "--data", "/d"])
    assert "no recipe for 'unet3d'" in capsys.readouterr().err


def test_tiny_deeplab_v3_adapts_to_small_crops(capsys: pytest.CaptureFixture[str]) -> None:
    out = command_output(
        ["train", "--arch", "deeplab_v3", "--tiny", "--data", "/d", "--show-recipe"], capsys
    )
    (row,) = [line for line in out.splitlines() if line.split()[0] == "arch_params"]
    assert "'output_stride': 8, 'head_norm': False" in row and row.endswith("--tiny (recipe)")
    # A value given by hand still wins, key by key.
    config = recipe_config("deeplab_v3", data="/d", tiny=True, arch_params={"output_stride": 16})
    assert config.arch_params == {"output_stride": 16, "head_norm": False}


# What --tiny adds to each architecture's arch_params on small crops (the comment next to each
# recipe's "tiny" entry says why, with the measured figures).
TINY_ARCH_PARAMS = {
    "deeplab_v3": {"output_stride": 8, "head_norm": False},
    "deeplab_v1": {
        "backbone_norm": True,
        "fc6_rate": 2,
        "fc_channels": 256,
        "dropout": 0.0,
        "pool5a": False,
    },
}


@pytest.mark.parametrize("arch", sorted(TINY_ARCH_PARAMS))
def test_tiny_recipes_carry_their_small_crop_adjustments(arch: str) -> None:
    expected = TINY_ARCH_PARAMS[arch]
    assert recipe_config(arch, data="/d", tiny=True).arch_params == expected
    paper = recipe_config(arch, data="/d").arch_params  # without --tiny: the paper's model
    assert all(paper.get(key) != value for key, value in expected.items())
    # The adjusted tiny config builds (the knobs exist on the model's config).
    config = recipe_config(arch, data="/d", tiny=True)
    architectures.build_from_config(arch, config.model_config(num_classes=11))


def test_fcn32s_on_small_crops_carries_a_note_on_its_coarse_score_grid() -> None:
    layers = [("given", {"arch": "fcn32s", "data": "/d", "tiny": True, "crop_size": (96, 96)})]
    notes = resolve(layers).notes
    expected = (
        "note: FCN-32s scores on a stride-32 grid: a 96x96 crop gives 3x3 score cells, too "
        "coarse for objects under ~32 px; use fcn8s (or fcn16s), or crops of at least 256 px"
    )
    assert expected in notes
    # A note, not a refusal: the run resolves (tests train fcn32s with --tiny at 64 px).
    assert resolve([("given", {"arch": "fcn32s", "data": "/d", "tiny": True})]).config.tiny
    # A crop of 8x8 cells or more, and the finer variants, carry no such note.
    for arch, crop in (("fcn32s", (512, 512)), ("fcn32s", (256, 256)), ("fcn8s", (96, 96))):
        layers = [("given", {"arch": arch, "data": "/d", "tiny": True, "crop_size": crop})]
        assert not any("score cells" in note for note in resolve(layers).notes)
