"""Export a model package to ONNX or ``torch.export`` with dynamic height and width.

``export_package(uri, out_dir, fmt)`` loads a package (directory, ``s3://``, ``models:/...``),
exports its network (image ``(N, C, H, W)`` float, normalized as ``model.json`` says ->
logits ``(N, K, H, W)``), checks the export against the eager network at two input sizes other
than the traced one, and writes ``export.json`` beside it (format, file, input/output names,
classes, palette, normalization, the checks). An export that differs from eager is refused
with the reason (``ExportError``), never written as if it worked.

- ``onnx``: ``torch.onnx.export`` with the TorchScript tracer (``dynamo=False``) and dynamic
  axes for batch, height and width (opset 17), checked with ONNX Runtime on CPU. The tracer
  records shape arithmetic (``x.shape`` feeding ``interpolate``, ``pad``, slicing) as graph ops,
  so sizes computed from the input stay dynamic.
- ``torch-export``: ``torch.export.export`` with ``Dim.AUTO`` height and width, saved with
  ``torch.export.save`` (``model.pt2``; plain tensors are stored as raw bytes). The valid size
  range the exporter inferred goes to ``export.json``.

Modules swapped for export-friendly equivalents first (same results, checked):

- ``nn.AdaptiveAvgPool2d(b)`` (PSPNet's and ICNet's pyramid pooling) by
  ``DynamicAdaptiveAvgPool2d``: the exporters turn adaptive pooling into a fixed-kernel
  ``AveragePool`` computed for the traced size, which is wrong at every size where the feature
  map is not a multiple of the bins (the known trap). The replacement slices PyTorch's bins
  (``[floor(i*H/b), ceil((i+1)*H/b))``) from the input's own shape and averages them.
- ``nn.MaxUnpool2d`` (SegNet) by ``ScatterMaxUnpool2d``: the TorchScript exporter has no
  ``max_unpool2d``; a scatter of the values to their per-plane indices is the same operation.

Known refusals: instance models (Mask R-CNN: detections, not a label map) and U-Net with
``padding='valid'``, whose overlap-tile forward loops over a number of tiles that depends on the
input size (a trace fixes that number).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMATS = ("onnx", "torch-export")
ONNX_OPSET = 17
TRACE_SIZE = (67, 53)  # odd sides: no divisibility the trace could bake in
CHECK_SIZES = ((64, 64), (97, 71))
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


# Why a check fails for architectures known to fail it (added to the error message).
KNOWN_LIMITS: dict[str, str] = {}


class ExportError(RuntimeError):
    """The network cannot be exported with dynamic sizes; the message says why."""


class DynamicAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` whose bins are computed from the input's shape at run time.

    Bin ``i`` of ``b`` over a side of length ``n`` spans ``[floor(i*n/b), ceil((i+1)*n/b))``
    (PyTorch's definition); average pooling over a rectangle is the mean over its rows of the
    means over its columns, so the rows are pooled first, then the columns.
    """

    def __init__(self, output_size: int | tuple[int | None, int | None]) -> None:
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else output_size
        if any(s is None for s in size):
            raise ExportError("adaptive pooling with a None output size is not supported")
        self.output_size = (int(size[0]), int(size[1]))

    def forward(self, x: Tensor) -> Tensor:
        bins_h, bins_w = self.output_size
        height, width = x.shape[-2], x.shape[-1]
        rows = [
            x[:, :, (i * height) // bins_h : ((i + 1) * height + bins_h - 1) // bins_h, :].mean(
                2, keepdim=True
            )
            for i in range(bins_h)
        ]
        x = torch.cat(rows, dim=2)  # (N, C, bins_h, W)
        cols = [
            x[:, :, :, (j * width) // bins_w : ((j + 1) * width + bins_w - 1) // bins_w].mean(
                3, keepdim=True
            )
            for j in range(bins_w)
        ]
        return torch.cat(cols, dim=3)  # (N, C, bins_h, bins_w)


class ScatterMaxUnpool2d(nn.Module):
    """``nn.MaxUnpool2d`` as a scatter: each value goes to its per-plane flat index."""

    def forward(self, x: Tensor, indices: Tensor, output_size: Sequence[int]) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        height, width = output_size[-2], output_size[-1]
        flat = x.new_zeros((n, c, height * width))  # (N, C, H*W)
        flat = flat.scatter(2, indices.reshape(n, c, -1), x.reshape(n, c, -1))
        return flat.view(n, c, height, width)  # (N, C, H, W)


