"""ICNet: width multipliers, the cascade outputs and their resolutions, the released model's
structure, and its cost against PSPNet-50 at the paper's 1024×2048 input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from architectures import build_config, build_model
from architectures.flops import count_macs, count_params
from architectures.icnet import CascadeFeatureFusion, ICNet, ICNetConfig, SumPyramidPooling

NUM_CLASSES = 19  # Cityscapes


def _labels_at(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    resized = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")
    return resized[:, 0].long()


@pytest.mark.parametrize("width_multiplier", [0.5, 1.0])
def test_training_returns_out_and_cascade_outputs_at_1_16_1_8_1_4(width_multiplier: float) -> None:
    torch.manual_seed(0)
    config = ICNetConfig.tiny(num_classes=NUM_CLASSES, width_multiplier=width_multiplier)
    model = ICNet(config)
    images = torch.randn(2, 3, 64, 96)
    model.train()
    out = model(images)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "out": (2, NUM_CLASSES, 64, 96),
        "aux_1_16": (2, NUM_CLASSES, 4, 6),
        "aux_1_8": (2, NUM_CLASSES, 8, 12),
        "aux_1_4": (2, NUM_CLASSES, 16, 24),
    }
    weights = model.loss_weights()
    assert set(weights) == set(out)
    target = torch.randint(0, NUM_CLASSES, (2, 64, 96))
    # Each term against the labels at its own resolution (nearest), as in the paper.
    loss = sum(w * F.cross_entropy(out[k], _labels_at(target, out[k])) for k, w in weights.items())
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # "out" is the 1/4 logits upsampled.
    expected = F.interpolate(out["aux_1_4"], size=(64, 96), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out["out"], expected)

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"out"} and out["out"].shape == (2, NUM_CLASSES, 64, 96)


def test_loss_weights_map_the_cascade_weights() -> None:
    model = ICNet(ICNetConfig.tiny(cascade_weights=(0.3, 0.5, 0.9)))
    assert model.loss_weights() == {"out": 0.9, "aux_1_16": 0.3, "aux_1_8": 0.5, "aux_1_4": 0.0}
    assert build_config("icnet").cascade_weights == (0.4, 0.4, 1.0)


@pytest.mark.parametrize(
    ("width_multiplier", "stem", "full", "half", "quarter", "reduced"),
    [
        (0.5, (32, 32, 64), (32, 32, 64), 256, 1024, 256),
        (1.0, (64, 64, 128), (64, 64, 128), 512, 2048, 512),
    ],
)
def test_widths_follow_the_released_prototxt_at_0_5_and_double_at_1_0(
    width_multiplier: float,
    stem: tuple[int, ...],
    full: tuple[int, ...],
    half: int,
    quarter: int,
    reduced: int,
) -> None:
    with torch.device("meta"):
        model = build_model("icnet", width_multiplier=width_multiplier)

    def widths(seq: nn.Module) -> tuple[int, ...]:
        return tuple(m.out_channels for m in seq.modules() if isinstance(m, nn.Conv2d))

    assert widths(model.trunk.stem) == stem  # conv1_1_3x3_s2 .. conv1_3_3x3
    assert widths(model.full_branch) == full  # conv1_sub1 .. conv3_sub1
    assert model.trunk.half_channels == half  # conv3_1
    assert model.trunk.out_channels == quarter  # conv5_3
    assert widths(model.reduce) == (reduced,)  # conv5_4_k1
    assert [len(s) for s in (model.trunk.layer1, model.trunk.layer2)] == [3, 4]
    assert [len(s) for s in (model.trunk.layer3, model.trunk.layer4)] == [6, 3]
    rates = {m.dilation for m in model.trunk.layer3.modules() if isinstance(m, nn.Conv2d)}
    assert rates == {(1, 1), (2, 2)}
    rates = {m.dilation for m in model.trunk.layer4.modules() if isinstance(m, nn.Conv2d)}
    assert rates == {(1, 1), (4, 4)}
    print(f"ICNet width {width_multiplier}: {count_params(model) / 1e6:.2f}M parameters")


def test_sum_pyramid_pooling_adds_each_upsampled_level_to_the_features() -> None:
    x = torch.randn(1, 2, 6, 6)
    y = SumPyramidPooling((1, 3))(x)
    level1 = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    level3 = F.interpolate(
        F.adaptive_avg_pool2d(x, 3), size=(6, 6), mode="bilinear", align_corners=True
    )
    torch.testing.assert_close(y, x + level1 + level3)


def test_cascade_feature_fusion_is_dilated_low_plus_projected_high_then_relu() -> None:
    torch.manual_seed(0)
    cff = CascadeFeatureFusion(6, 4, 5, num_classes=3, norm_layer=nn.BatchNorm2d).eval()
    assert cff.low[0].dilation == (2, 2) and cff.low[0].kernel_size == (3, 3)
    assert cff.high[0].kernel_size == (1, 1)
    low, high = torch.randn(1, 6, 4, 4), torch.randn(1, 4, 8, 8)
    fused, low_up = cff(low, high)
    expected_up = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=True)
    torch.testing.assert_close(low_up, expected_up)
    torch.testing.assert_close(fused, torch.relu(cff.low(expected_up) + cff.high(high)))
    assert cff.classifier(low_up).shape == (1, 3, 8, 8)


def test_icnet_costs_at_most_a_fifth_of_pspnet50_at_1024x2048() -> None:
    # Counted on the meta device: shapes only, no arithmetic.
    with torch.device("meta"):
        icnet = build_model("icnet", num_classes=NUM_CLASSES)
        pspnet50 = build_model("pspnet", backbone="resnet50", num_classes=NUM_CLASSES)
    icnet_macs = count_macs(icnet, input_size=(1024, 2048))
    pspnet_macs = count_macs(pspnet50, input_size=(1024, 2048))
    ratio = icnet_macs / pspnet_macs
    print(
        f"1024x2048, K={NUM_CLASSES}: ICNet {icnet_macs / 1e9:.1f} GMACs, "
        f"PSPNet-50 {pspnet_macs / 1e9:.1f} GMACs, ratio {ratio:.3f}"
    )
    assert ratio <= 1 / 5
    assert icnet_macs > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width_multiplier", 0.0),
        ("bins", ()),
        ("cascade_weights", (0.4, 1.0)),
        ("backbone", "resnet152"),
        ("cff_channels", 0),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ICNetConfig(**{field: value})
