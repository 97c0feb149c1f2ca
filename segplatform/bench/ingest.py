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

P9 (``p9``): what the driver of a run holds, and how long until the first batch, as the dataset
grows (the base split repeated 1×, 4×, 16× with new ids). Each (size, arm) runs in a fresh
process with its own local Ray:

- **index** (ours): the driver indexes the splits from their shards' footers (``open_split``)
  and the first batch comes from a decoding task that reads its rows from the dataset;
- **driver reads**: the driver reads every shard of both splits into its heap and puts them in
  Ray's object store, the first batch decoded from there (how rows reached the workers before
  the index, and how a hand-written ``ray.put`` of a dataset does it).

The driver's memory is its RSS sampled every 50 ms from just before it reads the dataset until
the first batch is in (the consumer, one batch, shares the process); the figure is the growth
over the RSS it had before (Python, torch and Ray imported, Ray started).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["IngestSettings", "ScaleSettings", "dataloader_arm", "scale_arm", "service_arm"]


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
        spec = BatchSpec(**settings.transform_kwargs(info.ignore_index), seed=settings.seed)
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


@dataclass(frozen=True)
class ScaleSettings:
    runs: list[list[str]]  # [dataset URI, "index" | "driver reads"], measured in this order
    crop: int = 64

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ScaleSettings:
        return cls(**json.loads(text))