class LogitsOnly(nn.Module):
    """The network's ``"out"`` logits as the single output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)["out"]


def export_ready(model: nn.Module, architecture: str, config: dict[str, Any]) -> nn.Module:
    """A copy of ``model`` (eval mode) with export-friendly modules, wrapped in ``LogitsOnly``;
    ExportError for the known refusals."""
    if getattr(model, "task", "semantic") != "semantic":
        raise ExportError(
            f"{architecture} is an instance model (detections, not a label map); "
            "export covers semantic models"
        )
    if architecture == "unet" and config.get("padding", "valid") == "valid":
        raise ExportError(
            "unet with padding='valid' predicts by overlap-tiles whose number depends on the "
            "input size (a Python loop that a trace fixes at one size); a U-Net with "
            "padding='same' exports"
        )
    ready = copy.deepcopy(model).eval()
    _swap_modules(ready)
    return LogitsOnly(ready).eval()


def _swap_modules(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d):
            setattr(module, name, DynamicAdaptiveAvgPool2d(child.output_size))
        elif isinstance(child, nn.MaxUnpool2d):
            setattr(module, name, ScatterMaxUnpool2d())
        else:
            _swap_modules(child)


@dataclass
class ExportResult:
    """What ``export_model`` wrote and how it compared with eager."""

    format: str
    path: str  # the exported file
    architecture: str
    checks: list[dict[str, Any]] = field(default_factory=list)  # size, max_abs_diff
    seconds: float = 0.0
    dynamic_range: dict[str, Any] | None = None  # torch-export: inferred size bounds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _example(in_channels: int, size: tuple[int, int], batch: int = 1, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, *size, generator=generator)


def export_model(
    model: nn.Module,
    architecture: str,
    config: dict[str, Any],
    out_dir: str | Path,
    fmt: str,
    *,
    in_channels: int = 3,
    check_sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
    trace_size: tuple[int, int] = TRACE_SIZE,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """Export ``model`` to ``out_dir`` in ``fmt`` and check it at ``check_sizes``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ready = export_ready(model.cpu(), architecture, config)
    began = time.monotonic()
    example = _example(in_channels, trace_size, batch=2 if fmt == "torch-export" else 1)
    if fmt == "onnx":
        path = out / "model.onnx"
        run = _export_onnx(ready, example, path)
        dynamic_range = None
    else:
        path = out / "model.pt2"
        run, dynamic_range = _export_torch(ready, example, path)
    result = ExportResult(fmt, str(path), architecture, seconds=0.0, dynamic_range=dynamic_range)
    hint = f"; {KNOWN_LIMITS[architecture]}" if architecture in KNOWN_LIMITS else ""
    for index, size in enumerate(check_sizes):
        images = _example(in_channels, size, batch=1, seed=index + 1)
        with torch.inference_mode():
            expected = ready(images)
        try:
            got = run(images)
        except Exception as error:
            path.unlink(missing_ok=True)
            raise ExportError(
                f"{architecture}: the {fmt} export fails at {size[0]}x{size[1]} "
                f"({type(error).__name__}: {str(error).splitlines()[0][:300]}){hint}"
            ) from None
        if got.shape != expected.shape:
            path.unlink(missing_ok=True)
            raise ExportError(
                f"{architecture}: the {fmt} export gives {tuple(got.shape)} at {size[0]}x{size[1]}"
                f" where the network gives {tuple(expected.shape)}: a size the trace fixed{hint}"
            )
        diff = float((got - expected).abs().max())
        result.checks.append({"size": list(size), "max_abs_diff": diff})
        if not torch.allclose(got, expected, atol=atol, rtol=rtol):
            path.unlink(missing_ok=True)
            raise ExportError(
                f"{architecture}: the {fmt} export differs from the network at "
                f"{size[0]}x{size[1]} (max |diff| {diff:.3g}): the forward depends on the "
                f"input size in a way the export fixed{hint}"
            )
    result.seconds = round(time.monotonic() - began, 2)
    return result


def _export_onnx(ready: nn.Module, example: Tensor, path: Path) -> Any:
    import onnxruntime

    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation notices
        try:
            torch.onnx.export(
                ready,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                opset_version=ONNX_OPSET,
            )
        except Exception as error:
            raise ExportError(
                f"the ONNX exporter refused the network ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:300]})"
            ) from None
    ready.eval()  # the exporter restores the training flag it found; keep eval
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])

    return run


def _export_torch(ready: nn.Module, example: Tensor, path: Path) -> tuple[Any, dict[str, Any]]:
    from torch.export import Dim

    shapes = ({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(ready, (example,), dynamic_shapes=shapes)
        except Exception as error:
            raise ExportError(
                f"torch.export refused the network ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:300]})"
            ) from None
    torch.export.save(program, str(path))
    placeholder = [n for n in program.graph.nodes if n.op == "placeholder"][-1]
    shape = placeholder.meta["val"].shape
    ranges = {}
    for axis, name in ((0, "batch"), (2, "height"), (3, "width")):
        size = shape[axis]
        if isinstance(size, int):
            ranges[name] = {"min": size, "max": size}
        else:
            bounds = program.range_constraints.get(size.node.expr)
            ranges[name] = {
                "min": _finite(bounds.lower) if bounds else None,
                "max": _finite(bounds.upper) if bounds else None,
            }
    module = program.module()

    def run(images: Tensor) -> Tensor:
        with torch.inference_mode():
            return module(images)

    return run, ranges


def _finite(value: Any) -> int | None:
    """``int(value)`` for a finite sympy bound, None for infinity."""
    try:
        number = int(value)
    except Exception:  # sympy's int_oo
        return None
    return number if abs(number) < 2**62 else None


def export_package(
    uri: str,
    out_dir: str | Path,
    fmt: str,
    *,
    check_sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
    storage_options: dict | None = None,
) -> ExportResult:
    """Export the package at ``uri`` and write ``export.json`` beside the file."""
    from segplatform.package import load_package

    model, meta = load_package(
        uri, device="cpu", storage_options=storage_options, memory_format=torch.contiguous_format
    )
    result = export_model(
        model,
        meta.architecture,
        meta.config,
        out_dir,
        fmt,
        in_channels=meta.in_channels,
        check_sizes=check_sizes,
    )
    description = {
        "format": fmt,
        "file": Path(result.path).name,
        "source": str(uri),
        "architecture": meta.architecture,
        "input": {"name": INPUT_NAME, "shape": ["batch", meta.in_channels, "height", "width"]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", meta.num_classes, "height", "width"]},
        "normalization": meta.normalization,
        "classes": list(meta.classes),
        "palette": [list(rgb) for rgb in meta.palette],
        "ignore_index": meta.ignore_index,
        "inference": meta.inference,
        "checks": result.checks,
        "dynamic_range": result.dynamic_range,
    }
    if fmt == "onnx":
        description["opset"] = ONNX_OPSET
    (Path(out_dir) / "export.json").write_text(json.dumps(description, indent=2) + "\n")
    return result
