"""Triton IR of a kernel for sm_90, built offline without a GPU (run with TRITON_INTERPRET=0: under the
interpreter ``@triton.jit`` gives no compilable function).

``python kernel_ir.py SPECS_JSON`` prints each kernel's TTIR as the code generator emits it (before any
optimisation pass, so that every multiplication of the source is still there).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys


def kernel_ir(fn, signature: dict, constexprs: dict) -> str:
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = triton.compiler.ASTSource(fn, signature, constexprs)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
    return str(module)


def signature_of(fn, pointers: dict, constexprs: dict, floats=()) -> dict:
    """Every argument not named a pointer, a float or a constexpr is an i32 scalar (how Triton passes an int
    below 2^31: the case in which int32 offset arithmetic would wrap)."""
    return {name: ("constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32"))
            for name in fn.arg_names}


def int32_index_products(specs: list) -> dict:
    """For each kernel of ``specs`` (``[module, kernel, pointers, constexprs, floats]``), the lines of its TTIR
    that multiply int32 tensors: ``row * stride`` computed there wraps once it reaches 2^31. Runs in a fresh
    process with ``TRITON_INTERPRET=0``."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, __file__, json.dumps(specs)], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    irs = json.loads(out.stdout)
    missing = {spec[1] for spec in specs} - set(irs)
    if missing or not all("tt.addptr" in ttir for ttir in irs.values()):
        raise RuntimeError(f"no IR (or no pointer arithmetic) for {sorted(missing) or sorted(irs)}")
    pattern = re.compile(r"arith\.muli .*: tensor<[0-9x]*xi32>")
    return {name: [line.strip() for line in ttir.splitlines() if pattern.search(line)] for name, ttir in irs.items()}


if __name__ == "__main__":
    # argv[1]: JSON list of [module, kernel, pointers, constexprs, floats]; prints JSON {kernel: TTIR}.
    out = {}
    for module_name, kernel_name, pointers, constexprs, floats in json.loads(sys.argv[1]):
        kernel = getattr(importlib.import_module(module_name), kernel_name)
        out[kernel_name] = kernel_ir(kernel, signature_of(kernel, pointers, constexprs, floats), constexprs)
    print(json.dumps(out))
