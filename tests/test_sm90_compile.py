"""The sm_90 compile gate: every kernel variant, compiled for Hopper (H100/H200) without a GPU.

Triton's own offline compiler builds each case of ``tests/sm90/cases.py`` (attention forward, dQ and dK/dV in
fp16/bf16/fp32 at head_dim 64/96/128/256 with padding, varlen, dropout and GQA, in every config autotuning may
pick; the MNTP loss and InfoNCE kernels at their launch configs) for compute capability 9.0, and the checks
below read the result: it compiles; its shared memory fits one Hopper block (232,448 bytes); configs the kernels
choose by default spill no registers; 16-bit matmuls with 64-row or larger tiles compile to ``wgmma``; the
Hopper forward variant (``forward="tma_ws"``) loads through TMA; the dK/dV variant (``dkdv="wg64"``) uses ``wgmma``. Each result also records whether a loop was
warp-specialized (``warp_specialized``): Triton 3.6 and 3.9 keep the tma_ws loop's ``warp_specialize`` attribute
on sm_90 but do not split it into partitions (their automatic warp specialization is for Blackwell), so no check
asserts it.

The compiles run in one subprocess (``TRITON_INTERPRET=0``: the interpreter the other tests use has nothing to
compile), with a fresh Triton cache and a pool of 2 workers. This is CI's longest test, on purpose (it is the
only check that the kernels build for the GPU they are written for): about 150 compiles (153 under Triton 3.9)
of 3-30 s each (bf16 3-10 s on an idle core, fp32 10-25 s), so 5-10 minutes on 2 cores; ``-k`` cannot shorten
it, but ``python tests/sm90/compile.py OUT.jsonl --only NAME`` compiles a subset.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import run_in_own_session
from sm90.compile import SM90_MAX_SHARED

REPO_ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # minutes of compiles: the full suite (CI) runs it, the fast loop does not


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> result of every case (compiled once for all the checks of this module)."""
    work = tmp_path_factory.mktemp("sm90")
    out = work / "results.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(work / "triton-cache"),
               TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    # Its own session, so that a timeout ends the compile workers too. The limit allows for a loaded machine:
    # measured 2026-12-01 with three gates and other suites sharing the 2 cores, 15-30 s per compile.
    run_in_own_session([sys.executable, str(REPO_ROOT / "tests" / "sm90" / "compile.py"), str(out),
                        "--workers", "2"], env=env, timeout=2400, what="the sm_90 compile run (is the machine overloaded?)")
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


# Default configs that spill, on record, by the Triton release (major.minor) that compiles them, with the most
# stack bytes allowed. Each entry is a known defect, not an exemption: the check below fails for any other spill,
# for more bytes, and when an entry stops spilling (so that the table cannot go stale).
KNOWN_SPILLS = {
    # dK/dV at head_dim 256 with padding, dropout and GQA: every tile tried spilled 8-48 bytes under Triton 3.6
    # (the GPU machine's version) and none under 3.9; it needs a dK/dV design of its own for head_dim 256.
    ("3.6", "_attn_bwd_dkdv_kernel-bf16-d256-padding-dropout-gqa-32x32w8s2"): 48,
}


def test_default_configs_do_not_spill(compiled):
    import triton

    release = ".".join(triton.__version__.split(".")[:2])
    known = {name: limit for (version, name), limit in KNOWN_SPILLS.items() if version == release}
    spilled = {name: r for name, r in compiled.items() if "error" not in r and r["default"] and r["spill_bytes"] > 0}
    bad = [f"{name}: {r['spill_bytes']} bytes of stack, {r['registers']} registers" for name, r in spilled.items()
           if r["spill_bytes"] > known.get(name, 0)]
    bad += [f"{name}: on record as spilling under Triton {release}, but it no longer does: remove it from "
            "KNOWN_SPILLS" for name in known if name in compiled and name not in spilled]
    assert not bad, _report(bad)


def test_16_bit_matmuls_with_64_row_tiles_use_wgmma(compiled):
    bad = [name for name, r in compiled.items() if "error" not in r and r["check_wgmma"] and not r["wgmma"]]
    assert not bad, _report(bad)


def test_tma_forward_uses_tma_and_wgmma(compiled):
    """The Hopper forward (``forward="tma_ws"``) loads Q/K/V with tensor-memory-accelerator bulk copies
    (``cp.async.bulk.tensor``) and multiplies with ``wgmma``, in every case compiled (there are some)."""
    tma = {name: r for name, r in compiled.items() if r.get("check_tma")}
    assert tma, "no case of the TMA forward was compiled"
    bad = [name for name, r in tma.items() if "error" not in r and not (r["tma"] and r["wgmma"])]
    assert not bad, _report(bad)


def test_wg64_dkdv_uses_wgmma(compiled):
    """The dK/dV variant ``dkdv="wg64"`` (64 keys per warpgroup, 64 queries) compiles to ``wgmma`` wherever its
    pruning lets it run, and such cases exist (head_dim 64 under every Triton the gate runs)."""
    wg64 = {name: r for name, r in compiled.items() if "+wg64-" in name}
    assert any("-d64-" in name for name in wg64), "no case of the wg64 dK/dV was compiled"
    bad = [name for name, r in wg64.items() if "error" not in r and not (r["check_wgmma"] and r["wgmma"])]
    assert not bad, _report(bad)


def test_case_table_covers_its_coverage_table(compiled):
    """Each attention kernel's default config is compiled wherever ``DEFAULT_COVERAGE`` says."""
    from sm90.cases import _DTYPES, ATTENTION_KERNELS, DEFAULT_COVERAGE, TMA_COVERAGE

    tables = [(kernel, DEFAULT_COVERAGE) for kernel in ATTENTION_KERNELS] + [("_attn_fwd_tma_kernel", TMA_COVERAGE)]
    missing = []
    for kernel, table in tables:
        for dtype, coverage in table.items():
            for variant, head_dims in coverage.items():
                for head_dim in head_dims:
                    prefix = f"{kernel}-{_DTYPES[dtype]}-d{head_dim}-{variant}-"
                    if not any(name.startswith(prefix) and r["default"] for name, r in compiled.items()):
                        missing.append(prefix)
    assert not missing, _report(missing)
