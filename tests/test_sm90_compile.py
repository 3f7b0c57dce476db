"""The sm_90 compile gate: every kernel variant, compiled for Hopper (H100/H200) without a GPU.

Triton's own offline compiler builds each case of ``tests/sm90/cases.py`` (attention forward, dQ and dK/dV in
fp16/bf16/fp32 at head_dim 64/96/128/256 with padding, varlen, dropout and GQA, in every config autotuning may
pick; the MNTP loss and InfoNCE kernels at their launch configs) for compute capability 9.0, and the checks
below read the result: it compiles; its shared memory fits one Hopper block (232,448 bytes); configs the kernels
choose by default spill no registers; 16-bit matmuls with 64-row or larger tiles compile to ``wgmma``.

The compiles run in one subprocess (``TRITON_INTERPRET=0``: the interpreter the other tests use has nothing to
compile), with a fresh Triton cache and a pool of 2 workers. This is CI's longest test, on purpose: about
two minutes on a 2-core machine, and the only check that the kernels build for the GPU they are written for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm90.compile import SM90_MAX_SHARED

REPO_ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> result of every case (compiled once for all the checks of this module)."""
    work = tmp_path_factory.mktemp("sm90")
    out = work / "results.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(work / "triton-cache"),
               TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "sm90" / "compile.py"), str(out),
                           "--workers", "2"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the compile run failed:\n{proc.stderr[-4000:]}"
    results = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert results, "the case table is empty"
    return {r["name"]: r for r in results}


def _report(bad: list[str]) -> str:
    return f"{len(bad)} cases:\n  " + "\n  ".join(bad)


def test_every_case_compiles_for_sm90(compiled):
    bad = [f"{name}: {r['error']}" for name, r in compiled.items() if "error" in r]
    assert not bad, _report(bad)


def test_shared_memory_fits_one_hopper_block(compiled):
    bad = [f"{name}: {r['shared']} bytes" for name, r in compiled.items()
           if "error" not in r and r["shared"] > SM90_MAX_SHARED]
    assert not bad, _report(bad)


def test_default_configs_do_not_spill(compiled):
    bad = [f"{name}: {r['spill_bytes']} bytes of stack, {r['registers']} registers" for name, r in compiled.items()
           if "error" not in r and r["default"] and r["spill_bytes"] > 0]
    assert not bad, _report(bad)


def test_16_bit_matmuls_with_64_row_tiles_use_wgmma(compiled):
    bad = [name for name, r in compiled.items() if "error" not in r and r["check_wgmma"] and not r["wgmma"]]
    assert not bad, _report(bad)


def test_case_table_covers_its_coverage_table(compiled):
    """Each attention kernel's default config is compiled wherever ``DEFAULT_COVERAGE`` says."""
    from sm90.cases import _DTYPES, ATTENTION_KERNELS, DEFAULT_COVERAGE

    missing = []
    for kernel in ATTENTION_KERNELS:
        for dtype, coverage in DEFAULT_COVERAGE.items():
            for variant, head_dims in coverage.items():
                for head_dim in head_dims:
                    prefix = f"{kernel}-{_DTYPES[dtype]}-d{head_dim}-{variant}-"
                    if not any(name.startswith(prefix) and r["default"] for name, r in compiled.items()):
                        missing.append(prefix)
    assert not missing, _report(missing)
