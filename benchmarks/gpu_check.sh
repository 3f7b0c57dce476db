#!/usr/bin/env bash
# GPU check, for a machine with one CUDA GPU (sized for an H100/H200: well under 10 minutes).
#   1. every GPU-only test of every area (`-m gpu`, bf16 included), with compiled Triton (TRITON_INTERPRET=0)
#      and one fixed config per attention kernel (LLM2VEC_FAST_AUTOTUNE=0) so that the tests do not autotune;
#   2. every benchmark in benchmarks/ (autotuned, as users run it), ending with a short table of times, TFLOP/s
#      or GB/s, and ours-vs-baseline ratios.
# Usage: bash benchmarks/gpu_check.sh [extra pytest args for the benchmarks]
# Copy the table, with the date and the GPU, into docs/PERF.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; the GPU tests and GPU benchmarks did not run." >&2
    exit 2
fi

start=$(date +%s)
echo "== $(date -u '+%Y-%m-%d %H:%M UTC') $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
python -c "import torch, triton; print('== torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
python -c "import flash_attn; print('== flash_attn', flash_attn.__version__)" 2>/dev/null \
    || echo "== flash_attn not installed: the FA2 baseline is PyTorch SDPA's FLASH_ATTENTION backend"

python -c "import pytest_benchmark" 2>/dev/null \
    || echo "== pytest-benchmark is missing: the benchmarks will error (pip install pytest-benchmark)"

echo "== 1/2 GPU tests"
TRITON_INTERPRET=0 LLM2VEC_FAST_AUTOTUNE=0 timeout 330 python -m pytest -m gpu tests/ -q \
    -o addopts="" -ra --durations=10
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

echo "== 2/2 benchmarks"
# The CPU rows (names ending in _cpu) measure the CPU fallbacks; they would only eat this script's time here.
TRITON_INTERPRET=0 timeout 420 python -m pytest benchmarks/ -q -o addopts="" -ra -k "not cpu" \
    --benchmark-columns=median,rounds --benchmark-sort=name "$@"
bench_rc=$?
total_s=$(( $(date +%s) - start ))

echo "== summary: GPU tests exit ${tests_rc} (${tests_s}s); benchmarks exit ${bench_rc}; total ${total_s}s"
echo "   (exit 124 = hit the time limit; 5 = nothing collected)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
