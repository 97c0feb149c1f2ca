"""PSPNet: pyramid bins and output strides, the auxiliary head, the deep stem, configuration errors
and the size of the paper's networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from architectures import build_config, build_model
from architectures.flops import count_params
from architectures.pspnet import PSPNet, PSPNetConfig, PyramidPoolingModule

NUM_CLASSES = 5


def _pooled_sizes(model: PSPNet) -> list[tuple[int, int]]:
    """Record the output size of every pyramid level's pooling on the next forward."""
    sizes: list[tuple[int, int]] = []
    for level in model.ppm.levels:
        level[0].register_forward_hook(
            lambda _m, _i, out: sizes.append(tuple(out.shape[-2:]))  # type: ignore[arg-type]
        )
    return sizes


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("bins", [(1, 2, 3, 6), (1, 2, 4, 8), (1, 3, 6)])
def test_any_bins_and_output_stride_give_input_sized_out_and_aux(
    bins: tuple[int, ...], output_stride: int
) -> None:
    torch.manual_seed(0)
    model = PSPNet(
        PSPNetConfig.tiny(num_classes=NUM_CLASSES, bins=bins, output_stride=output_stride)
    )
    # Each level reduces C = 2048 to C // len(bins); the head reads C + len(bins) * that.
    assert model.ppm.out_channels == 2048 + len(bins) * (2048 // len(bins))
    assert model.head[0][0].in_channels == model.ppm.out_channels
    ppm_inputs: list[tuple[int, ...]] = []
    model.ppm.register_forward_hook(lambda _m, inp, _o: ppm_inputs.append(tuple(inp[0].shape)))
    pooled = _pooled_sizes(model)
    images = torch.randn(2, 3, 48, 64)

    model.train()
    out = model(images)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == (2, NUM_CLASSES, 48, 64)
    assert out["aux"].shape == (2, NUM_CLASSES, 48, 64)
    assert ppm_inputs[0] == (2, 2048, 48 // output_stride, 64 // output_stride)
    assert pooled == [(b, b) for b in bins]

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"out"}
    assert out["out"].shape == (2, NUM_CLASSES, 48, 64)
    assert torch.isfinite(out["out"]).all()


def test_training_backward_reaches_every_parameter_and_loss_weights_match_outputs() -> None:
    torch.manual_seed(0)
    model = build_model("pspnet", **vars(PSPNetConfig.tiny(num_classes=NUM_CLASSES)))
    model.train()
    out = model(torch.randn(2, 3, 40, 40))
    weights = model.loss_weights()
    assert weights == {"out": 1.0, "aux": 0.4}
    assert set(weights) == set(out)
    target = torch.randint(0, NUM_CLASSES, (2, 40, 40))
    loss = sum(w * nn.functional.cross_entropy(out[k], target) for k, w in weights.items())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_without_aux_loss_there_is_no_aux_head_or_output() -> None:
    model = PSPNet(PSPNetConfig.tiny(num_classes=NUM_CLASSES, aux_loss=False)).train()
    assert model.aux_head is None
    assert set(model(torch.randn(2, 3, 32, 32))) == {"out"}
    assert model.loss_weights() == {"out": 1.0}


def test_pyramid_level_is_pool_conv_bn_relu_upsampled_and_concatenated() -> None:
    torch.manual_seed(0)
    ppm = PyramidPoolingModule(4, bins=(1, 2), reduced_channels=3).eval()
    x = torch.randn(1, 4, 6, 6)
    y = ppm(x)
    assert y.shape == (1, 4 + 2 * 3, 6, 6)
    torch.testing.assert_close(y[:, :4], x)
    # Bin 1: global average → 1×1 conv → BN → ReLU, constant over the map.
    _pool, (conv, bn, _relu) = ppm.levels[0]
    expected = torch.relu(bn(conv(x.mean(dim=(2, 3), keepdim=True))))
    torch.testing.assert_close(y[:, 4:7], expected.expand(1, 3, 6, 6))


def test_deep_stem_is_three_3x3_convs_and_keeps_shapes() -> None:
    model = PSPNet(PSPNetConfig.tiny(num_classes=NUM_CLASSES, deep_stem=True)).eval()
    stem = model.backbone.conv1
    convs = [m for m in stem.modules() if isinstance(m, nn.Conv2d)]
    expected = [((3, 3), 64), ((3, 3), 64), ((3, 3), 128)]
    assert [(c.kernel_size, c.out_channels) for c in convs] == expected
    assert convs[0].stride == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 48))["out"].shape == (2, NUM_CLASSES, 32, 48)


def test_defaults_are_the_paper_network() -> None:
    config = build_config("pspnet")
    assert (config.backbone, config.output_stride, config.bins) == ("resnet101", 8, (1, 2, 3, 6))
    assert (config.aux_loss, config.aux_weight, config.dropout) == (True, 0.4, 0.1)


def test_pspnet50_parameter_count_matches_the_semseg_network() -> None:
    # semseg's PSPNet-50 (model/pspnet.py, 7×7-stem equivalent) has about 46.7M parameters without
    # its auxiliary head; ours with torchvision's ResNet-50 must be the same size.
    with torch.device("meta"):
        model = build_model("pspnet", backbone="resnet50", num_classes=21)
    assert model.aux_head is not None
    without_aux = count_params(model) - count_params(model.aux_head)
    print(f"PSPNet-50 (K=21): {without_aux / 1e6:.2f}M parameters without the aux head")
    assert 46.0e6 < without_aux < 47.5e6


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("output_stride", 32),
        ("bins", ()),
        ("bins", (1, 0)),
        ("bins", (2, 2)),
        ("backbone", "vgg16"),
        ("dropout", 1.0),
        ("num_classes", 0),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        PSPNetConfig(**{field: value})


def test_unknown_parameter_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="pyramid"):
        build_model("pspnet", pyramid=(1, 2))
