"""Model-level comparisons on the CPU: P3 (ours vs torchvision), P5 (ICNet vs PSPNet), P7 (table).

All run in the suite's process with ``torch.set_num_threads`` pinned, on random inputs (speed
does not depend on the values for these dense networks), models in their training or eval mode
as the measurement needs.

- **P3**: our ``deeplab_v3`` with a ResNet-50 backbone against torchvision's
  ``deeplabv3_resnet50`` (no auxiliary head), forward + cross-entropy + backward + SGD step on the
  same batch, reported as training multiply-accumulates per second (3 × the forward MACs that
  ``architectures.flops.count_macs`` counts, per image, times images/s). torchvision's network
  runs at output stride 8 (rates 12/24/36): ours at stride 8 is the like-for-like arm; the
  paper's default stride 16 is reported beside it.
- **P5**: ICNet (the paper's width 0.5, ResNet-50 trunk) against PSPNet ResNet-50 (output stride
  8), one 1024×2048 image, ``torch.inference_mode`` forward latency. The ICNet paper (Zhao et al.,
  ECCV 2018, arXiv:1704.08545, Table 2) reports 33 ms against about 170 ms on a TitanX.
- **P7**: per architecture at its paper configuration: parameters, MACs at the paper's input
  (counted on PyTorch's meta device: no arithmetic runs), CPU latency at 512×512, and training
  images/s at the tiny configuration and at the paper configuration (crops given in the table).
  Published figures where the papers state them: FCN-VGG16 134M parameters (Long et al., CVPR
  2015, Table 1), SegNet 29.5M (Badrinarayanan et al., TPAMI 2017, Table 6), DeepLab-LargeFOV
  20.5M (Chen et al., ICLR 2015, Table 2).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["PAPER_INPUTS", "PAPER_PARAMS", "forward_fn", "seconds_per_call", "train_step_fn"]

# Input size of each architecture's paper (H, W), for the MACs column of P7.
PAPER_INPUTS: dict[str, tuple[tuple[int, int], str]] = {
    "fcn32s": ((500, 500), "PASCAL VOC images (at most 500×500)"),
    "fcn16s": ((500, 500), "PASCAL VOC images (at most 500×500)"),
    "fcn8s": ((500, 500), "PASCAL VOC images (at most 500×500)"),
    "segnet": ((360, 480), "CamVid"),
    "unet": ((572, 572), "the input tile of Fig. 1"),
    "deeplab_v1": ((321, 321), "VOC crop (v2's 321×321)"),
    "deeplab_v2": ((321, 321), "VOC crop"),
    "deeplab_v3": ((513, 513), "VOC crop"),
    "pspnet": ((473, 473), "VOC crop"),
    "refinenet": ((512, 512), "none stated; 512×512"),
    "icnet": ((1024, 2048), "Cityscapes"),
    "mask_rcnn": ((800, 1333), "COCO, shorter side 800"),
}
# Parameter counts the papers publish (millions) and where.
PAPER_PARAMS: dict[str, tuple[float, str]] = {
    "fcn8s": (134.0, "FCN Table 1 (FCN-VGG16)"),
    "segnet": (29.5, "SegNet Table 6"),
    "deeplab_v1": (20.5, "DeepLab Table 2 (LargeFOV)"),
}


def _sync() -> None:
    pass  # CPU: every op has finished when it returns


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    """Wall seconds per call of ``fn`` over ``calls`` calls."""
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - began) / calls


def _is_detection(model: nn.Module) -> bool:
    return getattr(model, "task", "semantic") == "instance"


def _detection_targets(batch: int, size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    height, width = size
    targets = []
    for _ in range(batch):
        masks = torch.zeros(1, height, width, dtype=torch.uint8)
        masks[0, height // 4 : height // 2, width // 4 : width // 2] = 1
        box = torch.tensor([[width / 4, height / 4, width / 2, height / 2]])
        targets.append({"boxes": box, "labels": torch.tensor([1]), "masks": masks})
    return targets


def train_step_fn(
    model: nn.Module, *, batch: int, size: tuple[int, int], channels: int, num_classes: int
) -> Callable[[], None]:
    """One forward + loss + backward + SGD step on a fixed random batch."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, channels, *size, generator=generator)
    labels = torch.randint(0, num_classes, (batch, *size), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()
    if _is_detection(model):
        targets = _detection_targets(batch, size)

        def detection_step() -> None:
            losses = model(list(images), targets)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()

        return detection_step

    def step() -> None:
        outputs = model(images)
        logits = outputs["out"] if isinstance(outputs, dict) else outputs
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def forward_fn(model: nn.Module, *, size: tuple[int, int], channels: int) -> Callable[[], None]:
    """One eval-mode forward pass of one random image under ``torch.inference_mode``."""
    image = torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(0))
    model.eval()
    detection = _is_detection(model)

    def forward() -> None:
        with torch.inference_mode():
            model(list(image)) if detection else model(image)

    return forward


