"""Inference recipes: whole image, sliding window, flip, multi-scale, CRF."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segplatform.inference import InferenceRecipe, predict_probs, segment, to_tensor


class Pointwise(nn.Module):
    """A 1×1 convolution: its prediction at a pixel depends on that pixel only, so every recipe
    (windows, flips, crops) must reproduce the whole-image result exactly."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class ColumnBias(nn.Module):
    """Prefers class 1 on the left half of its input: not flip-equivariant."""

    def forward(self, x):
        n, _, h, w = x.shape
        logits = torch.zeros(n, 2, h, w)
        logits[:, 1, :, : w // 2] = 1.0
        return {"out": logits}


class PositionRamp(nn.Module):
    """Class-1 logit = first channel + a ramp over the rows and columns of the input it is given
    (0 at the top-left, 2 and 3 at the bottom and right edges): a pixel's prediction depends on
    where it lies in that input, so a window sees other values than the whole image. With
    ``only=(H, W)`` any other input size is refused (a network that takes its crop size only)."""

    def __init__(self, only: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.only = only

    def forward(self, x):
        h, w = x.shape[-2:]
        if self.only is not None and (h, w) != self.only:
            raise ValueError(f"this network takes {self.only} inputs, got {(h, w)}")
        return {"out": two_class_logits(ramp_logit(x))}


def ramp_logit(x):
    """PositionRamp's class-1 logit (N, H, W) for an input (N, C, H, W)."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, dtype=torch.float32).view(h, 1) / max(h - 1, 1)
    cols = torch.arange(w, dtype=torch.float32).view(1, w) / max(w - 1, 1)
    return x[:, 0] + 2.0 * rows + 3.0 * cols


def two_class_logits(class1):
    """(N, 2, H, W) logits: 0 for class 0, ``class1`` (N, H, W) for class 1."""
    return torch.stack([torch.zeros_like(class1), class1], dim=1)


def two_class_probs(class1):
    """Softmax of ``two_class_logits``: (1 - sigmoid, sigmoid)."""
    p = torch.sigmoid(class1)
    return torch.stack([1 - p, p], dim=1)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 37, 53)


def test_whole_probabilities_are_a_distribution(images):
    probs = predict_probs(Pointwise().eval(), images, InferenceRecipe(), num_classes=4)
    assert probs.shape == (2, 4, 37, 53)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 37, 53))


@pytest.mark.parametrize(
    "recipe",
    [
        InferenceRecipe(mode="slide", crop_size=(16, 16)),
        InferenceRecipe(mode="slide", crop_size=(16, 24), stride=(5, 7)),
        InferenceRecipe(mode="slide", crop_size=(64, 64)),  # window larger than the image
        InferenceRecipe(flip=True),
        InferenceRecipe(mode="slide", crop_size=(20, 20), flip=True),
    ],
)
def test_pointwise_model_gives_the_same_result_under_every_recipe(images, recipe):
    model = Pointwise().eval()
    whole = predict_probs(model, images, InferenceRecipe(), num_classes=4)
    torch.testing.assert_close(predict_probs(model, images, recipe, num_classes=4), whole)


def tiled(image, crop, tops, lefts):
    """PositionRamp's probabilities under the slide recipe, from the window corners listed:
    each window is zero-padded to ``crop`` where it runs past the image, and every pixel gets the
    mean over the windows that cover it."""
    n, _, height, width = image.shape
    crop_h, crop_w = crop
    full_h, full_w = max(height, crop_h), max(width, crop_w)
    padded = torch.zeros(n, image.shape[1], full_h, full_w)
    padded[:, :, :height, :width] = image
    total = torch.zeros(n, 2, full_h, full_w)
    count = torch.zeros(full_h, full_w)
    for top in tops:
        for left in lefts:
            window = padded[:, :, top : top + crop_h, left : left + crop_w]
            assert window.shape[-2:] == crop  # the corners listed keep every window inside
            total[:, :, top : top + crop_h, left : left + crop_w] += two_class_probs(
                ramp_logit(window)
            )
            count[top : top + crop_h, left : left + crop_w] += 1
    assert count[:height, :width].min() >= 1
    return (total / count)[:, :, :height, :width]


@pytest.mark.parametrize(
    ("size", "recipe", "tops", "lefts"),
    [
        # rows: 0, 4; columns: 0, 5, then the last window is moved back to the right edge (6)
        (
            (10, 14),
            InferenceRecipe(mode="slide", crop_size=(6, 8), stride=(4, 5)),
            [0, 4],
            [0, 5, 6],
        ),
        # default stride: two thirds of the window (4, 6)
        ((10, 14), InferenceRecipe(mode="slide", crop_size=(6, 9)), [0, 4], [0, 5]),
        # stride equal to the window: tiles without overlap
        ((8, 12), InferenceRecipe(mode="slide", crop_size=(4, 6), stride=(4, 6)), [0, 4], [0, 6]),
        # image lower than the window: padded at the bottom to one row of windows
        ((5, 14), InferenceRecipe(mode="slide", crop_size=(8, 8), stride=(5, 5)), [0], [0, 5, 6]),
        # image smaller than the window: one padded window
        ((5, 7), InferenceRecipe(mode="slide", crop_size=(8, 8)), [0], [0]),
    ],
)
def test_slide_averages_the_windows_where_they_overlap(size, recipe, tops, lefts):
    torch.manual_seed(2)
    image = torch.randn(2, 3, *size)
    probs = predict_probs(PositionRamp(only=recipe.crop_size), image, recipe, num_classes=2)
    expected = tiled(image, recipe.crop_size, tops, lefts)
    torch.testing.assert_close(probs, expected)
    whole = predict_probs(PositionRamp(), image, InferenceRecipe(), num_classes=2)
    torch.testing.assert_close(whole, two_class_probs(ramp_logit(image)))
    assert (probs - whole).abs().max() > 0.05  # the windows' ramps are not the image's


def test_slide_with_flip_averages_the_windows_of_both_orientations():
    torch.manual_seed(3)
    image = torch.randn(1, 3, 10, 14)
    recipe = InferenceRecipe(mode="slide", crop_size=(6, 8), stride=(4, 5), flip=True)
    probs = predict_probs(PositionRamp(only=(6, 8)), image, recipe, num_classes=2)
    plain = tiled(image, (6, 8), [0, 4], [0, 5, 6])
    mirrored = tiled(image.flip(-1), (6, 8), [0, 4], [0, 5, 6]).flip(-1)
    torch.testing.assert_close(probs, (plain + mirrored) / 2)
    assert (probs - plain).abs().max() > 0.05


class Asymmetric(nn.Module):
    """A fixed 1×3 convolution that weighs the left neighbour unlike the right one, plus a
    left-to-right ramp: mirroring the input does not mirror the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, (1, 3), padding=(0, 1), bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 0, 0] = torch.tensor([1.5, 0.5, -1.0])

    def forward(self, x):
        ramp = torch.linspace(-1.0, 2.0, x.shape[-1])
        return {"out": self.conv(x) + torch.stack([torch.zeros_like(ramp), ramp]).view(1, 2, 1, -1)}


def test_flip_averages_the_prediction_of_the_mirrored_image_flipped_back():
    torch.manual_seed(4)
    image = torch.randn(2, 3, 9, 13)
    model = Asymmetric().eval()
    with torch.no_grad():
        plain = model(image)["out"].softmax(1)
        mirrored = model(image.flip(-1))["out"].softmax(1).flip(-1)
    probs = predict_probs(model, image, InferenceRecipe(flip=True), num_classes=2)
    torch.testing.assert_close(probs, (plain + mirrored) / 2)
    torch.testing.assert_close(predict_probs(model, image, InferenceRecipe(), num_classes=2), plain)
    assert (probs - plain).abs().max() > 0.1


def test_flip_of_a_left_biased_model_gives_both_sides_the_bias_once():
    probs = predict_probs(
        ColumnBias(), torch.zeros(1, 3, 4, 8), InferenceRecipe(flip=True), num_classes=2
    )
    # Each side sees the bias once: unflipped on the left, flipped back on the right.
    plain = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    expected = (plain + torch.tensor([0.5, 0.5])) / 2
    torch.testing.assert_close(probs[0, :, 0, 0], expected)
    torch.testing.assert_close(probs[0, :, 0, -1], expected)


class HeightSides(nn.Module):
    """Class-1 logit ``H / 8`` on the left half of its input and ``-H / 8`` on the right half,
    ``H`` the input's height: the prediction depends on the scale it is run at. Records the
    input sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x):
        n, _, h, w = x.shape
        self.sizes.append((h, w))
        class1 = torch.full((n, h, w), h / 8)
        class1[:, :, w // 2 :] *= -1
        return {"out": two_class_logits(class1)}


def test_multi_scale_averages_the_predictions_of_every_scale_resized_back():
    image = torch.randn(1, 3, 16, 32)
    model = HeightSides()
    probs = predict_probs(model, image, InferenceRecipe(scales=(0.5, 1.0, 2.0)), num_classes=2)
    # The image was resized by each factor; the result is at the input's size.
    assert model.sizes == [(8, 16), (16, 32), (32, 64)]
    assert probs.shape == (1, 2, 16, 32)
    # Heights 8, 16, 32 give logits ±1, ±2, ±4; their probabilities are averaged. Columns 0..14
    # and 17..31 lie inside one half at every scale once resized back (bilinear); 15 and 16
    # straddle the edge at scale 0.5.
    left = two_class_probs(torch.tensor([1.0, 2.0, 4.0])).mean(0)  # (2,)
    right = two_class_probs(torch.tensor([-1.0, -2.0, -4.0])).mean(0)
    torch.testing.assert_close(probs[0, :, :, :15], left.view(2, 1, 1).expand(2, 16, 15))
    torch.testing.assert_close(probs[0, :, :, 17:], right.view(2, 1, 1).expand(2, 16, 15))
    single = predict_probs(HeightSides(), image, InferenceRecipe(), num_classes=2)
    torch.testing.assert_close(single[0, :, 0, 0], two_class_probs(torch.tensor([2.0]))[0])
    assert (probs - single).abs()[:, :, :, :15].min() > 0.01


def test_multi_scale_rounds_the_resized_size_and_combines_with_flip():
    image = torch.randn(1, 3, 16, 20)
    model = HeightSides()
    recipe = InferenceRecipe(scales=(0.3, 1.5), flip=True)
    probs = predict_probs(model, image, recipe, num_classes=2)
    # round(16 × 0.3) = 5, 20 × 0.3 = 6; each scale once as is, once mirrored
    assert model.sizes == [(5, 6), (5, 6), (24, 30), (24, 30)]
    # Mirroring swaps the (even-width) halves, so each scale adds p and 1 - p at every pixel.
    torch.testing.assert_close(probs, torch.full((1, 2, 16, 20), 0.5))
    unflipped = predict_probs(
        HeightSides(), image, InferenceRecipe(scales=(0.3, 1.5)), num_classes=2
    )
    assert (unflipped - probs).abs().max() > 0.1


def test_recipe_validation_names_the_problem():
    with pytest.raises(ValueError, match="crop_size"):
        InferenceRecipe(mode="slide")
    with pytest.raises(ValueError, match="mode"):
        InferenceRecipe(mode="tiles")
    with pytest.raises(ValueError, match="stride"):  # gaps between windows: no prediction
        InferenceRecipe(mode="slide", crop_size=(8, 8), stride=(8, 10))
    with pytest.raises(ValueError, match="scales"):
        InferenceRecipe(scales=(0.0,))
    with pytest.raises(ValueError, match="unknown inference option"):
        InferenceRecipe.from_dict({"window": 3})
    recipe = InferenceRecipe(mode="slide", crop_size=[8, 8], scales=[1, 2])
    assert InferenceRecipe.from_dict(recipe.to_dict()) == recipe


def test_to_tensor_handles_grey_and_rgb():
    grey = np.full((5, 6), 255, np.uint8)
    tensor = to_tensor(grey, in_channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    assert tensor.shape == (1, 3, 5, 6)
    torch.testing.assert_close(tensor, torch.ones(1, 3, 5, 6))
    rgb = np.zeros((5, 6, 3), np.uint8)
    assert to_tensor(rgb, in_channels=1, mean=[0.0], std=[1.0]).shape == (1, 1, 5, 6)
    with pytest.raises(ValueError, match="channels"):
        to_tensor(np.zeros((5, 6, 2), np.uint8), in_channels=3, mean=[0] * 3, std=[1] * 3)


def test_segment_returns_labels_and_probabilities():
    image = np.random.default_rng(0).integers(0, 255, (21, 17, 3), dtype=np.uint8)
    labels, probs = segment(
        Pointwise().eval(),
        image,
        recipe=InferenceRecipe(),
        num_classes=4,
        in_channels=3,
        normalization={"mean": [0.5] * 3, "std": [0.25] * 3},
    )
    assert labels.shape == (21, 17) and labels.dtype == np.uint8
    assert probs.shape == (4, 21, 17)
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_segment_with_crf_snaps_a_blurred_prediction_to_the_image_edge():
    """The CRF stage of the recipe (DeepLab v1/v2) refines probabilities with the image."""

    class BlurredEdge(nn.Module):
        """Predicts the right class but with a soft boundary 6 pixels off the true edge."""

        def forward(self, x):
            width = x.shape[-1]
            ramp = torch.linspace(-3.0, 3.0, width).view(1, 1, 1, width) + 0.6
            logits = torch.cat([-ramp, ramp], dim=1).expand(x.shape[0], 2, x.shape[2], width)
            return {"out": logits}

    image = np.zeros((32, 64, 3), np.uint8)
    image[:, 32:] = 255  # sharp edge at column 32: class 1 on the right
    truth = np.zeros((32, 64), np.int64)
    truth[:, 32:] = 1
    common = {
        "num_classes": 2,
        "in_channels": 3,
        "normalization": {"mean": [0] * 3, "std": [1] * 3},
    }
    plain, _ = segment(BlurredEdge(), image, recipe=InferenceRecipe(), **common)
    refined, _ = segment(BlurredEdge(), image, recipe=InferenceRecipe(crf=True), **common)
    assert (refined == truth).mean() > (plain == truth).mean()
    assert (refined == truth).mean() > 0.98
