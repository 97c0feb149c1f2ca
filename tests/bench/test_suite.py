"""The benchmark suite still runs: ``segplatform bench --quick`` as a user runs it, every
benchmark P1-P9 ending with finite figures in bench.json and bench.md. No timing is asserted
(speed belongs to the suite's own report); the interleaving, the report block and the command
line are checked without measuring anything."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import architectures
from segplatform.bench.common import Comparison, interleave, ratios
from segplatform.bench.suite import BEGIN, BENCHMARKS, END, update_report

SEGPLATFORM = str(Path(sys.executable).parent / "segplatform")


@pytest.mark.slow
def test_quick_suite_runs_every_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    report = Path("BENCHMARKS.md")
    before = report.read_text()
    result = subprocess.run(
        [SEGPLATFORM, "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert report.read_text() == before, "--quick must not rewrite BENCHMARKS.md"

    record = json.loads((out / "bench.json").read_text())
    assert record["quick"] is True and record["errors"] == {}
    assert set(record["seconds"]) == set(BENCHMARKS)
    measured = {c["id"] for c in record["comparisons"]} | {t["id"] for t in record["tables"]}
    assert measured == set(BENCHMARKS)
    for comparison in record["comparisons"]:
        label = f"{comparison['id']} {comparison['name']}"
        assert comparison["values"], label
        assert all(math.isfinite(v) for v in comparison["values"]), label
        if comparison["unit"] == "×":
            # A ratio of two measurements; a difference (ms) may fall either side of zero in noise.
            assert all(v > 0 for v in comparison["values"]), label
        for arm, values in comparison["arms"].items():
            assert len(values) == len(comparison["values"]), (label, arm)
            assert all(math.isfinite(v) and v > 0 for v in values), (label, arm)
    (p7,) = [t for t in record["tables"] if t["id"] == "P7"]
    assert [row[0] for row in p7["rows"]] == list(architectures.ARCHITECTURES)

    markdown = (out / "bench.md").read_text()
    for benchmark in BENCHMARKS:
        assert f"| {benchmark} |" in markdown or f"**{benchmark}:" in markdown, benchmark
    assert "--quick" in markdown and record["commit"][:7] in markdown
    assert markdown[:200] in result.stdout


def test_interleave_alternates_arms_after_a_discarded_warm_up() -> None:
    calls: list[str] = []

    def arm(name: str, value: float):
        def measure() -> float:
            calls.append(name)
            return value

        return measure

    values = interleave([("a", arm("a", 2.0)), ("b", arm("b", 4.0))], 3)
    assert calls == ["a", "b"] * 4  # warm-up round, then 3 rounds A B
    assert values == {"a": [2.0] * 3, "b": [4.0] * 3}
    assert ratios(values["a"], values["b"]) == [0.5] * 3
    row = Comparison("P0", "x", "a", "b", "a / b", values=[0.9, 1.2, 1.0], target=(">=", 1.0))
    assert row.median == 1.0 and row.spread == (0.9, 1.2) and row.met is True
    assert Comparison("P0", "x", "a", "b", "a / b", values=[2.0], target=("<=", 1.05)).met is False


def test_report_block_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nGPU figures.\n")
    update_report(report, "first table\n")
    update_report(report, "second table\n")
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nGPU figures.\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "second table" in text and "first table" not in text


def test_unknown_benchmark_is_refused_by_the_command() -> None:
    result = subprocess.run(
        [SEGPLATFORM, "bench", "--only", "P1,P10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown benchmark(s) P10; valid: P1,P2,P3,P4,P5,P6,P7,P8,P9" in result.stderr
