"""Benchmark rows as they are measured, and the short table of them.

* ``record`` (in conftest.py) appends each row, as soon as it is measured, to the JSON-lines file named by
  ``LLM2VEC_FAST_RESULTS`` (when set), so that a run cut short by a time limit keeps every row it measured.
* As a pytest plugin (``-p perf_table``, with benchmarks/ on ``sys.path``), it also appends one line per test
  outcome to that file (the GPU tests of ``gpu_check.sh``).
* ``python benchmarks/perf_table.py RESULTS.jsonl`` prints the table of the rows in that file (the end of
  ``gpu_check.sh``, which works even after pytest was interrupted).
* ``LLM2VEC_FAST_COMPILE_WARMUP=1``: a benchmark compiles (and autotunes) its kernels, then skips instead of
  timing; ``gpu_check.sh`` runs this once in parallel so that the timed, serial run finds every kernel compiled.
"""

from __future__ import annotations

import json
import os
import sys
import time

RESULTS_ENV = "LLM2VEC_FAST_RESULTS"
WARMUP_ENV = "LLM2VEC_FAST_COMPILE_WARMUP"


def append_row(row: dict) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": round(time.time(), 1), **row}, default=str) + "\n")


def skip_if_compile_warmup(benchmark=None) -> None:
    """Call after a benchmark's first (compiling) call: in the warm-up run, stop there."""
    if os.environ.get(WARMUP_ENV, "0") == "1":
        import pytest

        pytest.skip("compile warm-up only: timed in the serial run")


def pytest_runtest_logreport(report):
    """One line per test outcome (the call phase, or a setup that failed or skipped)."""
    if report.when != "call" and report.outcome == "passed":
        return
    row = dict(kind="test", test=report.nodeid, outcome=report.outcome, when=report.when,
               seconds=round(report.duration, 2))
    if report.outcome != "passed":
        longrepr = report.longrepr
        row["reason"] = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr))[-600:]
    append_row(row)


def format_table(rows: list[dict]) -> list[str]:
    """Rows that share suite/case/mode side by side, each provider's time against the provider ``ours``; where
    several providers are our variants (``ours`` or ``ours:<variant>``), the fastest is marked."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("kind", "bench") == "bench":
            groups.setdefault((row["suite"], row["case"], row["mode"]), []).append(row)
    current_suite = None
    for (suite, case, mode), group in groups.items():
        if suite != current_suite:
            lines.append(f"-- {suite}")
            current_suite = suite
        ours = next((r for r in group if r["provider"] == "ours"), None)
        variants = [r for r in group if str(r["provider"]).startswith("ours")]
        fastest = min(variants, key=lambda r: r["ms"]) if len(variants) > 1 else None
        for row in group:
            rate = ""
            if row.get("tflops"):
                rate = f"{row['tflops']:8.1f} TFLOP/s"
            elif row.get("gbps"):
                rate = f"{row['gbps']:8.1f} GB/s"
            speedup = ""
            if ours is not None and row is not ours and ours["ms"] > 0:
                speedup = f"  ours is {row['ms'] / ours['ms']:.2f}x faster"
            mark = "  <- fastest of ours" if row is fastest else ""
            note = f"  [{row['note']}]" if row.get("note") else ""
            lines.append(f"   {case:<28} {mode:<8} {row['provider']:<18} {row['ms']:10.3f} ms {rate}{speedup}{mark}"
                         f"{note}")
    return lines


def read_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/perf_table.py RESULTS.jsonl", file=sys.stderr)
        return 2
    if not os.path.exists(argv[0]):
        print(f"no results file {argv[0]}: nothing was measured", file=sys.stderr)
        return 1
    rows = read_rows(argv[0])
    tests = [r for r in rows if r.get("kind") == "test"]
    outcomes: dict[str, int] = {}
    for row in tests:
        outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
    print("tests: " + (", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "none recorded"))
    for row in tests:
        if row["outcome"] == "failed":
            print(f"   FAILED {row['test']}: {row.get('reason', '').strip().splitlines()[-1:]}")
    print("\n".join(format_table(rows)) or "no benchmark rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
