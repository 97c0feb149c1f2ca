"""ResNet backbones: ResNet-18/34 against torchvision (parameters, state dicts, outputs), output
strides, multi-grid and the deep stem on basic units, and every ResNet-based architecture built on
them (heads sized from ``feature_info``, outputs, gradients, parameter counts).

Full-size models are counted on the meta device; the ones that run see 64×64 inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet34
from torchvision.models.resnet import BasicBlock

from architectures import build_config, build_model
from architectures.backbones import (
    RESNET_DEPTHS,
    DilatedBasicBlock,
    ResNet,
    load_pretrained,
    read_state_dict,
)
from architectures.flops import count_params

RESNET_ARCHITECTURES = ["deeplab_v2", "deeplab_v3", "pspnet", "refinenet", "icnet"]
SMALL_RESNETS = ["resnet18", "resnet34"]
TORCHVISION = {"resnet18": resnet18, "resnet34": resnet34}
NUM_CLASSES = 5


def _meta_params(name: str, **params: object) -> int:
    with torch.device("meta"):
        return count_params(build_model(name, **params))


def _loss(outputs: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted cross-entropy of every output against one random label map, resized to it."""
    first = outputs["out"]
    generator = torch.Generator().manual_seed(2)
    target = torch.randint(
        0, first.shape[1], (first.shape[0], 1, *first.shape[-2:]), generator=generator
    )
    total = first.new_zeros(())
    for key, logits in outputs.items():
        resized = F.interpolate(target.float(), size=logits.shape[-2:], mode="nearest")
        total = total + weights[key] * F.cross_entropy(logits, resized[:, 0].long())
    return total


# ---------------------------------------------------------------------------------------------
# The bare backbones
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "with_fc"), [("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_basic_resnets_have_torchvision_parameter_counts_without_fc(
    name: str, with_fc: int
) -> None:
    with torch.device("meta"):
        reference = TORCHVISION[name]()
        ours = ResNet(name)
    fc = 512 * 1000 + 1000
    assert count_params(reference) == with_fc
    assert count_params(ours) == count_params(reference) - count_params(reference.fc)
    assert count_params(ours) == with_fc - fc
    print(f"{name} backbone: {count_params(ours):,} parameters (torchvision with fc: {with_fc:,})")


@pytest.mark.parametrize("name", SMALL_RESNETS)
def test_state_dict_layout_is_torchvisions_at_every_output_stride(name: str) -> None:
    with torch.device("meta"):
        reference = {
            k: v.shape for k, v in TORCHVISION[name]().state_dict().items() if "fc" not in k
        }
        for output_stride in (8, 16, 32):
            own = ResNet(name, output_stride=output_stride).state_dict()
            assert {k: v.shape for k, v in own.items()} == reference


def test_torchvision_resnet18_file_loads_with_nothing_missing_but_fc(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = resnet18().eval()  # random init: nothing is downloaded
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = ResNet("resnet18").eval()
    untouched = load_pretrained(backbone, str(path))
    assert untouched == []  # every backbone tensor came from the file
    own = backbone.state_dict()
    assert sorted(set(read_state_dict(str(path))) - set(own)) == ["fc.bias", "fc.weight"]
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    # Output stride 32 is the classification network: layer4 equals torchvision's trunk.
    images = torch.randn(2, 3, 64, 96)
    trunk = nn.Sequential(*list(reference.children())[:-2])
    with torch.no_grad():
        torch.testing.assert_close(backbone(images)["layer4"], trunk(images))


def test_dilated_basic_block_is_torchvisions_at_rate_1_and_keeps_the_size_dilated() -> None:
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    reference = BasicBlock(32, 64, stride=2, downsample=downsample).eval()
    ours = DilatedBasicBlock(32, 64, stride=2, downsample=downsample).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
    dilated = DilatedBasicBlock(64, 64, dilation=3).eval()
    for conv in (dilated.conv1, dilated.conv2):
        assert (conv.dilation, conv.padding) == ((3, 3), (3, 3))
    with torch.no_grad():
        assert dilated(torch.randn(1, 64, 9, 11)).shape == (1, 64, 9, 11)


@pytest.mark.parametrize("name", SMALL_RESNETS)
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_stride_gives_the_feature_sizes_and_channels_feature_info_reports(
    name: str, output_stride: int
) -> None:
    backbone = ResNet(name, output_stride=output_stride).eval()
    expected_strides = {8: (4, 8, 8, 8), 16: (4, 8, 16, 16), 32: (4, 8, 16, 32)}[output_stride]
    info = backbone.feature_info
    assert [(f.name, f.channels, f.stride) for f in info] == [
        (f"layer{i + 1}", channels, stride)
        for i, (channels, stride) in enumerate(zip((64, 128, 256, 512), expected_strides))
    ]
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 96))
    for f in info:
        assert features[f.name].shape == (2, f.channels, 64 // f.stride, 96 // f.stride), f.name
    assert backbone.out_channels == 512
    # Dilation replaces the stride: layer3 at rate 2 (OS 8), layer4 at 2 (OS 16) or 4 (OS 8),
    # the first unit of a dilated stage keeping the previous rate.
    rate3, rate4 = {8: (2, 4), 16: (1, 2), 32: (1, 1)}[output_stride]
    for layer, rate in ((backbone.layer3, rate3), (backbone.layer4, rate4)):
        for unit in layer[1:]:
            assert unit.conv1.dilation == unit.conv2.dilation == (rate, rate)


@pytest.mark.parametrize(
    ("name", "output_stride", "rates"),
    [
        ("resnet34", 16, (2, 4, 8)),  # DeepLab v3's (1, 2, 4) times base rate 2
        ("resnet34", 8, (4, 8, 16)),
        ("resnet18", 16, (2, 4)),  # two units: the leading grid entries
        ("resnet18", 8, (4, 8)),
    ],
)
def test_multi_grid_sets_both_3x3_convs_of_every_layer4_unit(
    name: str, output_stride: int, rates: tuple[int, ...]
) -> None:
    backbone = ResNet(name, output_stride=output_stride, multi_grid=(1, 2, 4))
    for unit, rate in zip(backbone.layer4, rates, strict=True):
        for conv in (unit.conv1, unit.conv2):
            assert (conv.dilation, conv.padding) == ((rate, rate), (rate, rate))
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, 64, 64))["layer4"]
    assert out.shape == (1, 512, 64 // output_stride, 64 // output_stride)


@pytest.mark.parametrize("name", SMALL_RESNETS)
def test_deep_stem_and_grey_input_on_basic_units(name: str) -> None:
    backbone = ResNet(name, deep_stem=True, in_channels=1, output_stride=8)
    convs = [m for m in backbone.conv1.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 64, (3, 3)),
        (64, 64, (3, 3)),
        (64, 128, (3, 3)),
    ]
    first = backbone.layer1[0]  # reads the stem's 128 channels through a projection shortcut
    assert (first.conv1.in_channels, first.conv1.out_channels) == (128, 64)
    assert first.downsample is not None and first.downsample[0].in_channels == 128
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 1, 64, 64))
    assert out["layer4"].shape == (2, 512, 8, 8)


