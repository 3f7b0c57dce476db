"""Compile Triton kernels for sm_90 (H100/H200) offline, without a GPU, and report what the gate checks.

Run as a script (``python tests/sm90/compile.py OUT.jsonl [--workers 2] [--only SUBSTRING]``) in a process where
``TRITON_INTERPRET`` is unset or 0: under the interpreter ``@triton.jit`` gives no compilable function. The test
``tests/test_sm90_compile.py`` starts it in a subprocess with a fresh Triton cache, so each run compiles everything.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `sm90` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Hopper's largest shared-memory allocation per block (227 KiB: 228 KiB per SM less 1 KiB reserved)
SM90_MAX_SHARED = 232_448
_TARGET = ("cuda", 90, 32)


def _resolve(kernel: str):
    module, _, attr = kernel.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    # Autotuner / Heuristics wrappers keep the JITFunction in `.fn`
    while not hasattr(fn, "params") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _source(case):
    from triton.compiler import ASTSource

    fn = _resolve(case["kernel"])
    descs = case.get("descs", {})
    unknown = set(case["pointers"]) | set(case["floats"]) | set(case["constexprs"]) | set(case["ones"]) | set(descs)
    unknown -= set(fn.arg_names)
    if unknown:
        raise ValueError(f"{case['name']}: {sorted(unknown)} are not parameters of {case['kernel']}")
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr or name in case["ones"]:
            if name not in case["constexprs"] and name not in case["ones"]:
                raise ValueError(f"{case['name']}: constexpr {name} of {case['kernel']} has no value")
            signature[name] = "constexpr"
            constexprs[name] = 1 if name in case["ones"] else case["constexprs"][name]
        elif name in descs:  # a host-side tensor descriptor: "tensordesc<bf16[128, 64]>" (dtype, block shape)
            dtype, block = descs[name]
            signature[name] = f"tensordesc<{dtype}[{', '.join(map(str, block))}]>"
        elif name in case["pointers"]:
            signature[name] = "*" + case["pointers"][name]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif name in case["floats"]:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in case["odd"]:  # strides and bucketed sizes: multiples of 16 in real launches
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def cuobjdump(cubin: bytes, flag: str) -> str:
    """The output of the cuobjdump that ships in Triton's package, run with ``flag`` on ``cubin``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], check=True, capture_output=True, text=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL / SHARED of the cubin, from cuobjdump."""
    text = cuobjdump(cubin, "--dump-resource-usage")
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}
    if "reg" not in usage:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{text}")
    return usage


def compile_case(case: dict) -> dict:
    """Compile one case; the result carries the error text instead of raising, so one failure does not hide
    the others."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = {key: case[key] for key in ("name", "kernel", "num_warps", "num_stages", "default", "check_wgmma")}
    result["check_tma"] = case.get("check_tma", False)
    start = time.perf_counter()
    try:
        compiled = triton.compile(_source(case), target=GPUTarget(*_TARGET),
                                  options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
        usage = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        result.update(
            registers=usage["reg"],
            spill_bytes=usage.get("stack", 0) + usage.get("local", 0),
            shared=max(int(compiled.metadata.shared), usage.get("shared", 0)),
            wgmma="wgmma.mma_async" in ptx,
            mma_sync="mma.sync" in ptx,
            tma="cp.async.bulk.tensor" in ptx,  # tensor-memory-accelerator copies
            # a warp-specialized loop (producer/consumer partitions), not only the attribute asking for one
            warp_specialized="ttg.warp_specialize" in compiled.asm.get("ttgir", ""),
        )
    except Exception as exc:  # noqa: BLE001 - reported per case by the test
        result["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="JSON-lines file for the results, one line per case")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="", help="compile only cases whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET must be unset or 0: the interpreter has nothing to compile")
    from sm90.cases import all_cases

    cases = [case for case in all_cases() if args.only in case["name"]]
    run_cases(cases, args.out, args.workers)
    return 0


def run_cases(cases: list[dict], out: Path, workers: int = 2) -> None:
    """Compile ``cases`` in a pool of ``workers`` processes; each result is appended to ``out`` (JSON lines) as
    it comes, so a run cut short keeps what it compiled."""
    with open(out, "w", encoding="utf-8") as handle, ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        # the slowest (fp32, wide head_dim) first, so that they do not finish last alone
        order = sorted(cases, key=lambda c: (c["pointers"].get("Q", c["pointers"].get("H_ptr")) != "fp32",
                                             -c["constexprs"].get("BLOCK_D", 0)))
        for result in pool.map(compile_case, order, chunksize=1):
            handle.write(json.dumps(result) + "\n")
            handle.flush()


if __name__ == "__main__":
    sys.exit(main())
