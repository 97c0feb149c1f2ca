"""The benchmark suite P1–P9: each comparison with both arms in the same run, side by side.

``segplatform bench`` (``make bench``) runs it; ``--quick`` runs one tiny repetition of each (P1
with 2 workers only, so P8 leaves out its 1 → 2 workers comparison), so that a test can check
that the suite still runs (no timing is asserted anywhere in the tests).

Each comparison, our path against what it is measured against, and the target:

- P1: a training step in the service, 1 and 2 workers (``bench.training``), against a plain
  PyTorch loop with the same threads: ≤ 1.05×.
- P2: ingest through ``TrainBatches`` (``bench.ingest``) against a DataLoader with 2 workers:
  ≥ 1× throughput, ≤ 1.5× RSS, ≥ 3× what a training step consumes.
- P3: our DeepLab v3 R-50 training (``bench.models``) against torchvision's: ≥ 1× MACs/s.
- P4: ``segment_image``, and faster paths tried (``bench.inference_path``), against the eager
  forward: ≥ 1.5×.
- P5: ICNet at 1024×2048 (``bench.models``) against PSPNet R-50: ≥ 5× faster.
- P6: Serve over HTTP, and batching (``bench.serving``), against in-process and unbatched:
  ≤ 5 ms added, ≥ 1×; and a table of a replica lost under load with 1 and 2 replicas
  (``bench.outage``; not in ``--quick``).
- P7: every architecture (``bench.models``) against the papers' figures: a table.
- P8: 1 → 2 workers, and a model of N GPUs (``bench.scaling``), against linear: ≥ 0.9 at 8 GPUs.
- P9: the driver's peak RSS and the time to the first batch as the dataset grows 1×, 4×, 16×
  (``bench.ingest``), against a driver that reads the splits into the object store: flat.

Method (``segplatform.bench.common``): the arms of a comparison alternate (A B A B ...) for
``repeats`` rounds after a discarded warm-up (arms in fresh processes exclude their own warm-up
steps instead); each round gives one value of the compared quantity (a ratio of the two arms,
or a difference); the table shows the median over the rounds and the spread (min–max).
In-process measurements run with ``torch.set_num_threads(threads)``; processes get the thread
variables pinned (``OMP_NUM_THREADS`` ...) as each comparison says.

Outputs in ``--out``: ``bench.json`` (every raw measurement, the machine, the commit),
``bench.md`` (the tables); with ``report``, the markdown replaces the block between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` of that file (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segplatform.bench.common import Comparison, Context, Section, Table

__all__ = ["BENCHMARKS", "machine", "render_markdown", "run_suite", "update_report"]

# id -> (title, "module:function")
BENCHMARKS: dict[str, tuple[str, str]] = {
    "P1": ("training step: service vs plain PyTorch loop", "segplatform.bench.training:p1"),
    "P2": ("ingest: TrainBatches vs DataLoader", "segplatform.bench.ingest:p2"),
    "P3": ("DeepLab v3 R-50: ours vs torchvision", "segplatform.bench.models:p3"),
    "P4": ("inference path vs eager", "segplatform.bench.inference_path:p4"),
    "P5": ("ICNet vs PSPNet at 1024×2048", "segplatform.bench.models:p5"),
    "P6": ("Serve over HTTP; batching", "segplatform.bench.serving:p6"),
    "P7": ("every architecture", "segplatform.bench.models:p7"),
    "P8": ("data-parallel scaling", "segplatform.bench.scaling:p8"),
    "P9": ("ingest at scale: the driver against dataset size", "segplatform.bench.ingest:p9"),
}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import torch

    from segplatform.bench.common import cpu_model

    model = cpu_model() or platform.processor() or platform.machine()
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover - a dependency
        ray_version = "-"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray_version,
        "platform": platform.platform(),
    }


def _commit() -> str:
    from segplatform.train.run import git_commit

    commit = git_commit()
    try:
        import subprocess

        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + (" (with local changes)" if dirty else "")
    except OSError:
        return commit


def _dataset(root: Path, quick: bool) -> str:
    from segplatform.data.sources import convert_builtin

    target = root / ("mni152-tissue-quick" if quick else "mni152-tissue")
    if not (target / "dataset.json").exists():
        convert_builtin("mni152-tissue", str(target), show_progress=False, stride=8 if quick else 1)
    return str(target.resolve())


def run_suite(
    out: str | Path,
    *,
    only: Sequence[str] = (),
    quick: bool = False,
    threads: int | None = None,
    repeats: int | None = None,
    data_root: str | Path | None = None,
    report: str | Path | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run the selected benchmarks (all by default); write ``bench.json`` and ``bench.md``."""
    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    selected = [b for b in BENCHMARKS if not only or b in only]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or min(os.cpu_count() or 1, 2 if quick else os.cpu_count() or 1)
    repeats = 1 if quick and repeats is None else (repeats or 3)
    torch.set_num_threads(threads)
    console = Console(stderr=True)
    started = time.time()
    load_before = os.getloadavg()
    record: dict[str, Any] = {
        "command": command,
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(started)),
        "machine": machine(),
        "quick": quick,
        "threads": threads,
        "repeats": repeats,
        "load_before": [round(v, 2) for v in load_before],
        "comparisons": [],
        "tables": [],
        "errors": {},
        "seconds": {},
    }
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[bench]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("building the dataset", total=len(selected), bench="suite")
        data = _dataset(Path(data_root) if data_root else out / "data", quick)
        scratch = out / "scratch"
        scratch.mkdir(exist_ok=True)
        ctx = Context(
            quick=quick,
            threads=threads,
            repeats=repeats,
            data=data,
            scratch=scratch,
            step=lambda text: progress.update(task, description=text),
            log=progress.console.log,
        )
        for bench in selected:
            title, target = BENCHMARKS[bench]
            progress.update(task, bench=bench, description=title)
            module, function = target.split(":")
            began = time.monotonic()
            try:
                section: Section = getattr(importlib.import_module(module), function)(ctx)
            except Exception as err:  # one failed benchmark does not stop the suite
                record["errors"][bench] = f"{type(err).__name__}: {err}"
                progress.console.log(f"[red]{bench} failed[/red]: {err}")
                progress.console.log(traceback.format_exc(limit=3))
                section = Section()
            torch.set_num_threads(threads)  # a benchmark may have changed it
            record["seconds"][bench] = round(time.monotonic() - began, 1)
            record["comparisons"].extend(c.to_dict() for c in section.comparisons)
            record["tables"].extend(t.to_dict() for t in section.tables)
            for comparison in section.comparisons:
                progress.console.log(_summary(comparison))
            progress.advance(task)
    record["load_after"] = [round(v, 2) for v in os.getloadavg()]
    record["total_seconds"] = round(time.time() - started, 1)
    (out / "bench.json").write_text(json.dumps(record, indent=1, default=str))
    markdown = render_markdown(record)
    (out / "bench.md").write_text(markdown)
    if report:
        update_report(Path(report), markdown)
    return record


