"""P1 and P8: training step time in the service against a plain PyTorch loop, and 1 vs 2 workers.

Both arms train the same model on the same Parquet rows with the same augmentation (random crop
and flip, ``segplatform.train.transforms.TrainTransform``), optimizer (AdamW), gradient clipping
and total batch, on the CPU:

- **service**: ``segplatform.train.run`` with 1 or 2 Ray Train workers (the total batch split
  between them): decoding and augmentation in Ray tasks, DDP over gloo with 2 workers, every
  per-step check of the loop. The step time is read from the loop's own progress lines (rank 0
  prints images/s over every ``log_every`` iterations) in the worker logs of the run's Ray
  session; the windows that end within the warm-up iterations are left out.
- **plain**: the loop a PyTorch tutorial writes: a map-style ``Dataset`` over the same Parquet
  rows, a ``DataLoader`` with 2 worker processes, ``torch.optim.AdamW``, ``F.cross_entropy``,
  ``clip_grad_norm_``; the step time is the wall time between optimizer steps (data waits
  included), after the same warm-up.

Same threads: each arm runs in a fresh process with ``OMP_NUM_THREADS`` set. A service worker
computes with one thread (Ray gives a 0.5-CPU worker one), so the plain loop gets as many
threads as the service has workers: 1 against 1 worker, 2 against 2 workers. Decoding runs
beside both (2 DataLoader processes; 2 Ray tasks in flight per worker), one thread each.

    python -m segplatform.bench.training plain '{"data": "...", "threads": 1}'
    python -m segplatform.bench.training service '{"data": "...", "workers": 2}'
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StepSettings", "parse_progress", "plain_arm", "service_arm"]


@dataclass(frozen=True)
class StepSettings:
    """One training-step comparison (the same settings drive both arms)."""

    data: str  # dataset URI
    arch: str = "unet"
    # The main job's network (``make run``): U-Net at a quarter width, "same" padding, grey input.
    arch_params: dict[str, Any] = field(
        default_factory=lambda: {"padding": "same", "base_channels": 16, "in_channels": 1}
    )
    tiny: bool = False
    crop: int = 128
    total_batch: int = 8  # images per optimizer step over all workers
    warmup_steps: int = 6  # steps left out of the timing (a multiple of log_every)
    steps: int = 16  # timed steps (a multiple of log_every)
    log_every: int = 2  # the service's progress period (its timing windows)
    threads: int = 1  # torch threads of the plain loop
    workers: int = 1  # service workers
    loader_workers: int = 2  # DataLoader processes of the plain loop
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StepSettings:
        return cls(**json.loads(text))

    def train_config(self, storage: str, name: str) -> Any:
        """The service's ``TrainConfig``: the main job's recipe, evaluated once at the end."""
        from segplatform.train import TrainConfig

        total = self.warmup_steps + self.steps
        return TrainConfig(
            arch=self.arch,
            tiny=self.tiny,
            arch_params=dict(self.arch_params),
            data=self.data,
            crop_size=(self.crop, self.crop),
            scale_range=(1.0, 1.0),
            hflip=True,
            color_jitter=0.0,
            batch_size=self.total_batch // self.workers,
            num_workers=self.workers,
            max_iters=total,
            eval_every=total,
            log_every=self.log_every,
            optimizer="adamw",
            lr=1e-3,
            weight_decay=0.01,
            grad_clip=1.0,
            seed=self.seed,
            keep_checkpoints=1,
            storage_path=storage,
            name=name,
            overlay_samples=0,
            mlflow_uri=None,
        )


# ---- the plain loop -------------------------------------------------------------------------


def plain_arm(settings: StepSettings) -> dict[str, Any]:
    """Train in a plain PyTorch loop; the wall time of every step (module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import architectures
    from segplatform.bench.learn import ParquetRows
    from segplatform.data.format import read_manifest
    from segplatform.data.shards import read_split_tables
    from segplatform.train.transforms import TrainTransform

    torch.set_num_threads(settings.threads)
    info = read_manifest(settings.data)
    config = settings.train_config("/unused", "plain")
    model_config = config.model_config(num_classes=info.num_classes)
    torch.manual_seed(settings.seed)
    model = architectures.build_from_config(settings.arch, model_config)
    in_channels = int(getattr(model_config, "in_channels", 3))
    transform = TrainTransform(
        crop_size=config.crop_size,
        scale_range=config.scale_range,
        hflip=config.hflip,
        color_jitter=config.color_jitter,
        in_channels=in_channels,
        ignore_index=info.ignore_index,
        **config.normalization(in_channels),
    )
    rows = ParquetRows(read_split_tables(settings.data, "train"), transform)
    loader = DataLoader(
        rows,
        batch_size=settings.total_batch,
        shuffle=True,
        drop_last=True,
        num_workers=settings.loader_workers,
        persistent_workers=settings.loader_workers > 0,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    total = settings.warmup_steps + settings.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - it / total) ** 0.9)
    weights = model.loss_weights()
    model.train()
    times: list[float] = []
    last = time.perf_counter()
    while len(times) < total:
        for image, mask in loader:
            outputs = model(image)
            loss = sum(
                weight * F.cross_entropy(outputs[key], mask, ignore_index=info.ignore_index)
                for key, weight in weights.items()
            )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if len(times) >= total:
                break
    timed = times[settings.warmup_steps :]
    return {
        "arm": "plain",
        "threads": settings.threads,
        "torch_threads": torch.get_num_threads(),
        "step_times": times,
        "step_s": sum(timed) / len(timed),
        "images_per_s": settings.total_batch * len(timed) / sum(timed),
    }