# ---------------------------------------------------------------------------------------------
# The architectures on ResNet-18/34
# ---------------------------------------------------------------------------------------------

ARCHITECTURE_CASES = [
    pytest.param(name, backbone, {}, id=f"{name}-{backbone}")
    for name in RESNET_ARCHITECTURES
    for backbone in SMALL_RESNETS
] + [
    pytest.param("deeplab_v3", "resnet18", {"aux_loss": True}, id="deeplab_v3-resnet18-aux"),
    pytest.param("icnet", "resnet18", {"width_multiplier": 1.0}, id="icnet-resnet18-width1"),
    pytest.param(
        "pspnet", "resnet18", {"deep_stem": True, "in_channels": 1}, id="pspnet-resnet18-deep_grey"
    ),
]


@pytest.mark.parametrize(("name", "backbone", "overrides"), ARCHITECTURE_CASES)
def test_architecture_on_a_small_resnet_gives_out_and_a_gradient_to_every_parameter(
    name: str, backbone: str, overrides: dict[str, object]
) -> None:
    torch.manual_seed(0)
    model = build_model(name, backbone=backbone, num_classes=NUM_CLASSES, **overrides).train()
    images = torch.randn(2, model.config.in_channels, 64, 64)
    outputs = model(images)
    assert outputs["out"].shape == (2, NUM_CLASSES, 64, 64)
    weights = model.loss_weights()
    assert set(outputs) == set(weights)
    _loss(outputs, weights).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"{name}/{backbone}: no gradient for {missing[:5]}"
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"out"} and out["out"].shape == (2, NUM_CLASSES, 64, 64)
    assert torch.isfinite(out["out"]).all()


