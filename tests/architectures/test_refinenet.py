"""RefineNet: chained residual pooling depth, the building blocks against hand computation, the
cascade's widths and resolutions, and configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from architectures import build_config, build_model
from architectures.flops import count_params
from architectures.refinenet import (
    ChainedResidualPooling,
    MultiResolutionFusion,
    RefineNet,
    RefineNetConfig,
    ResidualConvUnit,
)

NUM_CLASSES = 4


@pytest.mark.parametrize("crp_stages", [1, 2, 4])
def test_crp_stages_build_that_many_pool_conv_stages_and_output_is_input_sized(
    crp_stages: int,
) -> None:
    torch.manual_seed(0)
    model = RefineNet(RefineNetConfig.tiny(num_classes=NUM_CLASSES, crp_stages=crp_stages))
    assert [len(block.crp.convs) for block in model.blocks] == [crp_stages] * 4
    images = torch.randn(2, 3, 64, 96)
    model.train()
    out = model(images)
    assert set(out) == {"out"} == set(model.loss_weights())
    assert out["out"].shape == (2, NUM_CLASSES, 64, 96)
    target = torch.randint(0, NUM_CLASSES, (2, 64, 96))
    F.cross_entropy(out["out"], target).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"out"} and out["out"].shape == (2, NUM_CLASSES, 64, 96)


def test_cascade_runs_coarse_to_fine_and_ends_at_a_quarter_of_the_input() -> None:
    model = RefineNet(RefineNetConfig.tiny(num_classes=NUM_CLASSES)).eval()
    shapes: list[tuple[int, ...]] = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    # tiny widths (32, 16, 16, 16): RefineNet-4 at 1/32, then 1/16, 1/8, 1/4.
    assert shapes == [(1, 32, 2, 2), (1, 16, 4, 4), (1, 16, 8, 8), (1, 16, 16, 16)]


def test_default_widths_are_512_then_256_and_inputs_adapted_by_3x3_convs() -> None:
    with torch.device("meta"):
        model = build_model("refinenet")
    assert [block.out_channels for block in model.blocks] == [512, 256, 256, 256]
    assert [(a.in_channels, a.out_channels, a.kernel_size) for a in model.adapters] == [
        (2048, 512, (3, 3)),
        (1024, 256, (3, 3)),
        (512, 256, (3, 3)),
        (256, 256, (3, 3)),
    ]
    # RefineNet-4 has one path and no fusion conv; the others fuse two paths.
    assert [len(block.fusion.convs) for block in model.blocks] == [0, 2, 2, 2]
    config = build_config("refinenet")
    assert (config.backbone, config.crp_stages) == ("resnet101", 4)
    print(f"RefineNet-101 (K=21): {count_params(model) / 1e6:.1f}M parameters")


def _identity_conv(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        nn.init.dirac_(conv.weight)
        if conv.bias is not None:
            conv.bias.zero_()


def test_chained_residual_pooling_matches_hand_computation() -> None:
    crp = ChainedResidualPooling(channels=3, stages=3)
    for conv in crp.convs:
        _identity_conv(conv)
    x = torch.randn(1, 3, 9, 9)
    relu = torch.relu(x)
    pool = nn.functional.max_pool2d
    stage1 = pool(relu, 5, 1, 2)
    stage2 = pool(stage1, 5, 1, 2)
    stage3 = pool(stage2, 5, 1, 2)
    torch.testing.assert_close(crp(x), relu + stage1 + stage2 + stage3)


def test_residual_conv_unit_is_relu_conv_relu_conv_plus_identity() -> None:
    torch.manual_seed(0)
    rcu = ResidualConvUnit(3)
    x = torch.randn(1, 3, 5, 5)
    expected = x + rcu.conv2(torch.relu(rcu.conv1(torch.relu(x))))
    torch.testing.assert_close(rcu(x), expected)
    with torch.no_grad():
        rcu.conv2.weight.zero_()
    torch.testing.assert_close(rcu(x), x)


def test_fusion_convolves_each_path_upsamples_to_the_largest_and_sums() -> None:
    torch.manual_seed(0)
    fusion = MultiResolutionFusion([6, 3], out_channels=3)
    low, high = torch.randn(1, 6, 4, 4), torch.randn(1, 3, 8, 8)
    up = F.interpolate(fusion.convs[0](low), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fusion([low, high]), up + fusion.convs[1](high))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("crp_stages", 0),
        ("widths", (256, 256, 256)),
        ("backbone", "vgg16"),
        ("classifier_dropout", -0.1),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        RefineNetConfig(**{field: value})
