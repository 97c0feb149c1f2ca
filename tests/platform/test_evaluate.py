"""``segplatform evaluate`` and ``segplatform predict`` on a saved model package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import architectures
from segplatform.cli import main
from segplatform.data.reader import iter_samples
from segplatform.evaluate import evaluate_model, predict_files
from segplatform.inference import InferenceRecipe, segment
from segplatform.metrics import ConfusionMatrix
from segplatform.package import load_package, save_package


@pytest.fixture
def dataset(tmp_path, tiny_dataset):
    uri = str(tmp_path / "data")
    info = tiny_dataset(uri, splits={"train": 2, "val": 5}, size=(24, 32))
    return uri, info


@pytest.fixture
def package(tmp_path, dataset):
    _, info = dataset
    config = architectures.config_class("unet").tiny(num_classes=info.num_classes)
    torch.manual_seed(0)
    model = architectures.build_from_config("unet", config)
    path = tmp_path / "pkg"
    save_package(
        path,
        model,
        "unet",
        config,
        classes=info.classes,
        palette=info.palette,
        normalization={"mean": [0.5] * 3, "std": [0.25] * 3},
    )
    return str(path)


def test_evaluate_accumulates_one_matrix_over_the_split(dataset, package):
    uri, info = dataset
    result = evaluate_model(package, uri, split="val", device="cpu")
    # The same predictions through a fresh matrix give the same numbers.
    model, meta = load_package(package)
    matrix = ConfusionMatrix(info.num_classes)
    for sample in iter_samples(uri, "val"):
        labels, _ = segment(
            model,
            sample["image"],
            recipe=InferenceRecipe(),
            num_classes=meta.num_classes,
            in_channels=3,
            normalization=meta.normalization,
        )
        matrix.update(torch.from_numpy(labels).long(), torch.from_numpy(sample["mask"]).long())
    expected = matrix.compute()
    assert result["images"] == 5
    assert result["miou"] == pytest.approx(expected["miou"])
    assert result["pixel_acc"] == pytest.approx(expected["pixel_acc"])
    assert len(result["iou"]) == info.num_classes
    assert evaluate_model(package, uri, split="val", limit=2)["images"] == 2


def test_evaluate_cli_writes_json_and_applies_the_recipe(dataset, package, tmp_path, capsys):
    uri, _ = dataset
    out = tmp_path / "metrics.json"
    code = main(
        [
            "evaluate",
            "--model",
            package,
            "--data",
            uri,
            "--flip",
            "--scales",
            "0.5",
            "1",
            "--json",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["recipe"]["flip"] is True and result["recipe"]["scales"] == [0.5, 1.0]
    assert set(result) >= {"pixel_acc", "mean_acc", "miou", "fwiou", "iou", "classes"}
    assert "class2" in capsys.readouterr().out  # the per-class table
    assert main(["evaluate", "--model", package, "--data", uri, "--split", "test"]) == 2
    assert "no split 'test'" in capsys.readouterr().err


def test_predict_writes_indexed_masks_and_overlays(dataset, package, tmp_path):
    uri, info = dataset
    sample = next(iter_samples(uri, "val"))
    image_path = tmp_path / "scan.png"
    Image.fromarray(sample["image"][:, :, :3]).save(image_path)
    (written,) = predict_files(package, [image_path], tmp_path / "out", device="cpu")
    mask = Image.open(written["mask"])
    assert mask.mode == "P" and mask.size == (32, 24)
    model, meta = load_package(package)
    labels, _ = segment(
        model,
        np.asarray(Image.open(image_path).convert("RGB")),
        recipe=InferenceRecipe(),
        num_classes=meta.num_classes,
        in_channels=3,
        normalization=meta.normalization,
    )
    np.testing.assert_array_equal(np.asarray(mask), labels)
    assert mask.getpalette()[:9] == [c for rgb in info.palette for c in rgb][:9]
    assert Image.open(written["overlay"]).size == (32, 24)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        predict_files(package, [tmp_path / "missing.png"], tmp_path / "out")
