"""What ``gpu_check.sh`` will compile, and about how long that takes: printed before anything runs.

Benchmarks: counted from the attention kernels' pruned config lists (every config autotuning benchmarks is one
compile) plus one compile per loss kernel and flag set. GPU tests: they run with one config per kernel
(``LLM2VEC_FAST_AUTOTUNE=0``); their count is the one measured by the issue #10 dry run (the specializations
their shapes produce), so the script also prints the number of kernels Triton actually compiled after each
phase (``.cubin`` files in its fresh cache), for the next plan.

    python benchmarks/gpu_plan.py [--workers N]
"""

from __future__ import annotations

import argparse

#: distinct compiles of the GPU tests with one config per kernel (issue #10's dry-run count: 140 attention), plus
#: the forward="tma_ws" GPU test: the TMA forward padded, packed and plain at hd 64/128 (6), and the backward
#: kernels at its GQA-4 flag sets where no other test compiles them (up to 6), the dropout="philox4x" GPU test:
#: its three kernels padded at hd 128 and the keep-mask kernel (4), and the dkdv="wg64" GPU test: its dK/dV
#: padded+GQA and packed at hd 64 and plain at hd 128 (3; 2 under Triton 3.6, where hd 128 falls back), and the
#: forward and dQ at hd 128 MHA (2)
TEST_COMPILES = 210 + 12 + 4 + 5
#: seconds per compile on one core of the GPU machine: bf16 attention ~1.3 s, fp32 up to ~5x that
SECONDS_PER_COMPILE = 1.6
#: the attention benchmark's rows: (head_dim, kernels it launches, constexpr flags)
_TRAIN = ("fwd", "dq", "dkdv")
ATTENTION_ROWS = [
    *[(d, ("fwd",), dict()) for d in (64, 128)],  # forward (inference: no log-sum-exp)
    *[(d, _TRAIN, dict()) for d in (64, 128)],  # forward+backward
    *[(d, ("fwd",), dict(is_varlen=True)) for d in (64, 128)],
    *[(d, _TRAIN, dict(is_varlen=True)) for d in (64, 128)],
    (64, _TRAIN, dict(has_dropout=True)),
    (64, _TRAIN, dict(group=4)),
    # forward="tma_ws" beside the default: forward at hd 64/128, forward+backward at hd 128
    *[(d, ("fwd_tma",), dict()) for d in (64, 128)],
    (128, ("fwd_tma", "dq", "dkdv"), dict()),
    # dropout="philox4x" beside the default RNG: forward+backward at hd 64 (FA2's dropout row) and 128 (both RNGs)
    (64, _TRAIN, dict(has_dropout=True, philox4x=True)),
    (128, _TRAIN, dict(has_dropout=True)),
    (128, _TRAIN, dict(has_dropout=True, philox4x=True)),
    # dkdv="wg64" beside the default: forward+backward at hd 64/128 (MHA, no mask: only its dK/dV compiles are new)
    *[(d, ("fwd", "dq", "dkdv_wg64"), dict()) for d in (64, 128)],
]
#: MNTP fused: forward, backward frozen and trained head; GEMM variant: its row softmax with and without the
#: gradient; InfoNCE fused: norms, forward, backward; GEMM variant: its row softmax, two ways
LOSS_COMPILES = 3 + 2 + 3 + 2


def benchmark_compiles() -> int:
    from llm2vec_fast.kernels.attention import candidate_configs

    seen = set()
    for head_dim, kinds, flags in ATTENTION_ROWS:
        for kind in kinds:
            for config in candidate_configs(kind, head_dim, "tf32", **flags):
                # the forward of a training step stores the log-sum-exp: a different compile from inference
                train = kind.startswith("fwd") and len(kinds) > 1
                seen.add((kind, head_dim, tuple(sorted(flags.items())), train, config))
    return len(seen) + LOSS_COMPILES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=8, help="parallel compile processes (pytest-xdist)")
    args = parser.parse_args()
    bench = benchmark_compiles()
    total = TEST_COMPILES + bench
    seconds = total * SECONDS_PER_COMPILE / args.workers
    print(f"== plan: {total} Triton compiles ({TEST_COMPILES} GPU tests, {bench} benchmarks), about "
          f"{seconds:.0f} s of compiling on {args.workers} workers (at {SECONDS_PER_COMPILE} s per compile)")


if __name__ == "__main__":
    main()
