"""FCN-32s/16s/8s against the paper and the official Caffe nets (fcn.berkeleyvision.org)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from architectures import build_model
from architectures.backbones import VGG16
from architectures.fcn import FCN, FCN8sConfig, FCN16sConfig, FCN32sConfig, bilinear_kernel

VARIANTS = {"fcn32s": FCN32sConfig, "fcn16s": FCN16sConfig, "fcn8s": FCN8sConfig}


def _meta_model(name: str, **params: object) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, **params)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_trainable_parameters_match_the_papers_134m(name: str) -> None:
    model = _meta_model(name, num_classes=21)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(trainable - 134e6) / 134e6 < 0.01, trainable
    if name == "fcn32s":  # VGG16 convs + fc6 + fc7 + score_fr, exactly
        assert trainable == 14_714_688 + 102_764_544 + 16_781_312 + 86_037


def test_convolutionalised_classifier_shapes() -> None:
    model = _meta_model("fcn32s", num_classes=21)
    assert model.fc6.kernel_size == (7, 7) and model.fc6.padding == (0, 0)
    assert model.fc6.out_channels == 4096 and model.fc7.out_channels == 4096
    assert model.fc7.kernel_size == (1, 1)
    assert model.drop6.p == model.drop7.p == 0.5
    assert model.score_fr.out_channels == 21
    assert model.backbone.features[0].padding == (100, 100)
    assert all(m.ceil_mode for m in model.backbone.features if isinstance(m, nn.MaxPool2d))


# ---- alignment: the crop offsets follow from the layer geometry (Caffe's coord_map) ----------


def _compose(mapping: tuple[float, float], layer: nn.Module) -> tuple[float, float]:
    """Affine map output-coordinate → input-image-coordinate after appending ``layer``."""
    scale, shift = mapping
    if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
        k, s, p, d = (
            _first(layer.kernel_size),
            _first(layer.stride),
            _first(layer.padding),
            _first(layer.dilation),
        )
        c = (k - 1) * d / 2 - p  # layer input coord = s·out + c
        return scale * s, scale * c + shift
    if isinstance(layer, nn.ConvTranspose2d):
        k, s, p = _first(layer.kernel_size), _first(layer.stride), _first(layer.padding)
        c = (k - 1) / 2 - p  # out = s·in + c
        return scale / s, shift - scale * c / s
    return mapping


def _first(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


def _crop(mapping: tuple[float, float], offset: int) -> tuple[float, float]:
    scale, shift = mapping
    return scale, shift + scale * offset


def _backbone_maps(model: FCN) -> dict[str, tuple[float, float]]:
    mapping, maps, pool = (1.0, 0.0), {}, 0
    for layer in model.backbone.features:
        mapping = _compose(mapping, layer)
        if isinstance(layer, nn.MaxPool2d):
            pool += 1
            maps[f"pool{pool}"] = mapping
    return maps


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_official_crop_offsets_align_every_map_with_the_input(name: str) -> None:
    model = FCN(VARIANTS[name].tiny())
    offsets = FCN.CROP_OFFSETS[model.stride]
    maps = _backbone_maps(model)
    score = maps["pool5"]
    for layer in (model.fc6, model.fc7, model.score_fr):
        score = _compose(score, layer)
    if name == "fcn32s":
        final = _crop(_compose(score, model.upscore), offsets[0])
    else:
        up2 = _compose(score, model.upscore2)
        assert _crop(_compose(maps["pool4"], model.score_pool4), offsets[0]) == up2
        if name == "fcn16s":
            final = _crop(_compose(up2, model.upscore16), offsets[1])
        else:
            up4 = _compose(up2, model.upscore_pool4)
            assert _crop(_compose(maps["pool3"], model.score_pool3), offsets[1]) == up4
            final = _crop(_compose(up4, model.upscore8), offsets[2])
    assert final == (1.0, 0.0)  # output pixel i is input pixel i
    assert offsets == {"fcn32s": (19,), "fcn16s": (5, 27), "fcn8s": (5, 9, 31)}[name]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_any_input_size_is_cropped_to_itself(name: str) -> None:
    model = FCN(VARIANTS[name].tiny()).eval()
    with torch.no_grad():
        for height, width in [(1, 1), (31, 2), (33, 70), (100, 37)]:
            out = model(torch.randn(1, 3, height, width))["out"]
            assert out.shape == (1, 3, height, width)


# ---- initialisation ---------------------------------------------------------------------------


def test_bilinear_kernel_matches_the_official_upsample_filt() -> None:
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    kernel = bilinear_kernel(2, 4)
    assert torch.allclose(kernel[0, 0], taps[:, None] * taps[None, :])
    assert torch.equal(kernel[0, 1], torch.zeros(4, 4))  # no cross-class mixing
    # ×2 upsampling of a ramp is the ramp at half the slope (away from the borders).
    layer = nn.ConvTranspose2d(1, 1, 4, stride=2, bias=False)
    layer.weight.data.copy_(bilinear_kernel(1, 4))
    ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # (1, 1, 8, 8), value = column
    with torch.no_grad():
        up = layer(ramp)[0, 0, 4:-4, 4:-4]  # (10, 10) interior
    assert torch.allclose(up[:, 1:] - up[:, :-1], torch.full((10, 9), 0.5))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_deconvs_are_bilinear_bias_free_and_the_last_is_fixed(name: str) -> None:
    model = FCN(VARIANTS[name].tiny(num_classes=4))
    upsamplers = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    expected = {
        "fcn32s": [(64, 32)],
        "fcn16s": [(4, 2), (32, 16)],
        "fcn8s": [(4, 2)] * 2 + [(16, 8)],
    }
    assert [(m.kernel_size[0], m.stride[0]) for m in upsamplers] == expected[name]
    for m in upsamplers:
        assert m.bias is None
        assert torch.equal(m.weight, bilinear_kernel(4, m.kernel_size[0]))
    assert [m.weight.requires_grad for m in upsamplers] == [True] * (len(upsamplers) - 1) + [False]
    released = FCN(VARIANTS[name].tiny(learn_upsampling=False))
    assert not any(
        m.weight.requires_grad for m in released.modules() if isinstance(m, nn.ConvTranspose2d)
    )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_score_layers_start_at_zero(name: str) -> None:
    model = FCN(VARIANTS[name].tiny())
    scores = [m for n, m in model.named_children() if n.startswith("score")]
    assert len(scores) == {"fcn32s": 1, "fcn16s": 2, "fcn8s": 3}[name]
    for layer in scores:
        assert not layer.weight.any() and not layer.bias.any()


def test_at_once_skip_scaling_scales_pool4_and_pool3() -> None:
    torch.manual_seed(0)
    plain = FCN(FCN8sConfig.tiny()).eval()
    scaled = FCN(FCN8sConfig.tiny(skip_scaling=True)).eval()
    scaled.load_state_dict(plain.state_dict())
    for model in (plain, scaled):
        for layer in (model.score_pool4, model.score_pool3):
            nn.init.constant_(layer.weight, 1.0)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert not torch.allclose(plain(x)["out"], scaled(x)["out"])
    assert (scaled.pool4_scale, scaled.pool3_scale) == (0.01, 1e-4)


# ---- pretrained VGG16 ------------------------------------------------------------------------


def test_torchvision_vgg16_state_dict_loads_with_fc_reshaped(tmp_path: Path) -> None:
    config = FCN32sConfig.tiny()
    torch.manual_seed(0)
    source = VGG16(width_divisor=config.width_divisor)  # torchvision's `features` layout
    fc, c5 = config.fc_channels, source.out_channels
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state |= {
        "classifier.0.weight": torch.randn(fc, c5 * 7 * 7),
        "classifier.0.bias": torch.randn(fc),
        "classifier.3.weight": torch.randn(fc, fc),
        "classifier.3.bias": torch.randn(fc),
        "classifier.6.weight": torch.randn(1000, fc),  # ImageNet classes: not used
        "classifier.6.bias": torch.randn(1000),
    }
    path = tmp_path / "vgg16.safetensors"
    save_file(state, path)
    model = FCN(FCN32sConfig.tiny(pretrained_backbone=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert torch.equal(model.fc6.weight, state["classifier.0.weight"].view(fc, c5, 7, 7))
    assert torch.equal(
        model.fc6.weight[:, :, 2, 3], state["classifier.0.weight"][:, 2 * 7 + 3 :: 49]
    )
    assert torch.equal(model.fc7.weight[:, :, 0, 0], state["classifier.3.weight"])
    assert torch.equal(model.fc7.bias, state["classifier.3.bias"])

    del state["classifier.3.weight"]
    save_file(state, path)
    with pytest.raises(ValueError, match=r"classifier\.3\.weight"):
        FCN(FCN32sConfig.tiny(pretrained_backbone=str(path)))
    save_file({"unrelated.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="VGG16"):
        FCN(FCN32sConfig.tiny(pretrained_backbone=str(path)))


def test_zero_initialised_net_still_learns_its_score_layer() -> None:
    torch.manual_seed(0)
    model = FCN(FCN8sConfig.tiny()).train()
    out = model(torch.randn(2, 3, 48, 48))["out"]
    loss = F.cross_entropy(out, torch.randint(0, 3, (2, 48, 48)))
    loss.backward()
    assert model.score_fr.weight.grad.abs().sum() > 0
    assert model.score_pool3.weight.grad.abs().sum() > 0
    assert model.upscore8.weight.grad is None  # fixed bilinear
