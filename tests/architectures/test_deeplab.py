"""DeepLab v1/v2/v3: published parameter counts, output strides, rates, multi-grid, image pooling
with a batch of one, and multi-scale max fusion.

Full-size models are only constructed (on the meta device, which allocates nothing); everything
that runs uses the tiny configs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet101
from torchvision.models.segmentation import deeplabv3_resnet101

from architectures import build_model
from architectures.deeplab_v1 import DeepLabV1, DeepLabV1Config
from architectures.deeplab_v2 import DeepLabV2, DeepLabV2Config, scaled_size
from architectures.deeplab_v3 import DeepLabV3, DeepLabV3Config
from architectures.flops import count_params


def _meta_params(model_factory) -> int:  # type: ignore[no-untyped-def]
    with torch.device("meta"):
        return count_params(model_factory())


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


def test_largefov_matches_the_papers_20_5m_parameters() -> None:
    # Paper Table 2 counts the whole network (VGG16 convolutions + fc6/fc7/fc8) with K = 21:
    # 14,714,688 + fc6 (3·3·512·1024 + 1024) + fc7 (1024² + 1024) + fc8 (1024·21 + 21).
    expected = 14_714_688 + 4_719_616 + 1_049_600 + 21_525
    measured = _meta_params(lambda: DeepLabV1(DeepLabV1Config()))
    print(f"DeepLab-LargeFOV: {measured:,} parameters (paper: 20.5M)")
    assert measured == expected == 20_505_429
    assert abs(measured - 20.5e6) / 20.5e6 < 0.01


def test_7x7_variant_matches_the_papers_134_3m_parameters() -> None:
    measured = _meta_params(lambda: DeepLabV1(DeepLabV1Config(fov="7x7")))
    print(f"DeepLab-CRF-7x7: {measured:,} parameters (paper: 134.3M)")
    assert abs(measured - 134.3e6) / 134.3e6 < 0.01


def test_v2_resnet101_count_is_the_backbone_plus_four_class_convolutions() -> None:
    # Expected: torchvision ResNet-101 without its 1000-way fc (42,500,160), plus ASPP-L's four
    # 3×3 convolutions 2048 → 21 with bias: 4 · (9·2048·21 + 21) = 1,548,372. Total 44,048,532
    # (≈ 44.0M; the Caffe ResNet-101 of the official model has the same count).
    with torch.device("meta"):
        classifier = resnet101()
        backbone = count_params(classifier) - count_params(classifier.fc)
    measured = _meta_params(lambda: DeepLabV2(DeepLabV2Config()))
    print(f"DeepLab v2 ResNet-101 ASPP-L: {measured:,} parameters")
    assert backbone == 42_500_160
    assert measured == backbone + 4 * (9 * 2048 * 21 + 21) == 44_048_532


def test_v2_vgg16_count_is_four_largefov_heads() -> None:
    # VGG16 convolutions + four fc6(3×3, 1024)/fc7(1024)/fc8(21) branches = 37,877,652.
    measured = _meta_params(lambda: DeepLabV2(DeepLabV2Config(backbone="vgg16")))
    print(f"DeepLab v2 VGG16 ASPP-L: {measured:,} parameters")
    assert measured == 14_714_688 + 4 * (4_719_616 + 1_049_600 + 21_525) == 37_877_652


def test_v3_resnet101_count_differs_from_torchvision_only_by_its_extra_conv() -> None:
    # torchvision's deeplabv3_resnet101 (aux_loss=False) has 58,630,997 parameters: the same
    # backbone and ASPP, plus a 3×3 conv 256→256 (589,824) + BN (512) in its head that the paper
    # does not have. Ours: 58,630,997 − 590,336 = 58,040,661 (≈ 58.0M).
    with torch.device("meta"):
        reference = count_params(
            deeplabv3_resnet101(weights=None, weights_backbone=None, aux_loss=False)
        )
    measured = _meta_params(lambda: DeepLabV3(DeepLabV3Config()))
    print(f"DeepLab v3 ResNet-101: {measured:,} parameters (torchvision: {reference:,})")
    assert reference == 58_630_997
    assert measured == reference - (256 * 256 * 9 + 2 * 256) == 58_040_661
    # The output stride changes no parameter; the auxiliary head adds torchvision's FCNHead.
    assert _meta_params(lambda: DeepLabV3(DeepLabV3Config(output_stride=8))) == measured
    with_aux = _meta_params(lambda: DeepLabV3(DeepLabV3Config(aux_loss=True)))
    assert with_aux - measured == 1024 * 256 * 9 + 2 * 256 + 256 * 21 + 21


# ---------------------------------------------------------------------------------------------
# Structure: strides, rates, multi-grid
# ---------------------------------------------------------------------------------------------


def _input_size_of(module: nn.Module, model: nn.Module, images: torch.Tensor) -> torch.Size:
    seen: list[torch.Size] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("output_stride", [8, 16])
def test_v3_features_have_the_requested_output_stride(output_stride: int) -> None:
    model = DeepLabV3(DeepLabV3Config.tiny(output_stride=output_stride))
    size = _input_size_of(model.aspp, model, torch.randn(2, 3, 64, 96))
    assert tuple(size[-2:]) == (64 // output_stride, 96 // output_stride)
    out = model(torch.randn(2, 3, 64, 96))["out"]
    assert out.shape == (2, 21, 64, 96)


def test_v3_rates_are_stated_at_stride_16_and_double_at_stride_8() -> None:
    def dilations(model: DeepLabV3) -> tuple[int, ...]:
        return tuple(branch[0].dilation[0] for branch in model.aspp.branches[1:])

    with torch.device("meta"):
        os16 = DeepLabV3(DeepLabV3Config())
        os8 = DeepLabV3(DeepLabV3Config(output_stride=8))
        tuned = DeepLabV3(DeepLabV3Config(output_stride=8, atrous_rates=(3, 6, 9, 12)))
    assert dilations(os16) == (6, 12, 18)
    assert dilations(os8) == (12, 24, 36)
    assert dilations(tuned) == (6, 12, 18, 24) == tuned.config.applied_atrous_rates
    assert [branch[0].kernel_size for branch in os16.aspp.branches] == [(1, 1)] + [(3, 3)] * 3
    # Padding keeps the feature size for every rate.
    assert all(b[0].padding == b[0].dilation for b in os8.aspp.branches[1:])


@pytest.mark.parametrize(
    ("output_stride", "multi_grid", "expected"),
    [(16, (1, 2, 4), (2, 4, 8)), (8, (1, 2, 4), (4, 8, 16)), (16, (1, 1, 1), (2, 2, 2))],
)
def test_v3_multi_grid_multiplies_the_block4_rate(
    output_stride: int, multi_grid: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    with torch.device("meta"):
        model = DeepLabV3(DeepLabV3Config(output_stride=output_stride, multi_grid=multi_grid))
    rates = tuple(block.conv2.dilation[0] for block in model.backbone.layer4)
    assert rates == expected
    assert all(block.conv2.stride == (1, 1) for block in model.backbone.layer4)


def test_v1_is_stride_8_with_the_largefov_and_7x7_fc6() -> None:
    model = DeepLabV1(DeepLabV1Config.tiny())
    assert tuple(_input_size_of(model.fc6, model, torch.randn(1, 3, 64, 80))[-2:]) == (8, 10)
    assert (model.fc6.kernel_size, model.fc6.dilation, model.fc6.out_channels) == (
        (3, 3),
        (12, 12),
        32,
    )
    with torch.device("meta"):
        large = DeepLabV1(DeepLabV1Config())
        seven = DeepLabV1(DeepLabV1Config(fov="7x7"))
    assert (large.fc6.kernel_size, large.fc6.dilation, large.fc6.out_channels) == (
        (3, 3),
        (12, 12),
        1024,
    )
    assert (seven.fc6.kernel_size, seven.fc6.dilation, seven.fc6.out_channels) == (
        (7, 7),
        (4, 4),
        4096,
    )
    assert seven.fc6.padding == (12, 12)  # same-size output: 4 · (7 − 1) / 2


def test_v1_fc6_rate_and_backbone_norm_knobs() -> None:
    plain = DeepLabV1(DeepLabV1Config.tiny())
    model = DeepLabV1(DeepLabV1Config.tiny(fc6_rate=2, backbone_norm=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 13  # one per VGG16 convolution, none in the head
    assert (model.fc6.kernel_size, model.fc6.dilation, model.fc6.padding) == (
        (3, 3),
        (2, 2),
        (2, 2),
    )
    out = model(torch.randn(2, 3, 64, 80))["out"]
    assert out.shape == (2, 21, 64, 80)
    assert tuple(_input_size_of(model.fc6, model, torch.randn(1, 3, 64, 80))[-2:]) == (8, 10)
    with pytest.raises(ValueError, match="backbone_norm"):
        DeepLabV1Config(backbone_norm=True, pretrained_backbone="/vgg16.pth")


def test_v2_aspp_uses_the_atrous_rates_and_sums_its_branches() -> None:
    with torch.device("meta"):
        resnet = DeepLabV2(DeepLabV2Config())
        vgg = DeepLabV2(DeepLabV2Config(backbone="vgg16"))
    assert [conv.dilation[0] for conv in resnet.aspp.branches] == [6, 12, 18, 24]
    assert all(conv.out_channels == 21 for conv in resnet.aspp.branches)
    assert [branch[0].dilation[0] for branch in vgg.aspp.branches] == [6, 12, 18, 24]
    assert [branch[0].out_channels for branch in vgg.aspp.branches] == [1024] * 4

    model = DeepLabV2(DeepLabV2Config.tiny()).eval()
    features = torch.randn(1, 2048, 5, 6)
    with torch.no_grad():
        summed = sum(branch(features) for branch in model.aspp.branches)
        assert torch.allclose(model.aspp(features), summed)


# ---------------------------------------------------------------------------------------------
# Image pooling with one image in training mode
# ---------------------------------------------------------------------------------------------


def test_plain_batchnorm_cannot_train_on_a_single_pooled_value() -> None:
    # Why the image-pooling branch needs special care: PyTorch refuses this.
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))


def test_v3_trains_with_a_batch_of_one() -> None:
    torch.manual_seed(0)
    model = DeepLabV3(DeepLabV3Config.tiny(aux_loss=True)).train()
    pool_norm = model.aspp.image_pooling.norm
    pool_stats = pool_norm.running_mean.clone(), pool_norm.running_var.clone()
    branch_norm = model.aspp.branches[0][1]
    branch_mean = branch_norm.running_mean.clone()

    outputs = model(torch.randn(1, 3, 48, 48))
    assert outputs["out"].shape == (1, 21, 48, 48)
    assert outputs["aux"].shape == (1, 21, 48, 48)
    sum(o.mean() for o in outputs.values()).backward()
    assert pool_norm.weight.grad is not None and torch.isfinite(pool_norm.weight.grad).all()
    # Batch of one: the pooled branch keeps its running statistics; the others still update.
    assert torch.equal(pool_norm.running_mean, pool_stats[0])
    assert torch.equal(pool_norm.running_var, pool_stats[1])
    assert not torch.equal(branch_norm.running_mean, branch_mean)

    # Batch of two: ordinary training-mode BN in the pooled branch too.
    model(torch.randn(2, 3, 48, 48))
    assert not torch.equal(pool_norm.running_mean, pool_stats[0])


def test_v3_head_without_norm_keeps_the_backbones_and_the_weights_names() -> None:
    normed = DeepLabV3(DeepLabV3Config.tiny())
    plain = DeepLabV3(DeepLabV3Config.tiny(head_norm=False)).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.aspp.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.backbone.modules())
    # The same convolutions (names and shapes); only the ASPP's BN parameters are gone.
    normed_keys = {k: v.shape for k, v in normed.state_dict().items()}
    plain_keys = {k: v.shape for k, v in plain.state_dict().items()}
    assert plain_keys.items() <= normed_keys.items()
    assert all(k.startswith("aspp.") for k in normed_keys.keys() - plain_keys.keys())
    outputs = plain(torch.randn(1, 3, 48, 48))  # a batch of one trains without BN statistics
    assert outputs["out"].shape == (1, 21, 48, 48)
    outputs["out"].mean().backward()
    assert torch.isfinite(plain.aspp.image_pooling.conv.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# DeepLab v2 multi-scale inputs
# ---------------------------------------------------------------------------------------------


def test_v2_scaled_sizes_follow_the_official_code() -> None:
    assert scaled_size(321, 0.75) == 241
    assert scaled_size(321, 0.5) == 161
    assert scaled_size(513, 1.0) == 513


def test_v2_multi_scale_outputs_and_loss_weights() -> None:
    torch.manual_seed(0)
    model = DeepLabV2(DeepLabV2Config.tiny(scales=(1.0, 0.75, 0.5))).train()
    outputs = model(torch.randn(2, 3, 57, 64))
    expected = {"out", "aux_scale_1", "aux_scale_0.75", "aux_scale_0.5"}
    assert set(outputs) == expected == set(model.loss_weights())
    assert all(t.shape == (2, 21, 57, 64) for t in outputs.values())
    assert model.loss_weights()["aux_scale_0.5"] == 1.0
    sum(w * outputs[k].square().mean() for k, w in model.loss_weights().items()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert set(model(torch.randn(2, 3, 57, 64))) == {"out"}
    single = DeepLabV2(DeepLabV2Config.tiny()).train()
    assert set(single(torch.randn(2, 3, 57, 64))) == {"out"} == set(single.loss_weights())


def test_v2_multi_scale_fusion_is_a_max_over_shared_weights() -> None:
    torch.manual_seed(0)
    multi = DeepLabV2(DeepLabV2Config.tiny(scales=(1.0, 0.5))).eval()
    single = DeepLabV2(DeepLabV2Config.tiny()).eval()
    single.load_state_dict(multi.state_dict())  # the scales share every weight
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = multi(images)["out"]
        full_scale = single(images)["out"]
    # max(full, other) >= full pointwise, and bilinear upsampling preserves the order.
    assert (fused >= full_scale - 1e-5).all()
    assert (fused > full_scale + 1e-4).any()


# ---------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("deeplab_v1", {"fov": "9x9"}, "fov"),
        ("deeplab_v1", {"backbone": "resnet101"}, "backbone"),
        ("deeplab_v1", {"fc6_rate": 0}, "fc6_rate"),
        ("deeplab_v2", {"backbone": "vgg16", "output_stride": 16}, "output_stride"),
        ("deeplab_v2", {"atrous_rates": ()}, "atrous_rates"),
        ("deeplab_v2", {"scales": (1.0, 0.0)}, "scales"),
        ("deeplab_v3", {"output_stride": 32}, "output_stride"),
        ("deeplab_v3", {"multi_grid": (1, 0, 4)}, "multi_grid"),
        ("deeplab_v3", {"backbone": "vgg16"}, "backbone"),
    ],
)
def test_bad_parameters_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_model(name, **params)
