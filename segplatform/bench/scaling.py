"""P8: data-parallel scaling — 1 against 2 workers measured here, and a model of N GPUs.

**Measured.** The service's images/s with 1 and with 2 Ray Train workers (P1's service arms:
the same total batch, split between the workers) give the efficiency ``ips(2) / (2 × ips(1))``
on this machine. The all-reduce itself is timed on its own: two processes (``torch.distributed``
over gloo, as the service's CPU workers) all-reduce float32 tensors of the gradient sizes of
the benchmarked networks; the fitted latency and bandwidth say how much of a step's time the
gradient exchange takes.

**Model of N GPUs.** Weak scaling (a fixed batch per GPU), DDP's ring all-reduce of every
gradient each step. A ring all-reduce of ``B`` bytes over ``N`` ranks moves ``2 (N − 1) / N ×
B`` bytes through each rank's link (Patarasuk and Yuan, "Bandwidth optimal all-reduce
algorithms for clusters of workstations", JPDC 2009), so with a link's bus bandwidth ``bw``
(the figure nccl-tests reports as ``busbw``, doc/PERFORMANCE.md in github.com/NVIDIA/nccl-tests):

    t_allreduce(N) = 2 (N − 1) / N × B / bw + 2 (N − 1) × alpha
    efficiency(N)  = t_step / (t_step + exposed(N))

``exposed`` is the whole all-reduce when nothing overlaps it (the conservative figure), and
``max(0, t_allreduce − t_backward)`` when DDP's bucketed all-reduce runs under the backward
pass (about two thirds of a step). ``t_step`` is the measured H200 step (``docs/gpu-h200.json``:
DeepLab v3 ResNet-101, 513×513, batch 8, bf16 + channels-last), ``B`` the network's gradient
bytes (float32: DDP reduces gradients in the parameters' dtype, float32 under autocast). The
bandwidths are assumptions, not measurements (one GPU cannot time a collective): 450 GB/s for
8 GPUs on NVLink 4 with NVSwitch (nccl-tests reference figures for 8×H100 SXM: 460–480 GB/s;
H200 has the same NVLink), 40 GB/s for PCIe Gen 5 without NVLink, 12.5 GB/s for one 100 Gb/s
network link per GPU between nodes.

    python -m segplatform.bench.scaling allreduce '{"sizes": [7500000], "iters": 5}'
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["INTERCONNECTS", "efficiency", "ring_allreduce_s"]

# (name, bus bandwidth in bytes/s, per-step latency alpha in s): assumptions (module docstring).
INTERCONNECTS: tuple[tuple[str, float, float], ...] = (
    ("NVLink 4 + NVSwitch (8 GPUs in a node)", 450e9, 5e-6),
    ("PCIe Gen 5, no NVLink", 40e9, 10e-6),
    ("100 Gb/s network per GPU (across nodes)", 12.5e9, 20e-6),
)
BACKWARD_SHARE = 2 / 3  # part of a step under which DDP can overlap its all-reduce
H200_STEP_KEY = "deeplab_v3 r101 train bf16 nhwc"
H200_DEFAULT = {"step_s": 0.0394, "params": 58_040_661, "batch": 8}  # BENCHMARKS.md, H200


def ring_allreduce_s(nbytes: float, ranks: int, bandwidth: float, alpha: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``ranks`` (module docstring)."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * alpha


def efficiency(step_s: float, allreduce_s: float, *, overlap: bool) -> float:
    """Weak-scaling efficiency of one step with its all-reduce exposed or overlapped."""
    exposed = max(0.0, allreduce_s - BACKWARD_SHARE * step_s) if overlap else allreduce_s
    return step_s / (step_s + exposed)


# ---- the all-reduce measurement (two gloo processes) ----------------------------------------


def _allreduce_rank(rank: int, world: int, store: str, sizes: list[int], iters: int, out: str):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for size in sizes:
        tensor = torch.ones(size // 4, dtype=torch.float32)
        for _ in range(2):
            dist.all_reduce(tensor)
        times = []
        for _ in range(iters):
            dist.barrier()
            began = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - began)
        results[size] = statistics.median(times)
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def measure_allreduce(sizes: list[int], iters: int, world: int = 2) -> dict[int, float]:
    """Median seconds of one gloo all-reduce of each size in bytes, ``world`` processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="segplatform-bench-ar-") as directory:
        store, out = os.path.join(directory, "store"), os.path.join(directory, "out.json")
        mp.start_processes(
            _allreduce_rank,
            args=(world, store, sizes, iters, out),
            nprocs=world,
            start_method="spawn",
        )
        return {int(k): v for k, v in json.loads(Path(out).read_text()).items()}


