"""TrainConfig validation, serialization and the shared command line (no Ray)."""

from __future__ import annotations

import json

import pytest

from segplatform.train.cli_args import build_parser, config_from_args
from segplatform.train.config import TrainConfig
from segplatform.train.recipes import TINY_PRESET, JobRecipe


def test_defaults_round_trip_through_dict_and_json() -> None:
    config = TrainConfig(arch="pspnet", data="/d", crop_size=(64, 96), class_weights=[1, 2, 3])
    assert config.crop_size == (64, 96)
    assert config.class_weights == (1.0, 2.0, 3.0)
    assert config.name.startswith("pspnet-")
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"loss": "focal"}, "loss"),
        ({"max_iters": None, "epochs": None}, "max_iters"),
        ({"max_iters": 10, "epochs": 2}, "max_iters"),
        ({"batch_size": 0}, "batch_size"),
        ({"crop_size": (4, 4)}, "crop_size"),
        ({"scale_range": (2.0, 1.0)}, "scale_range"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"optimizer": "adamw", "momentum": 0.99}, "momentum"),
        ({"optimizer": "sgd", "betas": (0.9, 0.999)}, "betas"),
        ({"optimizer": "adamw", "betas": (0.9,)}, "betas"),
        ({"momentum": 1.0}, "momentum"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"loader_tasks": -1}, "loader_tasks"),
        ({"amp": "fp16"}, "amp"),
        ({"class_weights": "inverse"}, "class_weights"),
        ({"promote": "sometimes"}, "promote"),
        ({"name": "bad name/with slash"}, "name"),
        ({"arch": "no_such_net"}, "arch"),
        ({"arch_params": {"no_such_field": 1}}, "arch_params"),
        ({"eval_recipe": {"mode": "tiles"}}, "eval_recipe"),
        ({"fail_rank": 2, "num_workers": 2}, "fail_rank"),
        ({"mean": (0.5,), "std": None}, "mean"),
    ],
)
def test_invalid_values_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}"):
        TrainConfig(**changes)


def test_optimizer_settings_belong_to_their_optimizer() -> None:
    sgd = TrainConfig(optimizer="sgd", momentum=0.99)
    assert sgd.resolved_momentum() == 0.99 and "momentum 0.99" in sgd.optimizer_settings()
    adamw = TrainConfig(optimizer="adamw", lr=1e-3)
    assert adamw.resolved_betas() == (0.9, 0.999)
    assert adamw.optimizer_settings().startswith("AdamW lr 0.001 betas (0.9, 0.999)")
    assert TrainConfig(optimizer="adamw", betas=[0.8, 0.99]).resolved_betas() == (0.8, 0.99)


def test_storage_credentials_are_redacted_in_to_dict() -> None:
    options = {"endpoint_url": "http://127.0.0.1:9000", "key": "AKIA1", "secret": "s3cr3t"}
    config = TrainConfig(storage_options={**options, "session_token": "tok"})
    shown = config.to_dict()
    assert shown["storage_options"] == {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "***",
        "secret": "***",
        "session_token": "***",
    }
    assert "s3cr3t" not in json.dumps(shown) and "AKIA1" not in json.dumps(shown)
    assert config.to_dict(secrets=True)["storage_options"]["secret"] == "s3cr3t"


def test_unknown_keys_are_rejected_with_their_source() -> None:
    with pytest.raises(ValueError, match=r"run\.json: unknown TrainConfig field\(s\) lr_mult"):
        TrainConfig.from_dict({"lr_mult": 2}, source="run.json")


def test_model_config_uses_tiny_and_arch_params() -> None:
    config = TrainConfig(arch="deeplab_v3", tiny=True, arch_params={"output_stride": 8})
    model_config = config.model_config(num_classes=5)
    assert model_config.output_stride == 8 and model_config.num_classes == 5


def test_normalization_follows_in_channels() -> None:
    config = TrainConfig()
    assert len(config.normalization(3)["mean"]) == 3
    grey = config.normalization(1)
    assert grey["mean"] == [pytest.approx((0.485 + 0.456 + 0.406) / 3)]
    custom = TrainConfig(mean=(0.5,), std=(0.25,))
    assert custom.normalization(3) == {"mean": [0.5] * 3, "std": [0.25] * 3}


def test_cpus_per_worker_default_leaves_cpu_for_ray_data() -> None:
    assert TrainConfig().resolved_cpus_per_worker() == 0.5
    assert TrainConfig(use_gpu=True).resolved_cpus_per_worker() == 4.0


