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


def test_flip_averages_the_mirrored_prediction():
    probs = predict_probs(
        ColumnBias(), torch.zeros(1, 3, 4, 8), InferenceRecipe(flip=True), num_classes=2
    )
    # Each side sees the bias once: unflipped on the left, flipped back on the right.
    plain = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    expected = (plain + torch.tensor([0.5, 0.5])) / 2
    torch.testing.assert_close(probs[0, :, 0, 0], expected)
    torch.testing.assert_close(probs[0, :, 0, -1], expected)


def test_multi_scale_on_constant_image_matches_whole():
    model = Pointwise().eval()
    image = torch.ones(1, 3, 30, 30) * 0.3
    whole = predict_probs(model, image, InferenceRecipe(), num_classes=4)
    multi = predict_probs(model, image, InferenceRecipe(scales=(0.5, 0.75, 1.25)), num_classes=4)
    torch.testing.assert_close(multi, whole)


def test_recipe_validation_names_the_problem():
    with pytest.raises(ValueError, match="crop_size"):
        InferenceRecipe(mode="slide")
    with pytest.raises(ValueError, match="mode"):
        InferenceRecipe(mode="tiles")
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