def _summary(comparison: Comparison) -> str:
    low, high = comparison.spread
    met = {True: "[green]met[/green]", False: "[red]missed[/red]", None: ""}[comparison.met]
    unit = comparison.unit
    return (
        f"{comparison.id} {comparison.name}: {comparison.median:.3g}{unit} "
        f"({low:.3g}–{high:.3g}) {comparison.target_text()} {met}"
    )


def _number(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "—"
    text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return text + ("×" if unit == "×" else "")


def render_markdown(record: dict[str, Any]) -> str:
    """The tables of a suite record (``run_suite``) as markdown."""
    m = record["machine"]
    lines = [
        f"Measured {record['date']} at commit `{record['commit']}` on {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, PyTorch {m['torch']}, "
        f"Ray {m['ray']}. Load average (1, 5, 15 min) {tuple(record['load_before'])} before, "
        f"{tuple(record.get('load_after', ()))} after; {record['total_seconds'] / 60:.1f} min in "
        f"all{' (--quick: one tiny repetition, not a measurement)' if record['quick'] else ''}.",
        f"`{record['command'] or 'segplatform bench'}`: {record['repeats']} interleaved "
        f"repeat(s) per comparison, warm-up excluded, {record['threads']} torch threads "
        "in-process (processes pinned as each row says). Median of the per-repeat values, "
        "spread = min–max.",
        "",
        "| id | comparison | quantity | median | spread | target | met | arms (per repeat) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in record["comparisons"]:
        comparison = Comparison(
            **{k: v for k, v in c.items() if k not in ("median", "spread", "met")}
        )
        low, high = comparison.spread
        met = {True: "yes", False: "**no**", None: ""}[comparison.met]
        unit = comparison.unit
        arms = "; ".join(
            f"{name} " + ", ".join(f"{v:.3g}" for v in values)
            for name, values in comparison.arms.items()
        )
        if comparison.arm_unit and arms:
            arms += f" ({comparison.arm_unit})"
        lines.append(
            f"| {comparison.id} | {comparison.name} | {comparison.quantity} | "
            f"{_number(comparison.median, unit)}{'' if unit in ('×', '') else ' ' + unit} | "
            f"{_number(low, unit)}–{_number(high, unit)} | {comparison.target_text()} | {met} | "
            f"{arms} |"
        )
    notes = [f"- {c['id']} {c['name']}: {c['notes']}" for c in record["comparisons"] if c["notes"]]
    if notes:
        lines += ["", *notes]
    for t in record["tables"]:
        table = Table(**t)
        lines += [
            "",
            f"**{table.id}: {table.title}**",
            "",
            "| " + " | ".join(table.columns) + " |",
            "|" + "---|" * len(table.columns),
        ]
        for row in table.rows:
            lines.append("| " + " | ".join("—" if v is None else str(v) for v in row) + " |")
        if table.notes:
            lines += ["", table.notes]
    if record["errors"]:
        lines += ["", "Failed:"]
        lines += [f"- {bench}: {error}" for bench, error in record["errors"].items()]
    return "\n".join(lines) + "\n"


def update_report(path: Path, markdown: str) -> None:
    """Put ``markdown`` between the suite's markers in ``path`` (appended when absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{markdown}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## CPU suite (latest run)\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """``python -m segplatform.bench.suite [--quick] [--only P1,P3] [--out DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--only", default="")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", default=None)
    args = parser.parse_args(argv)
    run_suite(
        args.out,
        only=[b for b in args.only.split(",") if b],
        quick=args.quick,
        report=args.report,
        command=shlex.join(["python", "-m", "segplatform.bench.suite", *(argv or sys.argv[1:])]),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
