"""P2: ingest — Parquet rows to decoded, augmented batches — in the service against a DataLoader.

Both arms read the same Parquet split and produce the same batches (the main job's: 128×128
random crops with flips, ``TrainTransform``), batch 8, and a consumer that does nothing but take
them, so the figure is the pipeline's own rate:

- **service**: ``segplatform.train.batches.TrainBatches`` exactly as a training worker uses it
  (rows read from the Parquet split by the decoding processes, ``loader_tasks=2`` Ray tasks of
  0.5 CPU in flight, each decoding ``TASK_SAMPLES`` samples, per-sample seeds), on a local Ray
  started as ``segplatform.train.run`` starts one for 1 worker.
- **dataloader**: ``torch.utils.data.DataLoader`` with 2 worker processes over a map-style
  dataset of the same rows (``segplatform.bench.learn.ParquetRows``), shuffled.

Each arm runs in a fresh process (threads pinned, one per decoding process in both). Memory is
sampled every 0.2 s during the timed batches as the sum over the processes that hold, decode
and consume the data: the consumer and its DataLoader workers; the consumer and Ray's worker
processes (the task executors). Ray's own daemons (GCS, raylet with the object store,
dashboard) are reported apart. RSS counts pages shared between processes (fork, shared
libraries) once per process; PSS divides them among the processes that share them.

    python -m segplatform.bench.ingest service '{"data": "...", "batches": 30}'
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["IngestSettings", "dataloader_arm", "service_arm"]


@dataclass(frozen=True)
class IngestSettings:
    data: str  # dataset URI
    crop: int = 128
    batch: int = 8
    in_channels: int = 1
    warmup_batches: int = 16
    batches: int = 200  # timed batches (about 2 s: shorter windows measure the ramp-up)
    workers: int = 2  # DataLoader processes; Ray tasks in flight
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> IngestSettings:
        return cls(**json.loads(text))

    def transform_kwargs(self, ignore_index: int) -> dict[str, Any]:
        from segplatform.train import TrainConfig

        norm = TrainConfig().normalization(self.in_channels)
        return {
            "crop_size": (self.crop, self.crop),
            "scale_range": (1.0, 1.0),
            "hflip": True,
            "color_jitter": 0.0,
            "in_channels": self.in_channels,
            "mean": tuple(norm["mean"]),
            "std": tuple(norm["std"]),
            "ignore_index": ignore_index,
        }


def _timed(batches: Any, settings: IngestSettings, pids: Any) -> dict[str, Any]:
    from segplatform.bench.common import PeakMemory

    iterator = iter(batches)
    for _ in range(settings.warmup_batches):
        next(iterator)
    samples = 0
    with PeakMemory(pids) as memory:
        began = time.perf_counter()
        for _ in range(settings.batches):
            batch = next(iterator)
            samples += int(batch[0].shape[0])
        seconds = time.perf_counter() - began
    return {
        "samples_per_s": samples / seconds,
        "seconds": seconds,
        "peak_rss": memory.peak_rss,
        "peak_pss": memory.peak_pss,
        "memory_samples": memory.samples,
    }


def dataloader_arm(settings: IngestSettings) -> dict[str, Any]:
    import psutil
    import torch
    from torch.utils.data import DataLoader

    from segplatform.bench.learn import ParquetRows
    from segplatform.data.format import read_manifest
    from segplatform.data.shards import read_split_tables
    from segplatform.train.transforms import TrainTransform

    info = read_manifest(settings.data)
    rows = ParquetRows(
        read_split_tables(settings.data, "train"),
        TrainTransform(**settings.transform_kwargs(info.ignore_index)),
    )
    loader = DataLoader(
        rows,
        batch_size=settings.batch,
        shuffle=True,
        drop_last=True,
        num_workers=settings.workers,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(settings.seed),
    )

    def forever() -> Any:
        while True:
            yield from loader

    me = psutil.Process()

    def pids() -> list[int]:
        return [me.pid] + [p.pid for p in me.children(recursive=True)]

    return {"arm": "dataloader", **_timed(forever(), settings, pids)}


def _ray_processes() -> tuple[list[int], list[int]]:
    """``(worker processes, daemons)`` of the Ray started by this process."""
    import psutil

    workers, daemons = [], []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        # Task executors are "ray::IDLE" or "ray::<task>"; the per-node agents (dashboard,
        # runtime environments) are "ray::...Agent" and belong with the daemons.
        executor = cmdline.startswith("ray::") and not cmdline.split()[0].endswith("Agent")
        (workers if executor else daemons).append(child.pid)
    return workers, daemons


def service_arm(settings: IngestSettings) -> dict[str, Any]:
    import ray
    import torch

    from segplatform.bench.common import memory_of
    from segplatform.data.format import read_manifest
    from segplatform.data.shards import open_split
    from segplatform.train.batches import BatchSpec, TrainBatches

    info = read_manifest(settings.data)
    # As segplatform.train.run starts Ray for one 0.5-CPU worker: its CPUs plus 2 for decoding.
    ray.init(num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, log_to_driver=False)
    try:
        rows = open_split(settings.data, "train")
        spec = BatchSpec(
            **settings.transform_kwargs(info.ignore_index), seed=settings.seed, source=settings.data
        )
        loader = TrainBatches(
            rows,
            spec,
            batch_size=settings.batch,
            grad_accum=1,
            world_size=1,
            rank=0,
            tasks=settings.workers,
            task_cpus=0.5,
            node_id=ray.get_runtime_context().get_node_id(),
        )

        def batches() -> Any:
            for *_, batch in loader(0, torch.device("cpu")):
                yield batch["image"], batch["mask"]

        def pids() -> list[int]:
            return [os.getpid(), *_ray_processes()[0]]

        result = _timed(batches(), settings, pids)
        daemon_rss, daemon_pss = memory_of(_ray_processes()[1])
    finally:
        ray.shutdown()
    return {
        "arm": "service",
        **result,
        "ray_daemons_rss": daemon_rss,
        "ray_daemons_pss": daemon_pss,
    }


def main(argv: list[str] | None = None) -> int:
    from segplatform.bench.common import arm_main

    return arm_main(
        argv, IngestSettings.from_json, {"dataloader": dataloader_arm, "service": service_arm}
    )


if __name__ == "__main__":
    raise SystemExit(main())


# ---- the comparison (suite side) ------------------------------------------------------------


def p2(ctx: Any) -> Any:
    import torch

    from segplatform.bench.common import Comparison, Section, ratios, run_child
    from segplatform.bench.step import measure_step
    from segplatform.train.batches import TASK_SAMPLES

    if ctx.quick:
        settings = IngestSettings(data=ctx.data, crop=64, warmup_batches=1, batches=3)
    else:
        settings = IngestSettings(data=ctx.data)
    runs: dict[str, list[dict[str, Any]]] = {"service": [], "dataloader": []}
    for repeat in range(ctx.repeats):
        for arm in runs:
            ctx.step(f"P2 ingest, {arm} (repeat {repeat + 1}/{ctx.repeats})")
            runs[arm].append(
                run_child(
                    "segplatform.bench.ingest",
                    [arm, settings.to_json()],
                    threads=1,
                    timeout=ctx.child_timeout(300),
                )
            )
    ctx.step("P2 what the training step consumes (U-Net 16, compute only)")
    torch.set_num_threads(ctx.threads)
    step = measure_step(
        "unet",
        params={"padding": "same", "base_channels": 16, "in_channels": 1},
        batch=settings.batch,
        size=(settings.crop, settings.crop),
        num_classes=4,
        warmup=1 if ctx.quick else 2,
        iters=1 if ctx.quick else 3,
        repeats=1 if ctx.quick else 3,
    )
    service = [r["samples_per_s"] for r in runs["service"]]
    loader = [r["samples_per_s"] for r in runs["dataloader"]]
    common = (
        f"mni152-tissue train split, {settings.crop}² crops + flips, batch {settings.batch}, "
        f"{settings.batches} timed batches after {settings.warmup_batches}; "
        f"{settings.workers} decoding processes, 1 thread each"
    )
    ray_daemons = [r["ray_daemons_rss"] / 1e6 for r in runs["service"]]
    return Section(
        comparisons=[
            Comparison(
                id="P2",
                name="ingest throughput",
                ours=(
                    f"TrainBatches: Ray tasks (2 in flight, 0.5 CPU, {TASK_SAMPLES} samples "
                    "each), object-store rows"
                ),
                against="torch DataLoader, 2 worker processes, same rows and transforms",
                quantity="samples/s, service / DataLoader",
                values=ratios(service, loader),
                arms={"service": service, "dataloader": loader},
                arm_unit="samples/s",
                target=(">=", 1.0),
                notes=common,
            ),
            Comparison(
                id="P2",
                name="ingest peak RSS",
                ours="consumer + Ray worker processes (Ray daemons apart)",
                against="consumer + DataLoader worker processes",
                quantity="peak RSS, service / DataLoader",
                values=ratios(
                    [r["peak_rss"] for r in runs["service"]],
                    [r["peak_rss"] for r in runs["dataloader"]],
                ),
                arms={
                    "service MB": [r["peak_rss"] / 1e6 for r in runs["service"]],
                    "dataloader MB": [r["peak_rss"] / 1e6 for r in runs["dataloader"]],
                    "service PSS MB": [r["peak_pss"] / 1e6 for r in runs["service"]],
                    "dataloader PSS MB": [r["peak_pss"] / 1e6 for r in runs["dataloader"]],
                },
                arm_unit="MB",
                target=("<=", 1.5),
                notes=(
                    "PSS ratio "
                    + ", ".join(
                        f"{s['peak_pss'] / d['peak_pss']:.2f}"
                        for s, d in zip(runs["service"], runs["dataloader"])
                    )
                    + "; Ray daemons (GCS, raylet, object store) "
                    + ", ".join(f"{m:.0f}" for m in ray_daemons)
                    + " MB RSS besides"
                ),
            ),
            Comparison(
                id="P2",
                name="ingest vs training step",
                ours="service ingest samples/s",
                against=f"U-Net 16 training step images/s ({ctx.threads} threads, compute only)",
                quantity="ingest samples/s / step images/s",
                values=[s / step["images_per_s"] for s in service],
                arms={"service": service, "training step": [step["images_per_s"]]},
                arm_unit="img/s",
                target=(">=", 3.0),
                notes="each measured alone on the machine",
            ),
        ]
    )
