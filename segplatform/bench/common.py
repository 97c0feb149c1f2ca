"""What every comparison of the benchmark suite shares: records, interleaving, child processes.

- ``Comparison``: one row of the suite's table. It keeps both arms' raw measurements per repeat
  and the compared quantity per repeat (a ratio such as plain step time / service step time, or
  a difference in milliseconds), and reports the median with its spread (min, max) and whether
  the target holds.
- ``interleave``: runs the arms of a comparison alternately (A B A B ...), each once more first
  as warm-up (discarded), so slow drifts of a shared machine (other processes, thermal state)
  fall on both arms alike.
- ``run_child``: a measurement in a fresh Python process (``python -m MODULE ARGS``) with the
  thread variables pinned; the child prints one ``BENCH-RESULT <json>`` line. Arms that start
  Ray, Ray Train or Serve, or that measure a process tree's memory, run this way.
- ``memory_of``: resident (RSS) and proportional (PSS) set sizes summed over processes; PSS
  splits pages shared between processes (fork, shared libraries) among them.

Method after: Georges, Buytaert and Eeckhout, "Statistically rigorous Java performance
evaluation" (OOPSLA 2007) — warm-up excluded, repeated measurements, spread reported — and
Kalibera and Jones, "Rigorous benchmarking in reasonable time" (ISMM 2013) — interleaving the
compared configurations within one run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RESULT_PREFIX",
    "ChildError",
    "Comparison",
    "Context",
    "Section",
    "Table",
    "emit_result",
    "interleave",
    "memory_of",
    "pinned_env",
    "run_child",
]

RESULT_PREFIX = "BENCH-RESULT "
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class Comparison:
    """One row of the suite (see the module docstring).

    ``values`` holds the compared quantity per repeat; ``arms`` each arm's raw measurement per
    repeat (same order). ``target`` is ``(">=", 1.0)`` style, or None for a figure without one.
    """

    id: str  # "P1"
    name: str  # short label of the row, e.g. "step time, 1 worker"
    ours: str  # what our arm is
    against: str  # what the baseline arm is
    quantity: str  # what ``values`` are, e.g. "plain step time / service step time"
    unit: str = "×"  # "×" for ratios, or "ms", "img/s", ...
    values: list[float] = field(default_factory=list)
    arms: dict[str, list[float]] = field(default_factory=dict)
    arm_unit: str = ""  # unit of the raw arm measurements
    target: tuple[str, float] | None = None
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        if not self.values:
            return (float("nan"), float("nan"))
        return (min(self.values), max(self.values))

    @property
    def met(self) -> bool | None:
        if self.target is None or not self.values:
            return None
        op, bound = self.target
        value = self.median
        return value >= bound if op == ">=" else value <= bound

    def target_text(self) -> str:
        if self.target is None:
            return "—"
        op, bound = self.target
        sign = "≥" if op == ">=" else "≤"
        unit = self.unit if self.unit in ("×", "") else f" {self.unit}"
        return f"{sign} {bound:g}{unit}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, spread=list(self.spread), met=self.met)
        return data


@dataclass
class Table:
    """A table that is not a comparison (P7's per-architecture figures, P8's model)."""

    id: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Section:
    """What one benchmark (P1 ... P9) returns."""

    comparisons: list[Comparison] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass
class Context:
    """What a benchmark gets from the suite."""

    quick: bool  # one tiny repetition of everything
    threads: int  # torch threads of in-process measurements
    repeats: int  # repeats of every interleaved comparison
    data: str  # the built-in mni152-tissue dataset (URI)
    scratch: Path  # a directory for packages, exports and runs
    step: Callable[[str], None] = lambda text: None  # what runs now (progress line)
    log: Callable[[str], None] = lambda text: None  # a line above the progress bar
    shared: dict[str, Any] = field(default_factory=dict)  # measurements one benchmark reuses

    def child_timeout(self, seconds: float) -> float:
        """A child process's time limit (generous on a loaded machine)."""
        return seconds * (3 if self.quick else 2)


def interleave(
    arms: Sequence[tuple[str, Callable[[], float]]],
    repeats: int,
    *,
    warmup: bool = True,
    on_step: Callable[[str, int], None] | None = None,
) -> dict[str, list[float]]:
    """Run ``arms`` A B A B ... ``repeats`` times (after one discarded warm-up round)."""
    results: dict[str, list[float]] = {name: [] for name, _ in arms}
    if warmup:
        for name, measure in arms:
            if on_step:
                on_step(f"{name} (warm-up)", -1)
            measure()
    for repeat in range(repeats):
        for name, measure in arms:
            if on_step:
                on_step(name, repeat)
            results[name].append(float(measure()))
    return results


def ratios(numerators: Iterable[float], denominators: Iterable[float]) -> list[float]:
    """Element-wise ``a / b`` of two per-repeat lists."""
    return [a / b if b else float("nan") for a, b in zip(numerators, denominators)]


# ---- child processes ----------------------------------------------------------------------


class ChildError(RuntimeError):
    """A measurement process failed; the message holds the end of its output."""


def pinned_env(threads: int, **extra: str) -> dict[str, str]:
    """This environment with the thread variables set to ``threads`` and the Ray/MLflow
    addresses removed (every measurement starts its own local Ray, untracked)."""
    env = dict(os.environ)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_child(
    module: str,
    args: Sequence[str],
    *,
    threads: int,
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m module args`` with pinned threads; its ``BENCH-RESULT`` JSON."""
    command = [sys.executable, "-m", module, *args]
    began = time.monotonic()
    try:
        done = subprocess.run(
            command,
            env=env or pinned_env(threads),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or "")[-2000:] if isinstance(err.stdout, str) else ""
        raise ChildError(f"{module} {args[:1]} ran past {timeout:.0f} s\n{tail}") from None
    output = done.stdout + done.stderr
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result.setdefault("wall_s", time.monotonic() - began)
            return result
    raise ChildError(
        f"{module} {' '.join(args[:1])} exited {done.returncode} without a result:\n"
        + output[-3000:]
    )


def arm_main(
    argv: Sequence[str] | None,
    settings_from_json: Callable[[str], Any],
    arms: dict[str, Callable[[Any], dict[str, Any]]],
) -> int:
    """A measurement process's ``main``: ``ARM SETTINGS_JSON`` runs ``arms[ARM](settings)`` and
    prints its result line."""
    arm, text = (list(argv) if argv is not None else sys.argv[1:])[:2]
    if arm not in arms:
        raise SystemExit(f"unknown arm {arm!r}: {' or '.join(arms)}")
    emit_result(arms[arm](settings_from_json(text)))
    return 0


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def emit_result(result: dict[str, Any]) -> None:
    """Print the child's result line (the last thing a measurement process prints)."""
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---- memory ---------------------------------------------------------------------------------


def memory_of(pids: Iterable[int]) -> tuple[int, int]:
    """``(sum of RSS, sum of PSS)`` in bytes over the live processes among ``pids``."""
    import psutil

    rss = pss = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.Error, OSError):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


class PeakMemory:
    """Samples ``memory_of(pids())`` in a thread every ``interval`` seconds; keeps the peaks."""

    def __init__(self, pids: Callable[[], Iterable[int]], interval: float = 0.2) -> None:
        import threading

        self.pids, self.interval = pids, interval
        self.peak_rss = self.peak_pss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        rss, pss = memory_of(list(self.pids()))
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.samples += 1

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