# ---- the service ----------------------------------------------------------------------------

_PROGRESS = re.compile(r"(?P<name>\S+) step (?P<step>\d+)/(?P<max>\d+) .* (?P<ips>[\d.]+) img/s")


def parse_progress(lines: list[str], name: str) -> list[tuple[int, float]]:
    """``(step, images/s)`` of run ``name``'s progress lines (``loop.progress_line``), by step."""
    found: dict[int, float] = {}
    for line in lines:
        match = _PROGRESS.search(line)
        if match and match["name"] == name:
            found[int(match["step"])] = float(match["ips"])
    return sorted(found.items())


def _session_logs() -> str:
    """The log directory of the connected Ray session."""
    try:
        from ray._private import worker

        return worker._global_node.get_logs_dir_path()
    except Exception:  # a private module: fall back to Ray's default location
        return "/tmp/ray/session_latest/logs"


def service_arm(settings: StepSettings) -> dict[str, Any]:
    """Train through ``segplatform.train.run``; the step time of the timed windows."""
    import ray

    from segplatform.train import run

    if settings.warmup_steps % settings.log_every or settings.steps % settings.log_every:
        raise ValueError("warmup_steps and steps must be multiples of log_every")
    name = f"bench-step-w{settings.workers}-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="segplatform-bench-") as storage:
        began = time.monotonic()
        run(settings.train_config(storage, name))
        wall = time.monotonic() - began
        lines: list[str] = []
        for path in glob.glob(os.path.join(_session_logs(), "worker-*.out")):
            with open(path, errors="replace") as file:
                lines.extend(file)
    ray.shutdown()
    windows = [(s, ips) for s, ips in parse_progress(lines, name) if s > settings.warmup_steps]
    expected = settings.steps // settings.log_every
    if len(windows) != expected or any(ips <= 0 for _, ips in windows):
        raise RuntimeError(f"expected {expected} timed progress windows of {name}, got {windows}")
    seconds = sum(settings.log_every * settings.total_batch / ips for _, ips in windows)
    return {
        "arm": "service",
        "workers": settings.workers,
        "windows": windows,
        "step_s": seconds / settings.steps,
        "images_per_s": settings.steps * settings.total_batch / seconds,
        "run_wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    from segplatform.bench.common import arm_main

    return arm_main(argv, StepSettings.from_json, {"plain": plain_arm, "service": service_arm})


if __name__ == "__main__":
    raise SystemExit(main())


# ---- the comparison (suite side) ------------------------------------------------------------


def _settings(ctx: Any, **changes: Any) -> StepSettings:
    if ctx.quick:
        base = StepSettings(
            data=ctx.data, crop=64, total_batch=4, warmup_steps=2, steps=2, log_every=1
        )
    else:
        base = StepSettings(data=ctx.data)
    from dataclasses import replace

    return replace(base, **changes)


def worker_counts(ctx: Any) -> tuple[int, ...]:
    """The service worker counts P1 compares (``--quick``: 2 only, the distributed path)."""
    return (2,) if ctx.quick else (1, 2)


def step_runs(ctx: Any, *, plain: bool = True) -> dict[str, list[dict[str, Any]]]:
    """The P1 arms, interleaved: plain (1 thread), service (1 worker), plain (2 threads),
    service (2 workers), ``ctx.repeats`` times; each run in a fresh process."""
    from segplatform.bench.common import run_child

    arms: list[tuple[str, str, StepSettings, int]] = []
    for workers in worker_counts(ctx):
        if plain:
            arms.append((f"plain t{workers}", "plain", _settings(ctx, threads=workers), workers))
        arms.append((f"service w{workers}", "service", _settings(ctx, workers=workers), 1))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in arms}
    for repeat in range(ctx.repeats):
        for name, arm, settings, threads in arms:
            ctx.step(f"P1 {name} (repeat {repeat + 1}/{ctx.repeats})")
            runs[name].append(
                run_child(
                    "segplatform.bench.training",
                    [arm, settings.to_json()],
                    threads=threads,
                    timeout=ctx.child_timeout(420),
                )
            )
    return runs


def p1(ctx: Any) -> Any:
    from segplatform.bench.common import Comparison, Section, ratios

    runs = step_runs(ctx)
    ctx.shared["p1"] = runs
    settings = _settings(ctx)
    section = Section()
    for workers in worker_counts(ctx):
        service = [r["step_s"] for r in runs[f"service w{workers}"]]
        plain = [r["step_s"] for r in runs[f"plain t{workers}"]]
        section.comparisons.append(
            Comparison(
                id="P1",
                name=f"training step, {workers} worker{'s' if workers > 1 else ''}",
                ours=f"segplatform.train.run, {workers} Ray Train worker(s), 1 thread each",
                against=f"plain PyTorch loop, DataLoader (2 processes), {workers} thread(s)",
                quantity="service step time / plain step time",
                values=ratios(service, plain),
                arms={"service": service, "plain": plain},
                arm_unit="s/step",
                target=("<=", 1.05),
                notes=(
                    f"U-Net 16 (main job), {settings.crop}² crops, total batch "
                    f"{settings.total_batch}, {settings.steps} timed steps after "
                    f"{settings.warmup_steps}; images/s service "
                    + ", ".join(f"{r['images_per_s']:.1f}" for r in runs[f"service w{workers}"])
                    + ", plain "
                    + ", ".join(f"{r['images_per_s']:.1f}" for r in runs[f"plain t{workers}"])
                ),
            )
        )
    return section
