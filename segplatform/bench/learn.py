"""Learning parity: the training service against a plain PyTorch loop, same model and budget.

``segplatform bench learn`` trains one architecture on one dataset twice over:

- **service**: ``segplatform.train.run`` with 1 and with 2 Ray Train workers (the total batch
  split between them), exactly what ``segplatform train`` runs;
- **plain**: a PyTorch loop written the way a tutorial would (a ``Dataset`` over the same Parquet
  rows, a ``DataLoader`` that shuffles, ``torch.optim``, ``LambdaLR``, cross-entropy), with the
  same model config and initial weights (same seed), optimizer settings, poly schedule, total
  batch, iterations and crop, augmentation off in both (no rescale, flip or jitter: a random crop
  only), and gradient clipping where the service clips.

Both are evaluated at the same iterations on the whole validation split with the same metric
(one confusion matrix, FCN §5 mIoU). The report gives both mIoU curves, the final values and the
ratio service / plain per worker count. The two use different shuffles (the service its
(seed, epoch) order, the plain loop the ``DataLoader``'s), so the ratio also carries run-to-run
noise: judge it with a budget long enough for both to converge.

This is a benchmark, not a timed test: ``tests/bench/test_learn.py`` runs a small version and
only checks that the service is not far behind the plain loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LearnSettings", "PlainResult", "learn_parity", "plain_loop", "write_report"]


@dataclass(frozen=True)
class LearnSettings:
    """One parity comparison (the same settings drive both arms)."""

    arch: str = "unet"
    data: str = ""  # dataset URI
    arch_params: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False
    crop_size: tuple[int, int] = (128, 128)
    total_batch: int = 8  # images per optimizer step, over all workers
    iters: int = 150
    eval_every: int = 50
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    poly_power: float = 0.9
    grad_clip: float | None = 1.0
    seed: int = 0
    workers: tuple[int, ...] = (1, 2)  # service arms
    plain_loader_workers: int = 2  # DataLoader processes of the plain loop

    def train_config(self, workers: int, storage: str, name: str) -> Any:
        """The service's ``TrainConfig`` for ``workers`` workers (augmentation off)."""
        from segplatform.train import TrainConfig

        if self.total_batch % workers:
            raise ValueError(f"total_batch {self.total_batch} is not divisible by {workers}")
        return TrainConfig(
            arch=self.arch,
            tiny=self.tiny,
            arch_params=dict(self.arch_params),
            data=self.data,
            crop_size=self.crop_size,
            scale_range=(1.0, 1.0),
            hflip=False,
            color_jitter=0.0,
            batch_size=self.total_batch // workers,
            num_workers=workers,
            max_iters=self.iters,
            eval_every=self.eval_every,
            log_every=max(self.eval_every // 2, 1),
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            poly_power=self.poly_power,
            grad_clip=self.grad_clip,
            seed=self.seed,
            keep_checkpoints=self.iters // self.eval_every + 1,  # every evaluation's metrics
            storage_path=storage,
            name=name,
            overlay_samples=0,
        )


@dataclass
class PlainResult:
    curve: list[tuple[int, float]]  # (iteration, val mIoU)
    seconds: float
    images_per_s: float


# ---- the plain loop -------------------------------------------------------------------------


class ParquetRows:
    """A map-style ``torch.utils.data.Dataset`` over a split's Parquet rows."""

    def __init__(self, tables: Sequence[Any], transform: Callable[..., Any]) -> None:
        self.rows = [(t, r) for t in tables for r in range(t.num_rows)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        from segplatform.data.reader import decode_image, decode_mask

        table, row = self.rows[index]
        image = decode_image(table.column("image")[row].as_py())
        mask = decode_mask(table.column("mask")[row].as_py())
        return self.transform(image, mask)


def _evaluate(model: Any, samples: list[tuple[Any, Any]], num_classes: int, ignore: int) -> float:
    import torch

    from segplatform.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(num_classes, ignore)
    model.eval()
    with torch.no_grad():
        for image, mask in samples:
            logits = model(image[None])["out"]  # (1, K, H, W)
            matrix.update(logits.argmax(1), mask[None])
    model.train()
    return float(matrix.compute()["miou"])


def plain_loop(settings: LearnSettings, log: Callable[[str], None] = print) -> PlainResult:
    """Train ``settings`` in a plain PyTorch loop (module docstring); the val mIoU curve."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import architectures
    from segplatform.data.format import read_manifest
    from segplatform.data.shards import read_split_tables
    from segplatform.train.transforms import EvalTransform, TrainTransform

    info = read_manifest(settings.data)
    config = settings.train_config(1, "/unused", "plain")  # the same model and normalization
    model_config = config.model_config(num_classes=info.num_classes)
    torch.manual_seed(settings.seed)  # the service seeds the same way before building
    model = architectures.build_from_config(settings.arch, model_config)
    in_channels = int(getattr(model_config, "in_channels", 3))
    norm = config.normalization(in_channels)
    common = {"in_channels": in_channels, "ignore_index": info.ignore_index, **norm}
    train = ParquetRows(
        read_split_tables(settings.data, "train"),
        TrainTransform(crop_size=settings.crop_size, scale_range=(1, 1), hflip=False, **common),
    )
    evaluate = EvalTransform(**common)
    val = ParquetRows(read_split_tables(settings.data, "val"), evaluate)
    val_samples = [val[i] for i in range(len(val))]
    loader = DataLoader(
        train,
        batch_size=settings.total_batch,
        shuffle=True,
        drop_last=True,
        num_workers=settings.plain_loader_workers,
        persistent_workers=settings.plain_loader_workers > 0,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    if settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay
        )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - it / settings.iters) ** settings.poly_power
    )
    weights = model.loss_weights()
    curve: list[tuple[int, float]] = []
    step, start, images = 0, time.monotonic(), 0
    model.train()
    while step < settings.iters:
        for image, mask in loader:
            outputs = model(image)
            loss = 0.0
            for key, weight in weights.items():
                logits = outputs[key]
                target = mask
                if logits.shape[-2:] != mask.shape[-2:]:
                    target = F.interpolate(mask[:, None].float(), logits.shape[-2:]).long()[:, 0]
                loss = loss + weight * F.cross_entropy(
                    logits, target, ignore_index=info.ignore_index
                )
            optimizer.zero_grad()
            loss.backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            images += image.shape[0]
            if step % settings.eval_every == 0 or step == settings.iters:
                miou = _evaluate(model, val_samples, info.num_classes, info.ignore_index)
                curve.append((step, miou))
                log(f"plain {settings.arch} step {step}/{settings.iters} val mIoU {miou:.4f}")
            if step >= settings.iters:
                break
    seconds = time.monotonic() - start
    return PlainResult(curve, seconds, images / seconds)


# ---- the service arms -----------------------------------------------------------------------


def service_run(settings: LearnSettings, workers: int, storage: str, name: str) -> dict[str, Any]:
    """Train through ``segplatform.train.run``; the val mIoU curve and throughput."""
    from segplatform.train import run

    start = time.monotonic()
    result = run(settings.train_config(workers, storage, name))
    seconds = time.monotonic() - start
    evaluations = sorted(
        (int(m["step"]), float(m["val_miou"]))
        for _, m in result.best_checkpoints
        if m and "val_miou" in m
    )
    return {
        "workers": workers,
        "curve": evaluations,
        "seconds": seconds,
        "images_per_s": settings.iters * settings.total_batch / seconds,
    }


def learn_parity(
    settings: LearnSettings, out: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Both arms (module docstring); writes ``learn-<arch>.json``, ``.md`` and ``.png``."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log(f"plain PyTorch loop: {settings.arch}, {settings.iters} iterations")
    plain = plain_loop(settings, log)
    arms = []
    for workers in settings.workers:
        log(f"training service: {settings.arch}, {workers} worker(s)")
        name = f"learn-{settings.arch}-w{workers}-{stamp}"
        arms.append(service_run(settings, workers, str(out / "runs"), name))
    final_plain = plain.curve[-1][1]
    report = {
        "settings": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(settings).items()
        },
        "plain": {
            "curve": plain.curve,
            "seconds": plain.seconds,
            "images_per_s": plain.images_per_s,
        },
        "service": [
            {**arm, "ratio": arm["curve"][-1][1] / final_plain if final_plain else math.nan}
            for arm in arms
        ],
    }
    write_report(report, out)
    return report


def write_report(report: dict[str, Any], out: Path) -> Path:
    """``learn-<arch>.json``, a markdown table and a figure of the curves; the markdown path."""
    arch = report["settings"]["arch"]
    (out / f"learn-{arch}.json").write_text(json.dumps(report, indent=1))
    plain = report["plain"]
    lines = [
        "| arm | final val mIoU | ratio to plain | images/s | wall s |",
        "|---|---|---|---|---|",
        f"| plain PyTorch loop | {plain['curve'][-1][1]:.4f} | 1.00 | "
        f"{plain['images_per_s']:.1f} | {plain['seconds']:.0f} |",
    ]
    for arm in report["service"]:
        lines.append(
            f"| service, {arm['workers']} worker(s) | {arm['curve'][-1][1]:.4f} | "
            f"{arm['ratio']:.3f} | {arm['images_per_s']:.1f} | {arm['seconds']:.0f} |"
        )
    markdown = out / f"learn-{arch}.md"
    markdown.write_text("\n".join(lines) + "\n")
    _figure(report, out / f"learn-{arch}.png")
    return markdown


def _figure(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    steps, values = zip(*report["plain"]["curve"])
    axes.plot(steps, values, "o-", label="plain PyTorch loop", color="black")
    for arm in report["service"]:
        steps, values = zip(*arm["curve"])
        axes.plot(steps, values, "s--", label=f"service, {arm['workers']} worker(s)")
    settings = report["settings"]
    axes.set_title(f"{settings['arch']} on {Path(settings['data']).name}")
    axes.set_xlabel("iteration")
    axes.set_ylabel("validation mIoU")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