@pytest.mark.parametrize("backbone", SMALL_RESNETS)
def test_heads_read_the_widths_the_backbone_reports(backbone: str) -> None:
    def in_channels(module: nn.Module) -> int:
        return next(m for m in module.modules() if isinstance(m, nn.Conv2d)).in_channels

    with torch.device("meta"):
        v2 = build_model("deeplab_v2", backbone=backbone)
        v3 = build_model("deeplab_v3", backbone=backbone, aux_loss=True)
        psp = build_model("pspnet", backbone=backbone)
        refine = build_model("refinenet", backbone=backbone)
        icnet = build_model("icnet", backbone=backbone, width_multiplier=1.0)
        icnet_half = build_model("icnet", backbone=backbone)
    assert {branch.in_channels for branch in v2.aspp.branches} == {512}
    assert {in_channels(branch) for branch in v3.aspp.branches} == {512}
    assert in_channels(v3.aspp.image_pooling) == 512
    assert in_channels(v3.aux_head) == 256  # layer3
    assert [in_channels(level) for level in psp.ppm.levels] == [512] * 4
    assert psp.ppm.out_channels == 512 + 4 * 128
    assert in_channels(psp.aux_head) == 256  # layer3
    assert [a.in_channels for a in refine.adapters] == [512, 256, 128, 64]  # layer4 .. layer1
    # ICNet: conv3_1 (the half branch's cut) and conv5_3 at w128 and w512 (basic units, e = 1).
    for model, half, top in ((icnet, 128, 512), (icnet_half, 64, 256)):
        assert (model.trunk.half_channels, model.trunk.out_channels) == (half, top)
        assert in_channels(model.reduce) == top
        assert in_channels(model.cff_quarter_half.high) == half
        assert model.trunk.layer2[0].conv1.out_channels == half


# Parameter counts at num_classes=21, measured on the meta device. Changing any of these is a
# change of the network: check it is meant.
RESNET18_PARAMS = {
    # ResNet-18 without fc (11,176,512) + four 3×3 ASPP-L convs 512 → 21 with bias.
    "deeplab_v2": 11_176_512 + 4 * (9 * 512 * 21 + 21),  # 11,563,668
    "deeplab_v3": 15_313_749,
    "pspnet": 16_765_802,
    "refinenet": 74_194_517,
    "icnet": 3_399_615,  # width 0.5
}
RESNET34_PARAMS = {
    "deeplab_v2": 21_284_672 + 4 * (9 * 512 * 21 + 21),  # 21,671,828
    "deeplab_v3": 25_421_909,
    "pspnet": 26_873_962,
    "refinenet": 84_302_677,
    "icnet": 5_928_511,
}


@pytest.mark.parametrize("name", RESNET_ARCHITECTURES)
def test_parameter_counts_on_resnet18_and_resnet34_at_21_classes(name: str) -> None:
    counts = [_meta_params(name, backbone=b, num_classes=21) for b in SMALL_RESNETS]
    print(f"{name}: ResNet-18 {counts[0]:,}, ResNet-34 {counts[1]:,} parameters (K=21)")
    assert counts == [RESNET18_PARAMS[name], RESNET34_PARAMS[name]]
    if name != "icnet":  # the same head on both: they differ by ResNet-34's extra units only
        assert counts[1] - counts[0] == 21_284_672 - 11_176_512


@pytest.mark.parametrize("name", RESNET_ARCHITECTURES)
def test_unknown_backbone_is_a_value_error_listing_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="backbone") as info:
        build_config(name, backbone="resnet999")
    message = str(info.value)
    assert "resnet999" in message
    assert all(valid in message for valid in ("resnet18", "resnet34", "resnet50", "resnet101"))


def test_defaults_stay_the_papers_backbones() -> None:
    defaults = {name: build_config(name).backbone for name in RESNET_ARCHITECTURES}
    assert defaults == {
        "deeplab_v2": "resnet101",
        "deeplab_v3": "resnet101",
        "pspnet": "resnet101",
        "refinenet": "resnet101",
        "icnet": "resnet50",
    }
    assert set(SMALL_RESNETS) <= set(RESNET_DEPTHS)


def test_mask_rcnn_fpn_reads_the_small_resnet_widths() -> None:
    with torch.device("meta"):
        model = build_model("mask_rcnn", backbone="resnet18")
    inner = [block[0].in_channels for block in model.backbone.fpn.inner_blocks]
    assert inner == [64, 128, 256, 512]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet_tiny"])
def test_refinenet_drops_out_layer3_and_layer4_whatever_their_width(backbone: str) -> None:
    model = build_model("refinenet", backbone=backbone, num_classes=NUM_CLASSES).train()
    widths: list[int] = []
    model.level_dropout.register_forward_hook(lambda _m, inp, _o: widths.append(inp[0].shape[1]))
    model(torch.randn(2, 3, 64, 64))
    channels = {f.name: f.channels for f in model.backbone.feature_info}
    assert widths == [channels["layer4"], channels["layer3"]]