def fit_alpha_bandwidth(times: dict[int, float], ranks: int) -> tuple[float, float]:
    """Least-squares ``(alpha, bandwidth)`` of the ring model through measured times."""
    import numpy as np

    sizes = sorted(times)
    steps = 2 * (ranks - 1)
    # t = steps·alpha + (steps / ranks)·B / bw  ->  linear in (alpha, 1/bw)
    matrix = np.array([[steps, steps / ranks * b] for b in sizes], dtype=float)
    target = np.array([times[b] for b in sizes])
    (alpha, inverse), *_ = np.linalg.lstsq(matrix, target, rcond=None)
    return max(float(alpha), 0.0), 1 / inverse if inverse > 0 else float("inf")


# ---- the section ----------------------------------------------------------------------------


def _h200_step() -> dict[str, Any]:
    path = Path(__file__).resolve().parents[2] / "docs" / "gpu-h200.json"
    try:
        for record in json.loads(path.read_text()):
            if record.get("name") == H200_STEP_KEY:
                return {
                    "step_s": record["step_s"],
                    "params": record["params"],
                    "batch": record["batch"],
                    "source": "docs/gpu-h200.json",
                }
    except (OSError, ValueError, KeyError):
        pass
    return {**H200_DEFAULT, "source": "BENCHMARKS.md (H200)"}


