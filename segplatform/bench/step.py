"""Training-step and inference throughput of one model, on CUDA or the CPU (same code).

``measure_step`` times forward + backward + optimizer step of a registry architecture on random
images and labels: images per second (median of ``repeats`` timed windows after ``warmup``
steps) and the peak memory the device allocator reached (CUDA) or the peak resident set growth
(CPU). Options: autocast dtype (bf16 / fp16 with a GradScaler / fp32) and channels-last.
``measure_forward`` times inference (``torch.inference_mode``) the same way, for latency.

A model outside the registry (torchvision's own DeepLab v3, for comparison) is passed as a
ready ``nn.Module``. Used by ``segplatform bench`` and runnable alone on a GPU machine:

    python -m segplatform.bench.step --arch deeplab_v3 --size 513 --batch 8 --amp bf16 \\
        --channels-last --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["measure_forward", "measure_step"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _build(arch: str | nn.Module, params: dict[str, Any]) -> tuple[nn.Module, int]:
    """The model and its input channels."""
    if isinstance(arch, nn.Module):
        return arch, 3
    import architectures

    config = architectures.build_config(arch, **params)
    return architectures.build_from_config(arch, config), int(getattr(config, "in_channels", 3))


def _timed(
    step: Callable[[], None], device: torch.device, warmup: int, iters: int, repeats: int
) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    _peak_reset(device)  # after warm-up: cuDNN's algorithm search tries large workspaces
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        windows.append((time.perf_counter() - start) / iters)
    return windows


def measure_step(
    arch: str | nn.Module,
    *,
    params: dict[str, Any] | None = None,
    batch: int = 8,
    size: tuple[int, int] = (513, 513),
    num_classes: int = 21,
    amp: str = "fp32",
    channels_last: bool = False,
    device: str = "cpu",
    warmup: int = 3,
    iters: int = 5,
    repeats: int = 3,
) -> dict[str, Any]:
    """Images/s and peak memory of training steps (module docstring)."""
    dev = torch.device(device)
    params = {"num_classes": num_classes, **(params or {})}
    model, channels = _build(arch, params)
    model = model.to(dev).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = _DTYPES[amp]
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")
    images = torch.randn(batch, channels, *size, device=dev)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch, *size), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(images)
            logits = outputs["out"] if isinstance(outputs, dict) else outputs
            loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    windows = _timed(step, dev, warmup, iters, repeats)
    seconds = statistics.median(windows)
    return {
        "arch": arch if isinstance(arch, str) else type(arch).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "size": list(size),
        "amp": amp,
        "channels_last": channels_last,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "step_s": seconds,
        "step_s_spread": [min(windows), max(windows)],
        "images_per_s": batch / seconds,
        "peak_memory_gb": _peak_bytes(dev) / 1e9,
    }


def measure_forward(
    arch: str | nn.Module,
    *,
    params: dict[str, Any] | None = None,
    batch: int = 1,
    size: tuple[int, int] = (1024, 2048),
    num_classes: int = 19,
    amp: str = "fp32",
    channels_last: bool = False,
    device: str = "cpu",
    warmup: int = 3,
    iters: int = 10,
    repeats: int = 3,
) -> dict[str, Any]:
    """Inference latency per batch (median of the timed windows; module docstring)."""
    dev = torch.device(device)
    params = {"num_classes": num_classes, **(params or {})}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model, channels = _build(arch, params)
    model = model.to(dev).eval().to(memory_format=memory_format)
    images = torch.randn(batch, channels, *size, device=dev)
    images = images.contiguous(memory_format=memory_format)
    dtype = _DTYPES[amp]

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=bool(dtype)):
            model(images)

    windows = _timed(forward, dev, warmup, iters, repeats)
    return {
        "arch": arch if isinstance(arch, str) else type(arch).__name__,
        "batch": batch,
        "size": list(size),
        "amp": amp,
        "channels_last": channels_last,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "latency_ms": 1000 * statistics.median(windows),
        "latency_ms_spread": [1000 * min(windows), 1000 * max(windows)],
        "peak_memory_gb": _peak_bytes(dev) / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True)
    parser.add_argument("--param", action="append", default=[], metavar="K=JSON")
    parser.add_argument("--size", type=int, nargs="+", default=[513])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--amp", choices=tuple(_DTYPES), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--forward", action="store_true", help="inference latency instead")
    args = parser.parse_args(argv)
    params = {}
    for pair in args.param:
        key, _, value = pair.partition("=")
        params[key] = json.loads(value)
    size = (args.size[0], args.size[-1])
    measure = measure_forward if args.forward else measure_step
    result = measure(
        args.arch,
        params=params,
        batch=args.batch,
        size=size,
        num_classes=args.classes,
        amp=args.amp,
        channels_last=args.channels_last,
        device=args.device,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