def meta_macs(arch: str, params: dict[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """``(parameters, forward MACs at size)`` counted on the meta device (nothing computed)."""
    import architectures
    from architectures.flops import count_macs, count_params

    config = architectures.build_config(arch, **params)
    channels = int(getattr(config, "in_channels", 3))
    with torch.device("meta"):
        model = architectures.build_from_config(arch, config)
    try:
        return count_params(model), count_macs(model, size, channels)
    except Exception:  # data-dependent control flow (detection): count on real tensors
        model = architectures.build_from_config(arch, config)
        return count_params(model), count_macs(model, size, channels)


def median_window(fn: Callable[[], Any], *, warmup: int, calls: int, windows: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(seconds_per_call(fn, calls) for _ in range(windows))


def _macs(build: Callable[[], nn.Module], size: tuple[int, int], channels: int = 3) -> int:
    """Forward MACs of one image, the model built on the meta device."""
    from architectures.flops import count_macs

    with torch.device("meta"):
        model = build()
    return count_macs(model, size, channels)


# ---- P3 -------------------------------------------------------------------------------------


def p3(ctx: Any) -> Any:
    """Our DeepLab v3 ResNet-50 against torchvision's, training MACs per second."""
    import torchvision

    import architectures
    from segplatform.bench.common import Comparison, Section, interleave, ratios

    size, batch = ((64, 64), 2) if ctx.quick else ((192, 192), 2)
    classes = 21

    def ours(stride: int) -> Callable[[], nn.Module]:
        return lambda: architectures.build_model(
            "deeplab_v3", num_classes=classes, backbone="resnet50", output_stride=stride
        )

    def theirs() -> nn.Module:
        return torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=classes, aux_loss=False
        )

    builders = {"ours, stride 8": ours(8), "torchvision": theirs, "ours, stride 16": ours(16)}
    macs = {name: _macs(build, size) for name, build in builders.items()}
    steps = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build()
        steps[name] = train_step_fn(model, batch=batch, size=size, channels=3, num_classes=classes)

    def arm(name: str) -> Callable[[], float]:
        # Training MACs per second: 3 × forward MACs (forward, and backward for inputs and
        # weights) per image, times images per second.
        return lambda: 3 * macs[name] * batch / seconds_per_call(steps[name], 1)

    ctx.step(f"P3 DeepLab v3 R-50 training steps, {size[0]}×{size[1]}, batch {batch}")
    values = interleave([(name, arm(name)) for name in builders], ctx.repeats)
    section = Section()
    for name in ("ours, stride 8", "ours, stride 16"):
        section.comparisons.append(
            Comparison(
                id="P3",
                name=f"DeepLab v3 R-50 training, {name}",
                ours=f"our deeplab_v3 (ResNet-50, {name.split(', ')[1]}), eager fp32",
                against="torchvision deeplabv3_resnet50 (stride 8), eager fp32",
                quantity="training MACs/s, ours / torchvision",
                values=ratios(values[name], values["torchvision"]),
                arms={name: values[name], "torchvision": values["torchvision"]},
                arm_unit="MACs/s",
                target=(">=", 1.0) if name == "ours, stride 8" else None,
                notes=(
                    f"{size[0]}×{size[1]}, batch {batch}, {ctx.threads} threads; forward "
                    f"GMACs/image: ours {macs[name] / 1e9:.1f}, torchvision "
                    f"{macs['torchvision'] / 1e9:.1f}"
                ),
                details={"forward_macs": macs, "size": size, "batch": batch},
            )
        )
    return section


# ---- P5 -------------------------------------------------------------------------------------


def p5(ctx: Any) -> Any:
    """ICNet against PSPNet ResNet-50: forward latency at 1024×2048."""
    import architectures
    from segplatform.bench.common import Comparison, Section, interleave, ratios

    size = (128, 256) if ctx.quick else (1024, 2048)
    torch.manual_seed(0)
    icnet = architectures.build_model("icnet", num_classes=19)
    pspnet = architectures.build_model("pspnet", num_classes=19, backbone="resnet50")
    forwards = {
        "icnet": forward_fn(icnet, size=size, channels=3),
        "pspnet": forward_fn(pspnet, size=size, channels=3),
    }
    ctx.step(f"P5 ICNet and PSPNet R-50 forward, {size[0]}×{size[1]}")
    values = interleave(
        [(name, lambda fn=fn: 1000 * seconds_per_call(fn, 1)) for name, fn in forwards.items()],
        ctx.repeats,
    )
    macs = {
        "icnet": _macs(lambda: architectures.build_model("icnet", num_classes=19), size),
        "pspnet": _macs(
            lambda: architectures.build_model("pspnet", num_classes=19, backbone="resnet50"), size
        ),
    }
    del icnet, pspnet, forwards
    return Section(
        comparisons=[
            Comparison(
                id="P5",
                name=f"ICNet vs PSPNet R-50 latency, {size[0]}×{size[1]}",
                ours="icnet (width 0.5, ResNet-50 trunk), batch 1, inference mode",
                against="pspnet ResNet-50, output stride 8, same input",
                quantity="PSPNet latency / ICNet latency",
                values=ratios(values["pspnet"], values["icnet"]),
                arms=values,
                arm_unit="ms",
                target=(">=", 5.0),
                notes=(
                    f"{ctx.threads} threads; forward GMACs: ICNet {macs['icnet'] / 1e9:.1f}, "
                    f"PSPNet {macs['pspnet'] / 1e9:.1f}; paper (TitanX): 33 vs ~170 ms"
                ),
                details={"forward_macs": macs, "size": size},
            )
        ]
    )


# ---- P7 -------------------------------------------------------------------------------------


def p7(ctx: Any) -> Any:
    """Per architecture: parameters, MACs at the paper's input, CPU latency, training images/s."""
    import gc

    import architectures
    from segplatform.bench.common import Section, Table

    latency_size = (64, 64) if ctx.quick else (512, 512)
    tiny_crop, tiny_batch = ((64, 64), 2) if ctx.quick else ((128, 128), 2)
    paper_crop = (256, 256)
    rows = []
    for arch in architectures.ARCHITECTURES:
        ctx.step(f"P7 {arch}")
        (height, width), _ = PAPER_INPUTS[arch]
        params, macs = meta_macs(arch, {}, (height, width))
        config_class = architectures.config_class(arch)
        tiny = config_class.tiny()
        classes = 21
        torch.manual_seed(0)
        tiny_model = architectures.build_from_config(arch, config_class.tiny(num_classes=classes))
        channels = int(getattr(tiny, "in_channels", 3))
        tiny_step = train_step_fn(
            tiny_model, batch=tiny_batch, size=tiny_crop, channels=channels, num_classes=classes
        )
        tiny_ips = tiny_batch / median_window(tiny_step, warmup=1, calls=2, windows=1)
        del tiny_model, tiny_step
        latency_ms = paper_ips = None
        if not ctx.quick:
            # The paper's input channels, not the tiny config's (U-Net: 1 grey channel vs 3).
            paper_channels = int(getattr(architectures.build_config(arch), "in_channels", 3))
            model = architectures.build_model(arch, num_classes=classes)
            forward = forward_fn(model, size=latency_size, channels=paper_channels)
            latency_ms = 1000 * median_window(forward, warmup=1, calls=1, windows=2)
            # Batch 2: batch norm after global pooling (PSPNet's bin 1, DeepLab v3's image
            # pooling) cannot train on one 1×1 value per channel.
            step = train_step_fn(
                model, batch=2, size=paper_crop, channels=paper_channels, num_classes=classes
            )
            paper_ips = 2 / median_window(step, warmup=1, calls=2, windows=1)
            del model, forward, step
        else:
            model = architectures.build_from_config(arch, config_class.tiny(num_classes=classes))
            latency_ms = 1000 * median_window(
                forward_fn(model, size=latency_size, channels=channels),
                warmup=1,
                calls=1,
                windows=1,
            )
            del model
        gc.collect()
        published = PAPER_PARAMS.get(arch)
        rows.append(
            [
                arch,
                round(params / 1e6, 1),
                f"{published[0]:g}M ({published[1]})" if published else "—",
                f"{height}×{width}",
                round(macs / 1e9, 1),
                None if latency_ms is None else round(latency_ms, 1),
                round(tiny_ips, 2),
                None if paper_ips is None else round(paper_ips, 2),
            ]
        )
    config = "tiny" if ctx.quick else "paper"
    return Section(
        tables=[
            Table(
                id="P7",
                title="Per architecture (paper configuration, random weights, CPU)",
                columns=[
                    "architecture",
                    "params (M)",
                    "paper params",
                    "paper input",
                    "GMACs at paper input",
                    f"latency {latency_size[0]}² ms ({config})",
                    f"train img/s tiny {tiny_crop[0]}², batch {tiny_batch}",
                    f"train img/s paper {paper_crop[0]}², batch 2",
                ],
                rows=rows,
                notes=(
                    f"{ctx.threads} threads; MACs counted on the meta device "
                    "(architectures.flops: convolutions and matrix products); latency: median "
                    "of forward passes after one warm-up; training: SGD steps on random data "
                    "(Mask R-CNN: one box per image)."
                ),
            )
        ]
    )