def p8(ctx: Any) -> Any:
    import architectures
    from architectures.flops import count_params
    from segplatform.bench.common import Comparison, Section, Table, run_child
    from segplatform.bench.training import step_runs

    section = Section()
    runs = ctx.shared.get("p1") or step_runs(ctx, plain=False)
    ips2 = [r["images_per_s"] for r in runs["service w2"]]
    if "service w1" in runs:  # not under --quick (P1 runs 2 workers only)
        ips1 = [r["images_per_s"] for r in runs["service w1"]]
        section.comparisons.append(
            Comparison(
                id="P8",
                name="1 → 2 workers on this machine",
                ours="service, 2 workers (total batch split)",
                against="linear: 2 × the service with 1 worker",
                quantity="images/s(2 workers) / (2 × images/s(1 worker))",
                values=[b / (2 * a) for a, b in zip(ips1, ips2)],
                arms={"2 workers": ips2, "1 worker": ips1},
                arm_unit="img/s",
                notes="one torch thread per worker, 2 cores shared with the decoding tasks",
            )
        )
    # Gradient sizes: the main job's U-Net and DeepLab v3 ResNet-101.
    import torch

    with torch.device("meta"):
        unet = architectures.build_model(
            "unet", num_classes=4, padding="same", base_channels=16, in_channels=1
        )
    unet_bytes = 4 * count_params(unet, trainable_only=True)
    h200 = _h200_step()
    deeplab_bytes = 4 * h200["params"]
    sizes = [1 << 20, unet_bytes] if ctx.quick else [1 << 20, 1 << 23, unet_bytes, 1 << 26]
    ctx.step("P8 gloo all-reduce, 2 processes")
    measured = run_child(
        "segplatform.bench.scaling",
        ["allreduce", json.dumps({"sizes": sizes, "iters": 2 if ctx.quick else 7})],
        threads=1,
        timeout=ctx.child_timeout(300),
    )
    times = {int(k): v for k, v in measured["times"].items()}
    alpha, bandwidth = fit_alpha_bandwidth(times, 2)
    step2 = statistics.median(r["step_s"] for r in runs["service w2"])
    step1 = (
        statistics.median(r["step_s"] for r in runs["service w1"])
        if "service w1" in runs
        else math.nan
    )
    rows = [
        [f"{size / 1e6:.1f} MB" + (" (U-Net 16 gradients)" if size == unet_bytes else ""),
         round(1000 * seconds, 2)]
        for size, seconds in sorted(times.items())
    ]  # fmt: skip
    section.tables.append(
        Table(
            id="P8",
            title="gloo all-reduce between 2 processes on this machine",
            columns=["float32 tensor", "median ms"],
            rows=rows,
            notes=(
                f"fit of the ring model: alpha {1e6 * alpha:.0f} µs, bus bandwidth "
                f"{bandwidth / 1e9:.2f} GB/s. The U-Net's gradient all-reduce takes "
                f"{1000 * times[unet_bytes]:.1f} ms of the 2-worker service step of "
                f"{1000 * step2:.0f} ms (1 worker: {1000 * step1:.0f} ms for the same total "
                "batch)."
            ),
        )
    )
    model_rows = []
    for name, bw, latency in INTERCONNECTS:
        row: list[Any] = [name, f"{bw / 1e9:g}"]
        for ranks in (2, 4, 8, 16):
            seconds = ring_allreduce_s(deeplab_bytes, ranks, bw, latency)
            row.append(
                f"{efficiency(h200['step_s'], seconds, overlap=False):.3f} / "
                f"{efficiency(h200['step_s'], seconds, overlap=True):.3f}"
            )
        row.append(round(1000 * ring_allreduce_s(deeplab_bytes, 8, bw, latency), 2))
        model_rows.append(row)
    section.tables.append(
        Table(
            id="P8",
            title=(
                "Model: DeepLab v3 ResNet-101 data-parallel efficiency on N GPUs "
                "(no overlap / backward overlap)"
            ),
            columns=[
                "interconnect",
                "busbw GB/s",
                *(f"N={n}" for n in (2, 4, 8, 16)),
                "all-reduce ms, N=8",
            ],
            rows=model_rows,
            notes=(
                f"t_step {1000 * h200['step_s']:.1f} ms (H200, batch {h200['batch']} per GPU, "
                f"bf16 + channels-last; {h200['source']}), gradients {deeplab_bytes / 1e6:.0f} MB "
                "float32; ring all-reduce, bandwidths assumed (segplatform/bench/scaling.py)."
            ),
        )
    )
    nvlink = INTERCONNECTS[0]
    eight = efficiency(
        h200["step_s"], ring_allreduce_s(deeplab_bytes, 8, nvlink[1], nvlink[2]), overlap=False
    )
    section.comparisons.append(
        Comparison(
            id="P8",
            name="model: DeepLab v3 R-101 on 8 H200 (NVLink)",
            ours="predicted images/s on 8 GPUs (no overlap)",
            against="linear: 8 × one GPU",
            quantity="predicted efficiency",
            unit="",
            values=[eight],
            target=(">=", 0.9),
            notes="measured H200 step, assumed 450 GB/s bus bandwidth",
        )
    )
    return section


def main(argv: list[str] | None = None) -> int:
    from segplatform.bench.common import emit_result

    command, text = (argv if argv is not None else sys.argv[1:])[:2]
    if command != "allreduce":
        raise SystemExit(f"unknown command {command!r}: allreduce")
    options = json.loads(text)
    times = measure_allreduce([int(s) for s in options["sizes"]], int(options.get("iters", 5)))
    emit_result({"times": {str(k): v for k, v in times.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
