"""A sweep's results: one row per trial, as a table (console and CSV) and a figure.

``TrialRow`` holds what a reader compares: the trial's id and run, how it ended (``finished``,
``stopped early`` by the scheduler, ``failed``), its hyperparameters, its best validation mIoU
(the best evaluation of its run; the run keeps it across resumes), the mIoU of its last
evaluation, the step it reached and the checkpoint of its best evaluation.

``figure`` draws one panel per hyperparameter: the value on the x axis (a log axis for a
log-uniform range, one labelled tick per value for a choice such as atrous rates or bins), the
best validation mIoU on the y axis, one point per trial (filled: finished, hollow: stopped early),
so a reader sees which values won.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from segplatform.tune.space import SearchSpace

__all__ = ["TrialRow", "csv_text", "figure", "format_table", "show_value", "sorted_rows"]

FINISHED = "finished"
STOPPED = "stopped early"
FAILED = "failed"
NOT_STARTED = "not started"


@dataclass
class TrialRow:
    """One trial of a sweep (module docstring)."""

    trial_id: str
    run_name: str
    status: str  # FINISHED, STOPPED, FAILED or NOT_STARTED
    params: dict[str, Any] = field(default_factory=dict)  # searched name -> value
    best_val_miou: float | None = None
    last_val_miou: float | None = None
    step: int | None = None  # trial steps reached
    max_iters: int | None = None
    checkpoint: str | None = None  # the run's checkpoint of its last evaluation
    error: str = ""


def _score(row: TrialRow) -> float:
    value = row.best_val_miou
    return -math.inf if value is None or not math.isfinite(value) else value


def sorted_rows(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Best validation mIoU first; trials without a score last, by id."""
    return sorted(rows, key=lambda r: (-_score(r), r.trial_id))


def show_value(value: Any) -> str:
    """``(6, 12, 18)`` for sequences, ``0.00123`` for floats (4 significant digits)."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(show_value(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _miou(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4f}"


def csv_text(rows: Sequence[TrialRow], names: Sequence[str]) -> str:
    """The results table as CSV, best first (the parent MLflow run's ``results.csv``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["rank", "trial_id", "run_name", "status", *names]
    header += ["best_val_miou", "last_val_miou", "step", "max_iters", "checkpoint", "error"]
    writer.writerow(header)
    for rank, row in enumerate(sorted_rows(rows), 1):
        writer.writerow(
            [
                rank,
                row.trial_id,
                row.run_name,
                row.status,
                *(show_value(row.params[n]) if n in row.params else "" for n in names),
                _miou(row.best_val_miou),
                _miou(row.last_val_miou),
                "" if row.step is None else row.step,
                "" if row.max_iters is None else row.max_iters,
                row.checkpoint or "",
                row.error,
            ]
        )
    return buffer.getvalue()


def format_table(rows: Sequence[TrialRow], names: Sequence[str]) -> str:
    """A fixed-width table for the job log, best first."""
    header = ["#", "trial", *names, "best mIoU", "last mIoU", "steps", "status"]
    body = []
    for rank, row in enumerate(sorted_rows(rows), 1):
        steps = "" if row.step is None else f"{row.step}/{row.max_iters or '?'}"
        body.append(
            [
                str(rank),
                row.trial_id,
                *(show_value(row.params[n]) if n in row.params else "" for n in names),
                _miou(row.best_val_miou) or "-",
                _miou(row.last_val_miou) or "-",
                steps or "-",
                row.status,
            ]
        )
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in body]
    return "\n".join(lines)


def figure(rows: Sequence[TrialRow], space: SearchSpace, title: str = "") -> Any:
    """One panel per searched setting: value against best validation mIoU (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(space.names)
    scored = [r for r in rows if r.best_val_miou is not None and math.isfinite(r.best_val_miou)]
    columns = min(3, max(len(names), 1))
    lines = math.ceil(max(len(names), 1) / columns)
    fig, axes = plt.subplots(
        lines,
        columns,
        figsize=(max(6.0, 4.8 * columns), 3.6 * lines + 0.9),
        squeeze=False,
        sharey=True,
    )
    for index, name in enumerate(names):
        ax = axes[index // columns][index % columns]
        dim = space.dimension(name)
        points = [(r.params.get(name), r.best_val_miou, r.status) for r in scored]
        if dim.kind == "choice":
            labels = [show_value(v) for v in dim.values]
            positions = {label: i for i, label in enumerate(labels)}
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0)
            ax.set_xlim(-0.5, len(labels) - 0.5)
            xs = [positions.get(show_value(value), math.nan) for value, _, _ in points]
            # Trials that share a value sit side by side, so that each one shows.
            seen: dict[float, int] = {}
            for i, x in enumerate(xs):
                count = seen.get(x, 0)
                seen[x] = count + 1
                xs[i] = x + (0.08 * ((count + 1) // 2) * (1 if count % 2 else -1) if count else 0)
        else:
            xs = [float(value) if value is not None else math.nan for value, _, _ in points]
            if dim.kind == "loguniform":
                ax.set_xscale("log")
        for x, (_, y, status) in zip(xs, points):
            hollow = status != FINISHED
            ax.scatter(
                [x],
                [y],
                s=46,
                facecolors="none" if hollow else "tab:blue",
                edgecolors="tab:blue",
                linewidths=1.5,
                zorder=3,
            )
        ax.set_xlabel(name)
        ax.grid(True, alpha=0.3)
        if index % columns == 0:
            ax.set_ylabel("best val mIoU")
    for index in range(len(names), lines * columns):
        axes[index // columns][index % columns].axis("off")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", linestyle="", color="tab:blue", label="finished"),
        Line2D(
            [], [], marker="o", linestyle="", markerfacecolor="none", color="tab:blue",
            label="stopped early / failed",
        ),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title or "validation mIoU per hyperparameter (one point per trial)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
