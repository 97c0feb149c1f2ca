"""U-Net against the paper (MICCAI 2015): valid network, overlap-tile forward, loss weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from architectures import build_model
from architectures.unet import (
    UNet,
    UNetConfig,
    smallest_valid_input,
    unet_weight_map,
    valid_output_size,
)


def test_paper_network_maps_a_572_tile_to_388_logits_with_23_convs() -> None:
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = build_model("unet")
        logits = model.forward_tile(torch.empty(1, 1, 572, 572))
    assert logits.shape == (1, 2, 388, 388)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert len(convs) == 23
    assert [block[0].out_channels for block in model.down] == [64, 128, 256, 512, 1024]
    assert all(m.padding == (0, 0) for m in convs)
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in model.up] == [
        (c, c // 2, (2, 2), (2, 2)) for c in (1024, 512, 256, 128)
    ]
    assert model.margin == 92


def test_tiny_network_really_computes_572_to_388() -> None:
    model = UNet(UNetConfig.tiny()).eval()
    with torch.no_grad():
        logits = model.forward_tile(torch.randn(1, 3, 572, 572))
    assert logits.shape == (1, 3, 388, 388)
    assert torch.isfinite(logits).all()


def test_valid_tile_sizes_are_124_plus_multiples_of_16() -> None:
    for size in range(100, 700):
        valid = valid_output_size(size) is not None
        assert valid == (size >= 188 and (size - 124) % 16 == 0), size
        if valid:
            assert valid_output_size(size) == size - 184
    assert smallest_valid_input() == 188
    model = UNet(UNetConfig.tiny())
    with pytest.raises(ValueError, match="570"):
        model.forward_tile(torch.randn(1, 3, 570, 572))
    with pytest.raises(ValueError, match="tile_size"):
        UNetConfig(tile_size=570)


def test_tiled_forward_equals_the_raw_network_on_interior_tiles() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny(tile_size=284)).eval()  # 100×100 logits per tile
    image = torch.randn(1, 3, 300, 296)  # a 3×3 tile grid
    with torch.no_grad():
        out = model(image)["out"]
        assert out.shape == (1, 3, 300, 296)
        # The centre tile's input window lies inside the image: no padding involved.
        expected = model.forward_tile(image[:, :, 8:292, 8:292])  # (1, 3, 100, 100)
        assert torch.allclose(out[:, :, 100:200, 100:200], expected)
        # Rows and columns of tiles meet without gaps: the border tile starts at 0 and 200.
        bottom = model.forward_tile(
            F.pad(image, (92, 92 + 4, 92, 92), mode="reflect")[
                :, :, 200 : 200 + 284, 100 : 100 + 284
            ]
        )
        assert torch.allclose(out[:, :, 200:300, 100:200], bottom)


def test_borders_are_extrapolated_by_mirroring() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny(tile_size=284)).eval()
    image = torch.randn(2, 3, 100, 100)  # one tile: 100×100 logits from a 284×284 input
    with torch.no_grad():
        out = model(image)["out"]
        mirrored = model.forward_tile(F.pad(image, (92, 92, 92, 92), mode="reflect"))
        zero_padded = model.forward_tile(F.pad(image, (92, 92, 92, 92)))
    assert torch.allclose(out, mirrored)
    assert not torch.allclose(out, zero_padded)


@pytest.mark.parametrize("size", [(1, 1), (5, 200), (65, 47), (70, 130)])
def test_any_size_gives_logits_at_input_size(size: tuple[int, int]) -> None:
    model = UNet(UNetConfig.tiny()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))["out"]
    assert out.shape == (1, 3, *size)
    assert torch.isfinite(out).all()


def test_same_padding_variant_keeps_sizes() -> None:
    model = UNet(UNetConfig.tiny(padding="same")).eval()
    assert all(
        m.padding == (1, 1)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    )
    with torch.no_grad():
        assert model.forward_tile(torch.randn(1, 3, 32, 48)).shape == (1, 3, 32, 48)
        assert model(torch.randn(1, 3, 65, 47))["out"].shape == (1, 3, 65, 47)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.forward_tile(torch.randn(1, 3, 65, 48))


def test_training_through_tiles_reaches_every_layer() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).train()
    out = model(torch.randn(1, 3, 80, 80))["out"]  # 2×2 tiles of 68×68 logits
    F.cross_entropy(out, torch.randint(0, 3, (1, 80, 80))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_he_initialisation_of_the_paper() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig())
    conv = model.down[2][0]  # 128 → 256 channels, 3×3
    assert math.isclose(conv.weight.std().item(), math.sqrt(2 / (9 * 128)), rel_tol=0.02)
    assert not conv.bias.any()


# ---- loss weights (paper eq. 2) ---------------------------------------------------------------


def _two_cells() -> torch.Tensor:
    mask = torch.zeros(40, 60, dtype=torch.int64)
    mask[10:30, 5:25] = 1  # cell A
    mask[10:30, 27:50] = 1  # cell B, a 2-pixel gap (columns 25, 26) away
    return mask


def test_weight_map_follows_equation_2() -> None:
    mask = _two_cells()
    weights = unet_weight_map(mask, w0=10, sigma=5, class_weights=[1.0, 2.0])
    # Gap pixel (20, 25): 1 px to cell A, 2 px to cell B.
    assert math.isclose(weights[20, 25].item(), 1.0 + 10 * math.exp(-(9) / 50), rel_tol=1e-5)
    assert math.isclose(weights[20, 26].item(), 1.0 + 10 * math.exp(-(9) / 50), rel_tol=1e-5)
    # Far background: d1 + d2 large, so only w_c is left; cell pixels keep their class weight.
    assert math.isclose(weights[0, 59].item(), 1.0, rel_tol=1e-4)
    assert torch.all(weights[mask == 1] == 2.0)
    # A corner pixel: distances are Euclidean, (5 - 0, 5 - 4) to cell A's corner.
    d_a, d_b = math.hypot(10 - 5, 5 - 4), math.hypot(10 - 5, 27 - 4)
    expected = 1.0 + 10 * math.exp(-((d_a + d_b) ** 2) / 50)
    assert math.isclose(weights[5, 4].item(), expected, rel_tol=1e-5)


def test_weight_map_defaults_balance_classes_and_respect_ignore() -> None:
    mask = _two_cells()
    mask[0, 0] = 255
    weights = unet_weight_map(mask, w0=0)
    valid = mask != 255
    assert weights[0, 0] == 0
    assert math.isclose(weights[valid].mean().item(), 1.0, rel_tol=1e-5)
    counts = torch.bincount(mask[valid])
    assert math.isclose(
        weights[5, 0].item() / weights[20, 10].item(), counts[1] / counts[0], rel_tol=1e-5
    )


def test_single_cell_has_no_border_term_and_instances_override_components() -> None:
    mask = _two_cells()
    mask[10:30, 25:27] = 1  # the two cells touch: one connected component
    single = unet_weight_map(mask, class_weights=[1.0, 1.0])
    assert torch.all(single == 1.0)
    instances = torch.zeros_like(mask)
    instances[10:30, 5:26] = 1
    instances[10:30, 26:50] = 2
    split = unet_weight_map(mask, class_weights=[1.0, 1.0], instances=instances)
    assert split[9, 25] > 5  # background right above the boundary between the instances
    batch = unet_weight_map(torch.stack([mask, mask]), class_weights=[1.0, 1.0])
    assert batch.shape == (2, 40, 60) and torch.equal(batch[0], single)
    with pytest.raises(ValueError, match="label 1"):
        unet_weight_map(mask, class_weights=[1.0])
