"""Shared benchmark helpers: a short per-suite table printed at the end of the run.

Any benchmark may call ``record(benchmark, suite=..., case=..., mode=..., provider=..., seconds=..., flops=...,
bytes=...)`` (or set the same keys in ``benchmark.extra_info``); rows that share suite/case/mode are printed side
by side, with each provider's time relative to the provider named ``ours`` (``speedup`` > 1: ours is faster).
Rows skipped are listed with their reason by pytest itself (``-ra``). With ``LLM2VEC_FAST_RESULTS`` set, each row
is also appended to that JSON-lines file as it is measured (see perf_table.py).

Benchmarks never run the Triton interpreter: without CUDA they time the CPU paths.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
from perf_table import append_row, format_table  # noqa: E402

_ROWS: list[dict] = []


def record(benchmark, *, suite, case, mode, provider, seconds, flops=None, bytes=None, **extra):
    """Attach a measured row to ``benchmark.extra_info`` and to the end-of-run table."""
    row = dict(suite=suite, case=case, mode=mode, provider=provider, ms=seconds * 1e3, **extra)
    if flops:
        row["tflops"] = flops / seconds / 1e12
    if bytes:
        row["gbps"] = bytes / seconds / 1e9
    if benchmark is not None:
        benchmark.extra_info.update(row)
    _ROWS.append(row)
    append_row({"kind": "bench", **row})
    return row


def median_seconds(benchmark, calls_per_round: int = 1) -> float:
    """Median seconds per call of a finished ``benchmark.pedantic`` run."""
    return benchmark.stats.stats.median / calls_per_round


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ROWS:
        return
    terminalreporter.write_line("")
    terminalreporter.write_line("=" * 30 + " benchmark table (median per call) " + "=" * 30)
    for line in format_table(_ROWS):
        terminalreporter.write_line(line)
    terminalreporter.write_line("")


@pytest.fixture
def perf_record():
    """The ``record`` helper as a fixture (same signature)."""
    return record