def scale_arm(settings: ScaleSettings) -> dict[str, Any]:
    """P9 measurements in one process and one local Ray (module docstring): ``{"runs": [...]}``,
    one result per entry of ``settings.runs``. The suite gives each measurement a process of
    its own; ``--quick`` runs them all in one (a run-through, not a measurement)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return {"runs": [_scale_run(data, arm, settings.crop) for data, arm in settings.runs]}
    finally:
        ray.shutdown()


def _scale_run(data: str, arm: str, crop: int) -> dict[str, Any]:
    import psutil
    import ray
    import torch

    from segplatform.bench.common import PeakMemory
    from segplatform.data.format import read_manifest
    from segplatform.data.shards import open_split, read_split_tables
    from segplatform.train.batches import BatchSpec, TrainBatches, make_train_batch

    info = read_manifest(data)
    spec = BatchSpec(
        **IngestSettings(data=data, crop=crop).transform_kwargs(info.ignore_index), seed=0
    )
    me = psutil.Process()
    baseline = me.memory_info().rss
    with PeakMemory(lambda: [me.pid], interval=0.05) as memory:
        began = time.perf_counter()
        if arm == "index":
            train = open_split(data, "train")
            open_split(data, "val")
            loader = TrainBatches(train, spec, batch_size=8, grad_accum=1, world_size=1, rank=0)
            next(iter(loader(0, torch.device("cpu"))))
        else:
            refs = []
            for split in ("train", "val"):
                tables = read_split_tables(data, split)
                refs += [ray.put(t) for t in tables]
                memory.sample()  # the tables in the heap, before they go
                del tables

            def first(table: Any) -> Any:
                rows = [
                    {
                        "image": table.column("image")[i].as_py(),
                        "mask": table.column("mask")[i].as_py(),
                        "name": str(i),
                    }
                    for i in range(min(8, table.num_rows))
                ]
                return make_train_batch(rows, list(range(len(rows))), 0, spec)

            ray.get(ray.remote(num_cpus=0.5)(first).remote(refs[0]))
        done = time.perf_counter()
    return {
        "arm": arm,
        "driver_baseline_rss": baseline,
        "driver_peak_rss": memory.peak_rss,
        "driver_growth": memory.peak_rss - baseline,
        "first_batch_s": done - began,
    }


def main(argv: list[str] | None = None) -> int:
    from segplatform.bench.common import arm_main

    args = list(argv) if argv is not None else sys.argv[1:]
    if args and args[0] == "scale":
        return arm_main(args[1:], ScaleSettings.from_json, {"run": scale_arm})
    return arm_main(
        args, IngestSettings.from_json, {"dataloader": dataloader_arm, "service": service_arm}
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
                    "each) reading row groups from the dataset"
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


def repeated_dataset(base: str, uri: str, times: int) -> str:
    """``base`` with every split's rows repeated ``times`` times (new ids), written to ``uri``
    (kept when it already holds a dataset)."""
    import io

    import numpy as np
    from PIL import Image

    from segplatform.data.format import DatasetInfo, DatasetWriter, Sample, read_manifest
    from segplatform.data.reader import decode_mask
    from segplatform.data.shards import read_split_tables

    def variant(image: bytes, copy: int) -> bytes:
        # Copies differ in one pixel: a Parquet dictionary would otherwise store repeats once.
        if copy == 0:
            return image
        pixels = np.array(Image.open(io.BytesIO(image)))
        pixels.reshape(-1)[copy % pixels.size] ^= 1
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        return out.getvalue()

    if os.path.exists(os.path.join(uri, "dataset.json")):
        return uri
    info = read_manifest(base)
    fresh = DatasetInfo(
        f"{info.name} x{times}", info.classes, info.palette, ignore_index=info.ignore_index
    )
    with DatasetWriter(uri, fresh) as writer:
        for split in info.splits:
            tables = read_split_tables(base, split, columns=("id", "image", "mask"))
            for copy in range(times):
                for table in tables:
                    for image, mask, name in zip(
                        table.column("image").to_pylist(),
                        table.column("mask").to_pylist(),
                        table.column("id").to_pylist(),
                    ):
                        writer.add(
                            split,
                            Sample(f"{name}-{copy}", variant(image, copy), decode_mask(mask)),
                        )
    return uri


def p9(ctx: Any) -> Any:
    from segplatform.bench.common import Comparison, Section, Table, run_child

    sizes = (1, 4) if ctx.quick else (1, 4, 16)  # --quick: a run-through, not a measurement
    arms = ("index", "driver reads")
    found: dict[tuple[int, str], list[dict[str, Any]]] = {}
    datasets = {
        times: repeated_dataset(ctx.data, str(ctx.scratch / f"p9-x{times}"), times)
        for times in sizes
    }

    def measure(runs: list[tuple[int, str]]) -> None:
        settings = ScaleSettings(runs=[[datasets[times], arm] for times, arm in runs])
        result = run_child(
            "segplatform.bench.ingest",
            ["scale", "run", settings.to_json()],
            threads=1,
            timeout=ctx.child_timeout(300),
        )
        for key, measured in zip(runs, result["runs"]):
            found.setdefault(key, []).append(measured)

    plan = [(times, arm) for times in sizes for arm in arms]
    if ctx.quick:
        ctx.step("P9 every size and arm in one process")
        measure(plan)
    for repeat in range(0 if ctx.quick else ctx.repeats):
        for times, arm in plan:
            ctx.step(f"P9 dataset x{times}, {arm} (repeat {repeat + 1}/{ctx.repeats})")
            measure([(times, arm)])

    def median(times: int, arm: str, key: str) -> float:
        values = sorted(r[key] for r in found[(times, arm)])
        return values[len(values) // 2]

    split_mb = {
        times: sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(ctx.scratch / f"p9-x{times}")
            for name in names
            if name.endswith(".parquet")
        )
        / 1e6
        for times in sizes
    }
    rows = [
        [
            f"{times}×",
            f"{split_mb[times]:.1f}",
            *(f"{median(times, arm, 'driver_growth') / 1e6:.1f}" for arm in arms),
            *(f"{median(times, arm, 'first_batch_s'):.2f}" for arm in arms),
        ]
        for times in sizes
    ]
    big, small = sizes[-1], sizes[0]
    growth = {
        arm: [
            (a["driver_growth"] - b["driver_growth"]) / 1e6
            for a, b in zip(found[(big, arm)], found[(small, arm)])
        ]
        for arm in arms
    }
    return Section(
        comparisons=[
            Comparison(
                id="P9",
                name=f"driver peak RSS growth, dataset {small}× → {big}×",
                ours="index from footers; decoding tasks read row groups",
                against="driver reads the splits and puts them in the object store",
                quantity=f"MB the driver grows from {small}× to {big}×",
                unit="MB",
                values=growth["index"],
                arms={
                    f"{arm}, driver peak RSS at {big}×": [
                        r["driver_peak_rss"] / 1e6 for r in found[(big, arm)]
                    ]
                    for arm in arms
                },
                arm_unit="MB",
                target=("<=", round(0.1 * (split_mb[big] - split_mb[small]), 2)),
                notes=(
                    f"dataset {split_mb[small]:.1f} → {split_mb[big]:.1f} MB of shards; "
                    "target: under 10% of the added bytes (flat); RSS growth of the driver "
                    "from before it reads the data to its first batch; driver reads: "
                    + ", ".join(f"{g:.0f}" for g in growth["driver reads"])
                    + " MB"
                ),
            )
        ],
        tables=[
            Table(
                id="P9",
                title="driver peak RSS and time to the first batch against dataset size",
                columns=[
                    "dataset",
                    "shards MB",
                    "driver RSS growth MB, index",
                    "driver RSS growth MB, driver reads",
                    "first batch s, index",
                    "first batch s, driver reads",
                ],
                rows=rows,
                notes=(
                    "mni152-tissue train+val repeated; "
                    + (
                        "--quick: every cell in one process, a run-through"
                        if ctx.quick
                        else f"each cell the median of {ctx.repeats} fresh process(es), each "
                        "with its own local Ray (2 CPUs)"
                    )
                ),
            )
        ],
    )
