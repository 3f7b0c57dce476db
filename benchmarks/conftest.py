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


def cuda_first_call(step, what: str):
    """Call ``step`` once on CUDA (the call that compiles and autotunes) and return the peak memory it allocated
    beyond what was allocated before, in bytes, and ``step`` followed by a synchronize (what to time). Skips the
    test where that call runs out of GPU memory (``what`` says what ran out) and in the compile warm-up run."""
    import torch
    from perf_table import skip_if_compile_warmup

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        step()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{what} runs out of GPU memory")
    peak = torch.cuda.max_memory_allocated() - base
    skip_if_compile_warmup()

    def synced():
        step()
        torch.cuda.synchronize()

    return peak, synced


@pytest.fixture
def cuda_step():
    """The ``cuda_first_call`` helper as a fixture (same signature)."""
    return cuda_first_call
