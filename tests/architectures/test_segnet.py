"""SegNet against the paper (TPAMI 2017) and the official SegNet-Tutorial prototxt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from architectures import build_model
from architectures.backbones import VGG16
from architectures.segnet import DECODER_WIDTHS, SegNet, SegNetConfig


def _meta_segnet(**params: object) -> SegNet:
    with torch.device("meta"):
        return build_model("segnet", **params)  # type: ignore[return-value]


def test_encoder_has_the_papers_14_7m_parameters_and_13_convs() -> None:
    model = _meta_segnet()
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 13
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert abs(encoder - 14.7e6) / 14.7e6 < 0.01, encoder


def test_model_size_matches_the_papers_117_mb() -> None:
    # 117 MB of float32 weights (the paper's Table 6) implies 117e6 / 4 = 29.25M parameters.
    model = _meta_segnet(num_classes=11)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params * 4 - 117e6) / 117e6 < 0.01, params


def test_decoder_widths_and_the_final_3x3_classifier() -> None:
    model = _meta_segnet(num_classes=11)
    widths = tuple(
        tuple(m.out_channels for m in block if isinstance(m, nn.Conv2d)) for block in model.decoder
    )
    assert widths == DECODER_WIDTHS
    assert widths == ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))
    for block in model.decoder:  # each decoder conv is conv + BN + ReLU
        kinds = [type(m) for m in block]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * (len(kinds) // 3)
    assert model.classifier.kernel_size == (3, 3) and model.classifier.out_channels == 11
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.kernel_size == (3, 3) for m in convs)  # no extra 1×1 anywhere
    assert len(convs) == 13 + 13  # 13 encoder, 12 decoder, 1 classifier
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())


def test_odd_camvid_size_pools_with_ceil_and_unpools_to_exact_sizes() -> None:
    model = SegNet(SegNetConfig.tiny()).eval()
    with torch.no_grad():
        feats = model.encoder(torch.randn(1, 3, 360, 480))
        sizes = [tuple(int(s) for s in feats[f"size{i}"]) for i in range(1, 6)]
        assert sizes == [(360, 480), (180, 240), (90, 120), (45, 60), (23, 30)]
        assert feats["pool5"].shape[-2:] == (12, 15)
        assert model(torch.randn(1, 3, 360, 480))["out"].shape == (1, 3, 360, 480)


def _window_max(x: Tensor) -> Tensor:
    """Per pixel, the max of its 2×2 pooling window (ceil mode), at the input size."""
    pooled = F.max_pool2d(x, 2, stride=2, ceil_mode=True)
    up = pooled.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return up[..., : x.shape[-2], : x.shape[-1]]


@pytest.mark.parametrize("size", [(65, 47), (64, 64)])
def test_unpooling_puts_values_at_the_stored_argmax_positions(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = SegNet(SegNetConfig.tiny()).eval()
    captured: dict[str, Tensor] = {}
    # The encoder's last ReLU before pool1, and the input of the last decoder block (unpool1).
    pre_pool_relu = model.encoder.features[5]
    pre_pool_relu.register_forward_hook(lambda m, i, o: captured.update(pre=o.clone()))
    model.decoder[4].register_forward_pre_hook(lambda m, i: captured.update(unpooled=i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, *size))
    pre, unpooled = captured["pre"], captured["unpooled"]
    assert unpooled.shape == pre.shape  # exact pre-pool size, odd sizes included
    nonzero = unpooled != 0
    assert nonzero.any()
    # Every unpooled value sits where the encoder had the maximum of its window.
    assert torch.equal(pre[nonzero], _window_max(pre)[nonzero])
    # At most one value per 2×2 window.
    per_window = F.avg_pool2d(nonzero.float(), 2, stride=2, ceil_mode=True, divisor_override=1)
    assert per_window.max() <= 1


def test_torchvision_vgg16_bn_features_load_into_the_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = VGG16(batch_norm=True, width_divisor=16)  # torchvision's vgg16_bn layout
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["classifier.0.weight"] = torch.randn(8, 8)  # ignored
    path = tmp_path / "vgg16_bn.safetensors"
    save_file(state, path)
    model = SegNet(SegNetConfig.tiny(pretrained_backbone=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    save_file({"unrelated": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no tensor matches"):
        SegNet(SegNetConfig.tiny(pretrained_backbone=str(path)))
