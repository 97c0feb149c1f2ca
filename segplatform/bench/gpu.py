"""The GPU figures of the benchmark suite, in one run on one CUDA device.

- training throughput and peak memory of DeepLab v3 ResNet-101 at 513×513, batch 8: AMP bf16 +
  channels-last, bf16 alone, fp32 (mmsegmentation publishes 9.6 GB per GPU for its R-101-D8
  512×512 DeepLab v3, batch 2 per GPU, fp32);
- our DeepLab v3 ResNet-50 against torchvision's ``deeplabv3_resnet50`` (same input, precision and
  memory format): images/s and multiply-accumulates per second (MACs counted with
  ``torch.utils.flop_counter`` for one forward);
- ICNet against PSPNet ResNet-50 inference latency at 1024×2048 (the paper: 33 vs ~170 ms);
- DDP over NCCL with SyncBatchNorm (world size 1) and channels-last: a few training steps of the
  training service's model, loss and optimizer pieces, checked finite.

    python -m segplatform.bench.gpu --out DIR      # writes DIR/gpu.json, prints one line each
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from segplatform.bench.step import measure_forward, measure_step

__all__ = ["forward_macs", "main"]


def forward_macs(model: torch.nn.Module, size: tuple[int, int], channels: int = 3) -> float:
    """Multiply-accumulates of one eval-mode forward pass (FLOPs / 2) of one image."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, *size, device=device))
    model.train()
    return counter.get_total_flops() / 2


def _ddp_nccl_check(device: torch.device) -> dict[str, Any]:
    import torch.distributed as dist
    from torch import nn

    import architectures
    from segplatform.train.losses import SegmentationLoss, total_loss

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = architectures.build_model("pspnet", num_classes=5, backbone="resnet18")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
        model = model.to(memory_format=torch.channels_last)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        criterion = SegmentationLoss("ce")
        images = torch.randn(4, 3, 129, 129, device=device).contiguous(
            memory_format=torch.channels_last
        )
        labels = torch.randint(0, 5, (4, 129, 129), device=device)
        losses = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = total_loss(ddp(images), labels, model.loss_weights(), criterion)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        return {"check": "ddp_nccl_syncbn_bf16_channels_last", "losses": losses}
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    import torchvision

    parser = argparse.ArgumentParser(description="GPU figures of the benchmark suite")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    results: list[dict[str, Any]] = []

    def record(name: str, result: dict[str, Any]) -> None:
        result = {"name": name, **result}
        results.append(result)
        print(json.dumps(result), flush=True)

    size = (513, 513)
    for amp, nhwc in (("bf16", True), ("bf16", False), ("fp32", False)):
        record(
            f"deeplab_v3 r101 train {amp}{' nhwc' if nhwc else ''}",
            measure_step("deeplab_v3", batch=8, size=size, amp=amp, channels_last=nhwc,
                         device="cuda"),
        )  # fmt: skip
    import architectures

    # torchvision's runs at output stride 8 (rates 12/24/36): ours at both 16 (the paper's
    # default) and 8, the like-for-like comparison.
    ours16 = architectures.build_model("deeplab_v3", num_classes=21, backbone="resnet50")
    ours8 = architectures.build_model(
        "deeplab_v3", num_classes=21, backbone="resnet50", output_stride=8
    )
    theirs = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=False
    )
    for label, model in (("ours os16", ours16), ("ours os8", ours8), ("torchvision", theirs)):
        macs = forward_macs(model.to(device), size)
        for amp, nhwc in (("bf16", True), ("fp32", False)):
            result = measure_step(model, batch=8, size=size, amp=amp, channels_last=nhwc,
                                  device="cuda")  # fmt: skip
            result["forward_gmacs_per_image"] = macs / 1e9
            # Training MACs ~ 3 × forward (forward, and backward for inputs and weights).
            result["train_tmacs_per_s"] = 3 * macs * result["images_per_s"] / 1e12
            record(f"deeplab_v3 r50 {label} train {amp}{' nhwc' if nhwc else ''}", result)
    for amp, nhwc in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
        for arch, params in (("icnet", {}), ("pspnet", {"backbone": "resnet50"})):
            record(
                f"{arch} inference 1024x2048 {amp}{' nhwc' if nhwc else ''}",
                measure_forward(arch, params=params, batch=1, size=(1024, 2048), num_classes=19,
                                amp=amp, channels_last=nhwc, device="cuda"),
            )  # fmt: skip
    record("ddp", _ddp_nccl_check(device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
