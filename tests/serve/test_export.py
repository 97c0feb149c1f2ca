"""``segplatform export``: every semantic architecture's tiny config exported to ONNX with
dynamic height and width equals the eager network in ONNX Runtime at two input sizes other
than the traced one (PSPNet's and ICNet's adaptive pyramid pooling included); those that
cannot export say why. ``torch.export`` is checked on one architecture, and the command on a
package directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from architectures import ARCHITECTURES, build_from_config, config_to_dict
from segplatform.export import (
    DynamicAdaptiveAvgPool2d,
    ExportError,
    ScatterMaxUnpool2d,
    export_model,
)

SEMANTIC = sorted(
    name
    for name, (_, cls) in ARCHITECTURES.items()
    if getattr(cls, "task", "semantic") == "semantic"
)
# Architectures whose tiny config cannot export, and words of the reason they give.
CANNOT_EXPORT = {
    "unet": "overlap-tiles",  # tiny() keeps the paper's valid padding
}


def _tiny(name: str, **overrides: object) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    config = ARCHITECTURES[name][0].tiny(**overrides)
    return build_from_config(name, config).eval(), config_to_dict(config)


@pytest.mark.parametrize("name", SEMANTIC)
def test_onnx_export_equals_eager_at_two_sizes(name: str, tmp_path: Path) -> None:
    model, config = _tiny(name)
    if name in CANNOT_EXPORT:
        with pytest.raises(ExportError, match=CANNOT_EXPORT[name]):
            export_model(model, name, config, tmp_path, "onnx")
        assert not (tmp_path / "model.onnx").exists()
        return
    result = export_model(model, name, config, tmp_path, "onnx")
    assert [check["size"] for check in result.checks] == [[64, 64], [97, 71]]
    assert all(check["max_abs_diff"] < 1e-4 for check in result.checks), result.checks
    assert Path(result.path).stat().st_size > 0


def test_unet_with_same_padding_exports(tmp_path: Path) -> None:
    model, config = _tiny("unet", padding="same")
    result = export_model(model, "unet", config, tmp_path, "onnx")
    assert all(check["max_abs_diff"] < 1e-4 for check in result.checks)


def test_mask_rcnn_is_refused_with_the_reason(tmp_path: Path) -> None:
    model, config = _tiny("mask_rcnn")
    with pytest.raises(ExportError, match="instance model"):
        export_model(model, "mask_rcnn", config, tmp_path, "onnx")


def test_dynamic_adaptive_pooling_equals_torchs_at_any_size() -> None:
    generator = torch.Generator().manual_seed(0)
    for bins in (1, 2, 3, 6, (2, 5)):
        pool, reference = DynamicAdaptiveAvgPool2d(bins), torch.nn.AdaptiveAvgPool2d(bins)
        for size in ((6, 6), (7, 13), (1, 9), (31, 17)):
            x = torch.randn(2, 3, *size, generator=generator)
            torch.testing.assert_close(pool(x), reference(x))


def test_scatter_unpooling_equals_max_unpool() -> None:
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    pooled, indices = torch.nn.functional.max_pool2d(x, 2, 2, return_indices=True)
    expected = torch.nn.MaxUnpool2d(2, 2)(pooled, indices, output_size=x.shape[-2:])
    torch.testing.assert_close(ScatterMaxUnpool2d()(pooled, indices, x.shape[-2:]), expected)


def test_torch_export_with_dynamic_sizes(tmp_path: Path) -> None:
    model, config = _tiny("deeplab_v1")
    result = export_model(model, "deeplab_v1", config, tmp_path, "torch-export")
    assert all(check["max_abs_diff"] < 1e-4 for check in result.checks)
    assert result.dynamic_range["height"]["max"] is None  # unbounded
    program = torch.export.load(result.path)
    images = torch.randn(1, 3, 50, 77)
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(images), model(images)["out"])


def test_export_command_writes_the_model_and_its_description(
    tiny_package: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime
    from matplotlib import cbook
    from PIL import Image

    from segplatform.cli import main
    from segplatform.package import load_package

    out = tmp_path / "exported"
    assert main(["export", "--model", tiny_package, "--format", "onnx", "--out", str(out)]) == 0
    assert "max |export - network|" in capsys.readouterr().out
    description = json.loads((out / "export.json").read_text())
    assert description["file"] == "model.onnx" and description["input"]["name"] == "image"
    assert description["classes"] == ["background", "left", "right"]
    # ONNX Runtime on a real photograph (matplotlib's sample image, at two sizes in one batch's
    # worth of calls) labels every pixel as the eager network of the package does.
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    model, meta = load_package(tiny_package)
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    mean = torch.tensor(meta.normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta.normalization["std"]).view(1, 3, 1, 1)
    for size in ((96, 80), (61, 45)):  # (width, height), the second odd
        pixels = np.asarray(photo.resize(size, Image.BILINEAR), np.float32) / 255.0
        images = (torch.from_numpy(pixels).permute(2, 0, 1)[None] - mean) / std
        logits = session.run(None, {"image": images.numpy()})[0]
        assert logits.shape == (1, 3, size[1], size[0])
        with torch.no_grad():
            eager = model(images)["out"]
        np.testing.assert_allclose(logits, eager.numpy(), atol=1e-4)
        labels = eager.argmax(1).numpy()
        np.testing.assert_array_equal(logits.argmax(1), labels)
        assert len(np.unique(labels)) > 1  # a photograph, not a blank: several labels to agree on

    with pytest.raises(SystemExit) as refused:
        main(["export", "--model", tiny_package, "--format", "tflite", "--out", str(out)])
    assert refused.value.code == 2 and "invalid choice" in capsys.readouterr().err
