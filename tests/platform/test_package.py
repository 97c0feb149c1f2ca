"""Model packages: save, load, rebuild through the registry, locally and on S3."""

from __future__ import annotations

import json

import pytest
import torch

import architectures
from segplatform.package import PackageError, load_package, read_package_meta, save_package

CLASSES = ("background", "grey matter", "white matter")
PALETTE = ((0, 0, 0), (200, 80, 80), (80, 200, 80))


def _tiny(name: str = "unet"):
    config = architectures.config_class(name).tiny(num_classes=len(CLASSES))
    torch.manual_seed(0)
    return architectures.build_from_config(name, config).eval(), config


def _save(directory, **kwargs):
    model, config = _tiny()
    options = {"classes": CLASSES, "palette": PALETTE, **kwargs}
    save_package(directory, model, "unet", config, **options)
    return model


def test_round_trip_gives_identical_outputs(tmp_path):
    model = _save(tmp_path / "pkg", inference={"flip": True}, metrics={"val_miou": 0.5})
    loaded, meta = load_package(tmp_path / "pkg")
    assert not loaded.training
    # The inference path's layout: channels-last convolution weights (same values).
    first_conv = next(m for m in loaded.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    exact, _ = load_package(tmp_path / "pkg", memory_format=torch.contiguous_format)
    image = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(exact(image)["out"], model(image)["out"], rtol=0, atol=0)
        # Only float summation order differs in channels-last.
        torch.testing.assert_close(loaded(image)["out"], model(image)["out"], rtol=0, atol=1e-5)
    assert meta.architecture == "unet" and meta.classes == CLASSES and meta.palette == PALETTE
    assert meta.inference == {"flip": True} and meta.metrics["val_miou"] == 0.5
    assert meta.num_classes == 3 and meta.in_channels == 3


def test_round_trip_on_s3(s3_server, tmp_path):
    uri = "s3://test/packages/unet-1"
    options = s3_server.storage_options()
    model, config = _tiny()
    save_package(
        uri, model, "unet", config, classes=CLASSES, palette=PALETTE, storage_options=options
    )
    loaded, _ = load_package(uri, storage_options=options, memory_format=torch.contiguous_format)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image)["out"], model(image)["out"], rtol=0, atol=0)
    assert read_package_meta(uri, options).architecture == "unet"


def test_pretrained_locations_are_not_stored(tmp_path):
    model, config = _tiny("deeplab_v3")
    save_package(tmp_path / "p", model, "deeplab_v3", config, classes=CLASSES, palette=PALETTE)
    stored = json.loads((tmp_path / "p" / "model.json").read_text())["config"]
    assert stored["pretrained_backbone"] is None
    assert isinstance(stored["atrous_rates"], list)
    loaded, _ = load_package(tmp_path / "p")
    assert loaded.config == config  # lists come back as the config's tuples


def test_bad_packages_are_refused_with_the_reason(tmp_path):
    with pytest.raises(PackageError, match="not a model package"):
        load_package(tmp_path)
    _save(tmp_path / "pkg")
    meta_path = tmp_path / "pkg" / "model.json"
    good = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**good, "format": "other/9"}))
    with pytest.raises(PackageError, match="unknown package format"):
        load_package(tmp_path / "pkg")

    meta_path.write_text(json.dumps({**good, "config": {**good["config"], "num_classes": 7}}))
    with pytest.raises(PackageError, match="weights do not match"):
        load_package(tmp_path / "pkg")

    meta_path.write_text(json.dumps({**good, "config": {**good["config"], "depth_x": 1}}))
    with pytest.raises(PackageError, match="cannot rebuild"):
        load_package(tmp_path / "pkg")

    meta_path.write_text(json.dumps(good))
    (tmp_path / "pkg" / "model.safetensors").unlink()
    with pytest.raises(PackageError, match="weights file"):
        load_package(tmp_path / "pkg")

    with pytest.raises(PackageError, match="palette"):
        _save(tmp_path / "p2", palette=PALETTE[:2])
