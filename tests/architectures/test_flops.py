"""The parameter/MAC counter on hand-computable networks, on every registry entry, and its CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from architectures import ARCHITECTURES, build_from_config
from architectures.flops import count_macs, count_params, is_image_list_model
from segplatform.cli import main


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 16·16 outputs × 8 channels × 27 taps = 55,296 MACs
        nn.BatchNorm2d(8),  # not counted
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=False),  # 16·16 × 4 × 8 = 8,192 MACs
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),  # 40 MACs
    )


def test_macs_of_a_hand_computable_network() -> None:
    net = _small_net()
    assert count_macs(net, input_size=(16, 16)) == 55_296 + 8_192 + 40
    assert count_macs(net, input_size=(16, 16), batch_size=3) == 3 * (55_296 + 8_192 + 40)
    # A strided, dilated convolution: output 8×8, 5 channels, 2·3·3 taps.
    conv = nn.Conv2d(2, 5, 3, stride=2, padding=2, dilation=2)
    assert count_macs(conv, input_size=(16, 16), in_channels=2) == 8 * 8 * 5 * 18


def test_params_of_a_hand_computable_network() -> None:
    net = _small_net()
    expected = (3 * 8 * 9 + 8) + (2 * 8) + (8 * 4) + (4 * 10 + 10)
    assert count_params(net) == expected
    net[0].requires_grad_(False)
    assert count_params(net, trainable_only=True) == expected - (3 * 8 * 9 + 8)
    assert count_params(net) == expected


def test_counting_runs_in_eval_mode_without_grad_and_restores_the_mode() -> None:
    seen: list[tuple[bool, bool]] = []
    net = _small_net().train()
    net.register_forward_hook(lambda m, _i, _o: seen.append((m.training, torch.is_grad_enabled())))
    count_macs(net, input_size=(8, 8))
    assert seen == [(False, False)]
    assert net.training


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="input_size"):
        count_macs(_small_net(), input_size=(0, 16))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_registry_entry_can_be_counted(name: str) -> None:
    config_cls, model_cls = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build_from_config(name, config_cls.tiny())
    in_channels = getattr(model.config, "in_channels", 3)
    macs = count_macs(model, input_size=(64, 64), in_channels=in_channels)
    assert macs > 0
    assert count_params(model) > 0
    if getattr(model_cls, "task", "semantic") == "instance":
        assert is_image_list_model(model)
    else:
        assert not is_image_list_model(model)
        # More pixels, more work (not exactly 4×: FCN's 100-pixel pad, U-Net's valid convs).
        bigger = count_macs(model, input_size=(128, 128), in_channels=in_channels)
        assert bigger > macs, f"{name}: {bigger} vs {macs}"


def test_deeplab_v1_macs_are_the_convolutions_at_stride_8() -> None:
    # Closed form for the tiny config at 64×64: VGG16 at 1/8 width (conv5 at stride 8) plus the
    # LargeFOV head (fc6 3×3, fc7 1×1, fc8 1×1 → 21) on the 8×8 map.
    model = build_from_config("deeplab_v1", ARCHITECTURES["deeplab_v1"][0].tiny())
    widths = [3, 8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    sides = [64, 64, 32, 32, 16, 16, 16, 8, 8, 8, 8, 8, 8]
    backbone = sum(s * s * 9 * cin * cout for s, cin, cout in zip(sides, widths, widths[1:]))
    head = 8 * 8 * (9 * 64 * 32 + 32 * 32 + 32 * 21)
    assert count_macs(model, input_size=(64, 64)) == backbone + head


def test_cli_prints_params_and_macs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--arch", "deeplab_v1", "--input", "64x64", "--tiny"]) == 0
    text = capsys.readouterr().out
    model = build_from_config("deeplab_v1", ARCHITECTURES["deeplab_v1"][0].tiny())
    params, macs = count_params(model), count_macs(model, input_size=(64, 64))
    assert f"params  {params:,}" in text
    assert f"MACs    {macs:,}" in text
    assert "GMACs" in text


def test_cli_json_with_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["flops", "--arch", "deeplab_v3", "--input", "48x64", "--tiny", "--json"]
    argv += ["--param", "output_stride=8", "--param", "atrous_rates=2,4,6"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    config_cls = ARCHITECTURES["deeplab_v3"][0]
    model = build_from_config(
        "deeplab_v3", config_cls.tiny(output_stride=8, atrous_rates=(2, 4, 6))
    )
    assert report["arch_params"] == {"output_stride": 8, "atrous_rates": [2, 4, 6]}
    assert report["input"] == [1, 3, 48, 64]
    assert report["num_params"] == count_params(model)
    assert report["macs"] == count_macs(model, input_size=(48, 64))
    assert report["gmacs"] == pytest.approx(report["macs"] / 1e9)


def test_cli_errors_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--arch", "no_such_net", "--input", "64x64"]) == 2
    assert "no_such_net" in capsys.readouterr().err
    assert main(["flops", "--arch", "deeplab_v1", "--tiny", "--param", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["flops", "--arch", "deeplab_v1", "--input", "64by64"])
