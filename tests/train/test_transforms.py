"""Joint image + mask augmentation: geometry shared, padding ignored, colour on images only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segplatform.train.transforms import EvalTransform, TrainTransform, image_to_tensor

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def _labelled_image(height: int = 20, width: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel equals the label × 40 (so geometry can be checked).

    Labels come in 5×5 blocks, so resizing keeps regions whose centres are not blurred.
    """
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 4, (height // 5 + 1, width // 5 + 1))
    mask = np.kron(blocks, np.ones((5, 5), np.int64))[:height, :width].astype(np.uint8)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = mask * 40
    image[..., 1] = rng.integers(0, 255, (height, width))
    return image, mask


def test_crop_pads_image_with_zero_and_mask_with_ignore() -> None:
    torch.manual_seed(0)
    image, mask = _labelled_image(10, 12)
    transform = TrainTransform(crop_size=(32, 40), scale_range=(1, 1), hflip=False, **IDENTITY)
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 32, 40) and out_image.dtype == torch.float32
    assert out_mask.shape == (32, 40) and out_mask.dtype == torch.int64
    padded = out_mask == 255
    assert int(padded.sum()) == 32 * 40 - 10 * 12  # every original pixel kept, the rest ignored
    assert float(out_image[:, padded].abs().max()) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_geometry_is_shared_between_image_and_mask(seed: int) -> None:
    torch.manual_seed(seed)
    image, mask = _labelled_image()
    transform = TrainTransform(
        crop_size=(16, 16), scale_range=(0.5, 2.0), hflip=True, color_jitter=0.0, **IDENTITY
    )
    out_image, out_mask = transform(image, mask)
    valid = out_mask != 255
    # Where the nearest-resized mask says label l, the bilinear red channel is close to l × 40
    # (interpolation blurs edges: compare the median per label).
    red = (out_image[0] * 255).round()
    for label in out_mask[valid].unique().tolist():
        assert abs(float(red[out_mask == label].median()) - label * 40) <= 20


def test_flip_is_applied_jointly() -> None:
    image, mask = _labelled_image(8, 8)
    transform = TrainTransform(crop_size=(8, 8), scale_range=(1, 1), hflip=True, **IDENTITY)
    flips = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        green = (out_image[1] * 255).round().numpy()  # random per pixel: tells a flip apart
        flipped = bool(np.array_equal(green, image[:, ::-1, 1]))
        assert flipped or np.array_equal(green, image[:, :, 1])
        expected = np.ascontiguousarray(mask[:, ::-1] if flipped else mask).astype(np.int64)
        assert torch.equal(out_mask, torch.from_numpy(expected))
        flips += flipped
    assert 0 < flips < 20


def test_colour_jitter_changes_the_image_only() -> None:
    torch.manual_seed(1)
    image, mask = _labelled_image()
    plain = TrainTransform(crop_size=(20, 30), scale_range=(1, 1), hflip=False, **IDENTITY)
    jitter = TrainTransform(
        crop_size=(20, 30), scale_range=(1, 1), hflip=False, color_jitter=0.5, **IDENTITY
    )
    a_image, a_mask = plain(image, mask)
    b_image, b_mask = jitter(image, mask)
    assert torch.equal(a_mask, b_mask)
    assert not torch.allclose(a_image, b_image)


def test_normalization_and_grey_expansion() -> None:
    grey = np.full((6, 7), 128, np.uint8)
    mask = np.zeros((6, 7), np.uint8)
    transform = EvalTransform(in_channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0),
                              ignore_index=255)  # fmt: skip
    out_image, out_mask = transform(grey, mask)
    assert out_image.shape == (3, 6, 7) and out_mask.shape == (6, 7)
    value = 128 / 255
    assert out_image[:, 0, 0].tolist() == pytest.approx(
        [(value - 0.5) / 0.25, (value - 0.5) / 0.5, value - 0.5], abs=1e-6
    )
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 1] = 100
    assert image_to_tensor(rgb, 1)[0, 0, 0] == round(0.587 * 100)
    with pytest.raises(ValueError, match="image has 2 channels"):
        image_to_tensor(np.zeros((2, 2, 2), np.uint8), 3)


def test_instances_follow_geometry_and_padding_is_no_instance() -> None:
    torch.manual_seed(3)
    image, mask = _labelled_image(10, 10)
    instances = (mask.astype(np.int64) + 1) * 7  # every pixel in some instance
    transform = TrainTransform(crop_size=(16, 16), scale_range=(1, 1), hflip=True, **IDENTITY)
    _, out_mask, out_instances = transform(image, mask, instances)
    assert (out_instances[out_mask == 255] == 0).all()
    valid = out_mask != 255
    assert torch.equal(out_instances[valid], (out_mask[valid] + 1) * 7)


def test_mask_size_mismatch_names_the_sample() -> None:
    transform = EvalTransform(in_channels=3, ignore_index=255, **IDENTITY)
    with pytest.raises(ValueError, match="row-7: mask"):
        transform(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.uint8), source="row-7")
