"""Losses: ignore handling, class/pixel weights, OHEM selection, Dice, U-Net borders, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segplatform.train.losses import (
    SegmentationLoss,
    class_pixel_statistics,
    cross_entropy,
    dice_loss,
    median_frequency_weights,
    ohem_cross_entropy,
    total_loss,
    unet_border_weights,
)


def _batch(seed: int = 0, k: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, size, size, generator=gen, requires_grad=True)
    target = torch.randint(0, k, (2, size, size), generator=gen)
    target[:, 0, :] = 255
    return logits, target


def test_cross_entropy_ignores_ignore_index_and_all_ignored_is_zero() -> None:
    logits, target = _batch()
    valid = target != 255
    manual = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert float(cross_entropy(logits, target).detach()) == pytest.approx(float(manual.detach()))
    empty = cross_entropy(logits, torch.full_like(target, 255))
    assert float(empty) == 0.0
    empty.backward()  # a gradient path exists, no NaN
    assert torch.isfinite(logits.grad).all()


def test_constant_pixel_weights_change_nothing_and_weights_emphasise() -> None:
    logits, target = _batch()
    plain = cross_entropy(logits, target)
    constant = cross_entropy(logits, target, pixel_weights=torch.full(target.shape, 3.0))
    assert float(constant) == pytest.approx(float(plain), rel=1e-6)
    # Weighting one pixel heavily pulls the mean towards that pixel's loss.
    weights = torch.ones(target.shape)
    weights[0, 4, 4] = 1e6
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    weighted = cross_entropy(logits, target, pixel_weights=weights)
    assert float(weighted) == pytest.approx(float(per_pixel[0, 4, 4]), rel=1e-3)


def test_class_weights_match_torch() -> None:
    logits, target = _batch()
    weight = torch.tensor([0.2, 1.0, 5.0])
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
    assert float(cross_entropy(logits, target, weight=weight)) == pytest.approx(float(expected))
    with_pixels = cross_entropy(logits, target, weight=weight, pixel_weights=torch.ones(2, 8, 8))
    assert float(with_pixels) == pytest.approx(float(expected), rel=1e-6)


def test_median_frequency_weights() -> None:
    # Image A: 8 px class 0, 8 px class 1; image B: 15 px class 0, 1 px class 2.
    a = np.array([0] * 8 + [1] * 8).reshape(4, 4)
    b = np.array([0] * 15 + [2]).reshape(4, 4)
    b_ignored = b.copy()
    b_ignored[0, 0] = 255
    pixels, image_pixels = class_pixel_statistics([a, b], 4)
    assert pixels.tolist() == [23, 8, 1, 0]
    assert image_pixels.tolist() == [32, 16, 16, 0]
    weights = median_frequency_weights(pixels, image_pixels)
    freq = np.array([23 / 32, 8 / 16, 1 / 16])
    assert weights[:3] == pytest.approx(list(np.median(freq) / freq))
    assert weights[3] == 1.0  # never seen
    assert class_pixel_statistics([b_ignored], 4)[0].tolist() == [14, 0, 1, 0]
    with pytest.raises(ValueError, match="mask 0: label 7"):
        class_pixel_statistics([np.full((2, 2), 7)], 4)


def test_ohem_keeps_hard_pixels_and_min_kept() -> None:
    target = torch.zeros(1, 1, 10, dtype=torch.long)
    # Target-class probability rises along the row: pixel i is easy for large i.
    logits = torch.zeros(1, 2, 1, 10)
    logits[0, 0, 0] = torch.linspace(-3, 3, 10)
    probs = logits.softmax(1)[0, 0, 0]
    hard = probs <= 0.7
    expected = F.cross_entropy(logits[..., hard], target[..., hard])
    got = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    # min_kept above the number of hard pixels raises the threshold to the 8th smallest prob.
    got8 = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=8)
    expected8 = F.cross_entropy(logits[..., :8], target[..., :8])
    assert int(hard.sum()) < 8
    assert float(got8) == pytest.approx(float(expected8), rel=1e-6)
    # min_kept >= valid pixels: plain cross-entropy.
    assert float(ohem_cross_entropy(logits, target, min_kept=100)) == pytest.approx(
        float(F.cross_entropy(logits, target))
    )


def test_dice_perfect_prediction_is_near_zero_and_ignores_pixels() -> None:
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert float(dice_loss(perfect, target)) < 1e-3
    wrong = torch.roll(perfect, 1, dims=1)
    assert float(dice_loss(wrong, target)) > 0.9
    # Ignored pixels never count: a wrong prediction there changes nothing.
    ignored = target.clone()
    ignored[:, :4] = 255
    mixed = perfect.clone()
    mixed[:, :, :4] = wrong[:, :, :4]
    assert float(dice_loss(mixed, ignored)) < 1e-3


def test_unet_border_weights_peak_between_touching_objects() -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 2:13] = 1  # object A
    mask[5:15, 15:28] = 1  # object B, a 2-pixel gap at columns 13-14
    weights = unet_border_weights(mask, w0=10, sigma=5)
    assert weights.dtype == np.float32 and weights.shape == mask.shape
    gap = weights[10, 13]  # d1 = 1, d2 = 2: 1 + 10 exp(-9/50)
    assert gap == pytest.approx(1 + 10 * np.exp(-9 / 50), rel=1e-5)
    assert weights[10, 5] == 1.0  # inside an object: w_c only
    assert weights[0, 0] < gap  # far background: small border term
    single = np.zeros((10, 10), np.uint8)
    single[2:5, 2:5] = 2
    assert (unet_border_weights(single) == 1).all()  # one object: no border term
    instances = np.zeros((20, 30), np.int64)
    instances[5:15, 2:13], instances[5:15, 15:28] = 1, 2
    merged = np.zeros((20, 30), np.uint8)
    merged[5:15, 2:28] = 1  # one component, but two instances given
    merged[5:15, 13:15] = 0
    from_instances = unet_border_weights(merged, instances=instances)
    assert from_instances[10, 13] == pytest.approx(gap, rel=1e-5)


def test_total_loss_downsamples_labels_for_low_resolution_outputs() -> None:
    target = torch.randint(0, 3, (2, 16, 16))
    full = torch.randn(2, 3, 16, 16, requires_grad=True)
    quarter = torch.randn(2, 3, 4, 4, requires_grad=True)
    weights = {"out": 1.0, "aux_1_4": 0.4, "unused": 0.0}
    loss, terms = total_loss({"out": full, "aux_1_4": quarter}, target, weights)
    small = F.interpolate(target[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long()
    expected = F.cross_entropy(full, target) + 0.4 * F.cross_entropy(quarter, small)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert set(terms) == {"out", "aux_1_4"}
    loss.backward()
    assert quarter.grad is not None and full.grad is not None
    with pytest.raises(KeyError, match="'aux'"):
        total_loss({"out": full}, target, {"out": 1.0, "aux": 0.4})


@pytest.mark.parametrize("kind", ["ce", "ohem", "dice", "ce+dice"])
def test_segmentation_loss_kinds_give_finite_gradients(kind: str) -> None:
    logits, target = _batch(k=4)
    loss = SegmentationLoss(kind, class_weights=torch.ones(4), ohem_min_kept=10)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert float(logits.grad.abs().sum()) > 0
