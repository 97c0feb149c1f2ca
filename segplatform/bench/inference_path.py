"""P4: the inference path that evaluation and serving use, against our eager model.

The path is ``segplatform.evaluate.segment_image`` (what ``segplatform evaluate``, ``predict``
and every Serve replica call): a uint8 image to normalized tensor, ``predict_probs`` under
``torch.inference_mode``, softmax, arg-max, label map. The reference is the network's bare
eager forward on the ready tensor (``torch.no_grad``). Latency of one image, interleaved.

``load_package`` gives the path's model channels-last weights where that was measured faster
(``segplatform.inference.inference_memory_format``); the eager reference keeps NCHW.

Beside it, the ways to a faster path that the suite measures on the same models (each as
eager latency / its latency): ONNX Runtime on the CPU
(``segplatform.export``: the exported network, checked against eager at two sizes); TorchScript
traced, frozen and ``optimize_for_inference`` (folds batch norm into convolutions, prepacks
oneDNN weights); bf16 autocast (changes the numerics: not a drop-in).

Models: the main job's network (U-Net, 16 base channels, "same" padding, grey input, 4
classes) and DeepLab v3 with a ResNet-50 backbone (21 classes), random weights, 256×256.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["P4_MODELS", "p4"]

P4_MODELS: dict[str, tuple[str, dict[str, Any], int]] = {
    "U-Net 16": ("unet", {"padding": "same", "base_channels": 16, "in_channels": 1}, 4),
    "DeepLab v3 R-50": ("deeplab_v3", {"backbone": "resnet50"}, 21),
}


def _package(scratch: Path, label: str, arch: str, params: dict[str, Any], classes: int) -> str:
    import architectures
    from segplatform.package import save_package

    config = architectures.build_config(arch, num_classes=classes, **params)
    torch.manual_seed(0)
    model = architectures.build_from_config(arch, config).eval()
    channels = int(getattr(config, "in_channels", 3))
    return save_package(
        scratch / label.replace(" ", "-"),
        model,
        arch,
        config,
        classes=[f"class{i}" for i in range(classes)],
        palette=[(i, i, i) for i in range(classes)],
        normalization={"mean": [0.5] * channels, "std": [0.25] * channels},
    )


def _candidates(
    model: torch.nn.Module, meta: Any, tensor: torch.Tensor, scratch: Path, threads: int
) -> dict[str, Callable[[], Any]]:
    """The faster paths tried (module docstring), by name; one that cannot be built is left out."""
    from segplatform.export import LogitsOnly, export_model

    arms: dict[str, Callable[[], Any]] = {}

    def bf16() -> Any:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(tensor)["out"]

    arms["bf16 autocast"] = bf16
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(LogitsOnly(copy.deepcopy(model)).eval(), tensor)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            frozen(tensor)

        def torchscript() -> Any:
            with torch.inference_mode():
                return frozen(tensor)

        arms["TorchScript frozen"] = torchscript
    except Exception:  # a model the tracer cannot take is left out
        pass
    try:
        import onnxruntime

        result = export_model(
            model,
            meta.architecture,
            meta.config,
            scratch / f"onnx-{meta.architecture}",
            "onnx",
            in_channels=meta.in_channels,
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            result.path, options, providers=["CPUExecutionProvider"]
        )
        array = tensor.numpy()

        def onnx() -> Any:
            return session.run(None, {"image": array})[0]

        arms["ONNX Runtime"] = onnx
    except Exception:  # export refused: left out
        pass
    return arms


def p4(ctx: Any) -> Any:
    from segplatform.bench.common import Comparison, Section, interleave, ratios
    from segplatform.bench.models import seconds_per_call
    from segplatform.evaluate import segment_image
    from segplatform.inference import to_tensor
    from segplatform.package import load_package

    size = (64, 64) if ctx.quick else (256, 256)
    calls = 1 if ctx.quick else 3
    section = Section()
    for label, (arch, params, classes) in P4_MODELS.items():
        if ctx.quick and arch != "unet":
            continue
        ctx.step(f"P4 {label}: export and candidates")
        package = _package(ctx.scratch, label, arch, params, classes)
        model, meta = load_package(package, memory_format=torch.contiguous_format)
        served, _ = load_package(package)  # the path's own layout (channels-last on the CPU)
        rng = np.random.default_rng(0)
        shape = size if meta.in_channels == 1 else (*size, 3)
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        tensor = to_tensor(
            image,
            in_channels=meta.in_channels,
            mean=meta.normalization["mean"],
            std=meta.normalization["std"],
        )

        def eager(model: Any = model, tensor: torch.Tensor = tensor) -> Any:
            with torch.no_grad():
                return model(tensor)["out"]

        def path(model: Any = served, meta: Any = meta, image: np.ndarray = image) -> Any:
            return segment_image(model, meta, image)

        arms: dict[str, Callable[[], Any]] = {"eager": eager, "path": path}
        arms.update(_candidates(model, meta, tensor, ctx.scratch, ctx.threads))
        ctx.step(f"P4 {label}: {', '.join(arms)}")
        values = interleave(
            [(name, lambda fn=fn: 1000 * seconds_per_call(fn, calls)) for name, fn in arms.items()],
            ctx.repeats,
        )
        common = f"{size[0]}×{size[1]}, batch 1, {ctx.threads} threads"
        section.comparisons.append(
            Comparison(
                id="P4",
                name=f"{label}: inference path",
                ours=(
                    "segment_image on load_package's model (evaluate/serve path: channels-last "
                    "weights, inference_mode, softmax, arg-max)"
                ),
                against="the eager network's forward (no_grad)",
                quantity="eager latency / path latency",
                values=ratios(values["eager"], values["path"]),
                arms={"path": values["path"], "eager": values["eager"]},
                arm_unit="ms",
                target=(">=", 1.5),
                notes=common,
            )
        )
        for name in arms:
            if name in ("eager", "path"):
                continue
            section.comparisons.append(
                Comparison(
                    id="P4",
                    name=f"{label}: tried {name}",
                    ours=f"{name} forward (not in the path)",
                    against="the eager network's forward (no_grad)",
                    quantity="eager latency / its latency",
                    values=ratios(values["eager"], values[name]),
                    arms={name: values[name], "eager": values["eager"]},
                    arm_unit="ms",
                    notes=common,
                )
            )
        del model, served, arms
    return section