def test_cli_overrides_and_precedence(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5, "batch_size": 4, "seed": 3}))
    parser = build_parser()
    args = parser.parse_args(
        [
            "--arch", "unet", "--data", "/data", "--config", str(path), "--batch-size", "6",
            "--epochs", "3", "--arch-param", "padding=\"same\"", "--set", "log_every=7",
            "--amp", "none", "--gpu", "--workers", "4", "--crop-size", "96,128",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.arch, config.data, config.batch_size, config.lr) == ("unet", "/data", 6, 0.5)
    assert config.epochs == 3 and config.max_iters is None
    assert config.arch_params == {"padding": "same"}
    assert config.log_every == 7 and config.seed == 3 and config.amp is None
    assert config.use_gpu and config.num_workers == 4 and config.crop_size == (96, 128)


def test_job_recipe_scales_lr_with_total_batch_unless_given() -> None:
    recipe = JobRecipe(
        config=TrainConfig(arch="pspnet", batch_size=2, lr=0.01, max_iters=100), reference_batch=16
    )
    parser = build_parser(defaults=recipe.config)
    scaled = config_from_args(
        parser.parse_args(["--data", "/d", "--workers", "8", "--grad-accum", "2"]),
        base=recipe.config,
        reference_batch=recipe.reference_batch,
    )
    assert scaled.lr == pytest.approx(0.02)  # 2 × 8 × 2 = 32 images = 2 × the paper's 16
    given = config_from_args(
        parser.parse_args(["--data", "/d", "--workers", "8", "--lr", "0.1"]),
        base=recipe.config,
        reference_batch=16,
    )
    assert given.lr == 0.1
    tiny = config_from_args(
        parser.parse_args(["--data", "/d", "--tiny", "--max-iters", "3"]),
        base=recipe.config,
        reference_batch=16,
    )
    assert tiny.tiny and tiny.crop_size == TINY_PRESET["crop_size"] and tiny.max_iters == 3


def test_recipe_momentum_is_dropped_for_adamw_with_a_note() -> None:
    recipe = TrainConfig(arch="unet", optimizer="sgd", momentum=0.99, lr=0.01)
    parser = build_parser(defaults=recipe)
    notes: list[str] = []
    config = config_from_args(
        parser.parse_args(["--data", "/d", "--optimizer", "adamw", "--lr", "1e-3"]),
        base=recipe,
        reference_batch=1,
        notes=notes,
    )
    assert config.optimizer == "adamw" and config.momentum is None
    assert config.resolved_betas() == (0.9, 0.999)  # never the recipe's 0.99
    assert notes == ["note: the recipe's momentum 0.99 is SGD's; adamw runs without it"]
    with pytest.raises(ValueError, match=r"TrainConfig\.momentum: is SGD's setting"):
        config_from_args(
            parser.parse_args(["--data", "/d", "--optimizer", "adamw", "--momentum", "0.9"]),
            base=recipe,
            reference_batch=1,
        )
    betas = config_from_args(
        parser.parse_args(["--data", "/d", "--optimizer", "adamw", "--betas", "0.8,0.95"]),
        base=recipe,
        reference_batch=1,
    )
    assert betas.betas == (0.8, 0.95)


def test_a_config_file_value_is_as_explicit_as_an_option(tmp_path) -> None:
    recipe = TrainConfig(arch="pspnet", batch_size=2, lr=0.01, max_iters=100)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.003}))
    parser = build_parser(defaults=recipe)
    args = parser.parse_args(["--data", "/d", "--workers", "8", "--config", str(path)])
    config = config_from_args(args, base=recipe, reference_batch=16)
    assert config.lr == 0.003  # not rescaled to the total batch


def test_cli_error_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        config_from_args(parser.parse_args(["--loss", "ce", "--lr", "-1"]), parser=parser)
    assert "TrainConfig.lr" in capsys.readouterr().err


def test_only_controller_storage_errors_trigger_a_resume() -> None:
    from ray.train import ControllerError

    from segplatform.train.run import _is_storage_failure

    assert _is_storage_failure(ControllerError(OSError("AWS Error NETWORK_CONNECTION")))
    assert not _is_storage_failure(ControllerError(ValueError("bad config")))
    assert not _is_storage_failure(OSError("a worker's own error"))
