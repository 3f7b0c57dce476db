"""Fingerprint the sm_90 code of a set of kernel cases, to show that a refactor changed no generated code.

``python tests/sm90/codegen_digest.py OUT.json [--only SUBSTRING ...] [--causal SUBSTRING ...]`` compiles the
cases of ``cases.py`` whose names contain an ``--only`` string (and a ``CAUSAL=True`` copy of those that contain a
``--causal`` string; without ``--only``, the ``REPRESENTATIVE`` set below) and writes, per case, a SHA-256 of the
SASS (``cuobjdump -sass``: instructions and their encodings), a SHA-256 of the PTX without its line table
(``.loc`` / ``.file``, the debug sections and their ``$L__tmp`` labels: source lines move in a refactor), the SASS
instruction count, registers, spills and shared memory. ``--compare BEFORE.json AFTER.json`` lists the cases that
differ. Run the "before" side from a copy of the old tree (``git archive REV | tar -x -C DIR``, ``PYTHONPATH=DIR``),
each side with its own ``TRITON_CACHE_DIR``.

ptxas reads the line table (``-lineinfo``), and every inlined ``@triton.jit`` helper adds scopes to it, so the same
PTX can be scheduled differently; ``TRITON_DISABLE_LINE_INFO=1`` on both sides tells the two apart (docs/PERF.md).
``TRITON_INTERPRET`` must be unset or 0, as for ``compile.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `sm90` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


#: without --only: 30 attention cases (fwd, dQ, dK/dV, dK/dV wg64, the TMA forward; plain, GQA, varlen, padding,
#: padding="skip", dropout with both RNGs, soft-cap+window; bf16/fp16/fp32; hd 64/96/128), 4 of them also causal
REPRESENTATIVE = (
    "_attn_fwd_kernel-bf16-d64-plain-",
    "_attn_fwd_kernel-bf16-d128-varlen-gqa-",
    "_attn_fwd_kernel-bf16-d64-dropout-",
    "_attn_fwd_kernel-bf16-d128-dropout4x-",
    "_attn_fwd_kernel-bf16-d64-padskip-gqa-",
    "_attn_fwd_kernel-bf16-d128-softcap-window-gqa-",
    "_attn_fwd_kernel-bf16-d96-padding-dropout-gqa-",
    "_attn_fwd_kernel-fp16-d64-padding-dropout4x-gqa-",
    "_attn_fwd_kernel-fp32-d128-padding-dropout-gqa-",
    "_attn_bwd_dq_kernel-bf16-d64-plain-",
    "_attn_bwd_dq_kernel-bf16-d128-varlen-dropout-gqa-",
    "_attn_bwd_dq_kernel-bf16-d64-padskip-gqa-",
    "_attn_bwd_dq_kernel-bf16-d128-softcap-window-gqa-",
    "_attn_bwd_dq_kernel-bf16-d96-padding-gqa-",
    "_attn_bwd_dq_kernel-bf16-d64-padding-dropout4x-gqa-",
    "_attn_bwd_dq_kernel-fp16-d64-padding-dropout-gqa-",
    "_attn_bwd_dkdv_kernel-bf16-d64-plain-",
    "_attn_bwd_dkdv_kernel-bf16-d128-varlen-gqa-",
    "_attn_bwd_dkdv_kernel-bf16-d64-dropout4x-",
    "_attn_bwd_dkdv_kernel-bf16-d96-padding-dropout-gqa-",
    "_attn_bwd_dkdv_kernel-bf16-d128-softcap-window-gqa-",
    "_attn_bwd_dkdv_kernel-bf16-d64-padskip-gqa-",
    "_attn_bwd_dkdv_kernel-fp32-d128-padding-dropout-gqa-",
    "_attn_bwd_dkdv_kernel-bf16-d64-padding-gqa+wg64-64x128w8s2",
    "_attn_bwd_dkdv_kernel-bf16-d96-plain+wg64",
    "_attn_bwd_dkdv_kernel-fp16-d64-plain+wg64",
    "_attn_bwd_dkdv_kernel-bf16-d64-varlen-gqa+wg64",
    "_attn_fwd_tma_kernel-bf16-d64-plain-",
    "_attn_fwd_tma_kernel-bf16-d128-varlen-gqa-",
    "_attn_fwd_tma_kernel-bf16-d64-padding-gqa-128x128w8s3",
)
REPRESENTATIVE_CAUSAL = (
    "_attn_fwd_kernel-bf16-d64-plain-",
    "_attn_bwd_dq_kernel-bf16-d64-plain-",
    "_attn_bwd_dkdv_kernel-bf16-d64-plain-",
    "_attn_bwd_dkdv_kernel-bf16-d64-padding-gqa+wg64",
)


def _ptx_without_debug(ptx: str) -> str:
    ptx = re.sub(r"^\s*\.section\s+\.debug_\w+\s*\{.*?^\s*\}", "", ptx, flags=re.S | re.M)
    # and the labels that only the debug sections use
    return "\n".join(line for line in ptx.splitlines() if not re.match(r"\s*(\.(loc|file)\b|\$L__tmp\d+:)", line))


def digest_case(case: dict, dump: str = "") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from sm90.compile import _TARGET, _resource_usage, _source, cuobjdump

    result = {"name": case["name"]}
    try:
        compiled = triton.compile(_source(case), target=GPUTarget(*_TARGET),
                                  options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
        cubin = compiled.asm["cubin"]
        sass = cuobjdump(cubin, "-sass")
        instructions = [line for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
        usage = _resource_usage(cubin)
        if dump:  # the texts behind the digests, to read what differs
            Path(dump, case["name"] + ".sass").write_text(sass)
            Path(dump, case["name"] + ".ptx").write_text(_ptx_without_debug(compiled.asm["ptx"]))
        result.update(sass_sha256=hashlib.sha256("\n".join(instructions).encode()).hexdigest(),
                      ptx_sha256=hashlib.sha256(_ptx_without_debug(compiled.asm["ptx"]).encode()).hexdigest(),
                      instructions=len(instructions), registers=usage["reg"],
                      spill_bytes=usage.get("stack", 0) + usage.get("local", 0),
                      shared=max(int(compiled.metadata.shared), usage.get("shared", 0)))
    except Exception as exc:  # noqa: BLE001 - reported per case
        result["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
    return result


def _cases(only: list[str], causal: list[str]) -> list[dict]:
    """The cases whose names contain an ``only`` string, and causal copies of those that contain a ``causal`` one.
    A string that names no case is an error: a comparison must not shrink silently when cases.py renames one."""
    from sm90.cases import all_cases

    every = all_cases()
    unknown = [part for part in only + causal if not any(part in case["name"] for case in every)]
    if unknown:
        raise ValueError(f"no case of sm90/cases.py has a name containing {unknown}")
    cases = [case for case in every if any(part in case["name"] for part in only)]
    cases += [dict(case, name=case["name"] + "-causal", constexprs=dict(case["constexprs"], CAUSAL=True))
              for case in cases if "CAUSAL" in case["constexprs"] and any(part in case["name"] for part in causal)]
    return cases


def compare(before: dict, after: dict) -> int:
    """Print each case whose digests differ, or that is missing or failed on a side; 1 if any, else 0."""
    keys = ("sass_sha256", "ptx_sha256", "instructions", "registers", "spill_bytes", "shared")
    names = sorted(set(before) | set(after))
    differ = 0
    for name in names:
        a, b = before.get(name, {}), after.get(name, {})
        if "error" in a or "error" in b or not a or not b:
            print(f"{name}: missing or failed ({a.get('error', '') or b.get('error', '') or 'absent'})")
            differ += 1
        elif any(a[k] != b[k] for k in keys):
            print(f"{name}: " + ", ".join(f"{k} {a[k]} -> {b[k]}" for k in keys if a[k] != b[k]))
            differ += 1
    print(f"{len(names)} cases, {len(names) - differ} identical SASS and PTX, {differ} different")
    return 1 if differ else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--only", action="append", default=[], help="compile cases whose name contains this")
    parser.add_argument("--causal", action="append", default=[], help="also these cases with CAUSAL=True")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dump", default="", help="also write each case's SASS and PTX into this folder")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        return compare(before, after)
    if args.out is None:
        parser.error("OUT is needed (or --compare BEFORE AFTER)")
    if not args.only:
        args.only, args.causal = list(REPRESENTATIVE), list(REPRESENTATIVE_CAUSAL)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET must be unset or 0: the interpreter has nothing to compile")
    try:
        cases = _cases(args.only, args.causal)
    except ValueError as error:
        parser.error(str(error))
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = {r["name"]: r for r in pool.map(digest_case, cases, [args.dump] * len(cases), chunksize=1)}
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    failed = [name for name, r in results.items() if "error" in r]
    print(f"{len(results)} cases, {len(failed)} failed" + "".join(f"\n  {n}: {results[n]['error']}" for n in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
