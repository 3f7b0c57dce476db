"""torch.compile for our models: check up front that a compiler backend works, then compile in place.

``torch.compile`` is lazy: a missing C++ compiler (CPU) or Triton (CUDA) shows up only on the first forward, as an
error deep inside inductor. :func:`compiler_unavailable_reason` finds those cases before anything runs, and
:func:`compile_model` turns them into a clear error (or, when asked, a logged fallback to eager).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from functools import lru_cache

import torch

logger = logging.getLogger(__name__)


class CompilerUnavailableError(RuntimeError):
    """``compile=True`` where no compiler backend works on this machine."""


@lru_cache(maxsize=None)
def _cxx_works(cxx: str) -> bool:
    try:
        subprocess.run([cxx, "--version"], check=True, capture_output=True, timeout=30)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _cpp_compiler_reason() -> str | None:
    from torch._inductor import config

    candidates = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    names = [c for c in candidates if c is not None]
    if os.environ.get("CXX"):
        names.insert(0, os.environ["CXX"])
    for name in names:
        path = shutil.which(name)
        if path is not None and _cxx_works(path):
            return None
    return (f"inductor needs a C++ compiler on CPU and none of {names} works here "
            "(install g++ or set CXX, or compile with backend='eager'/'aot_eager')")


def compiler_unavailable_reason(device: torch.device | str | None = None, backend: str = "inductor") -> str | None:
    """Why ``torch.compile(..., backend=backend)`` cannot generate code for ``device`` here, or None if it can.

    ``device`` defaults to CPU. The CPU check is a working C++ compiler (what inductor's C++/OpenMP code needs);
    the CUDA check is an importable Triton and a GPU of compute capability 7.0 or newer."""
    if backend != "inductor":
        return None  # eager/aot_eager generate no code; other backends check themselves
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        if importlib.util.find_spec("triton") is None:
            return "inductor needs Triton on CUDA and triton is not installed"
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major < 7:
            return f"inductor's Triton code needs compute capability >= 7.0, this GPU is {major}.{minor}"
        return None
    return _cpp_compiler_reason() if device.type == "cpu" else None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without one)."""
    return next((parameter.device for parameter in module.parameters()), torch.device("cpu"))


def compile_model(module: torch.nn.Module, *, dynamic: bool | None = True, fullgraph: bool = True,
                  backend: str = "inductor", fallback: bool = False, **options) -> torch.nn.Module:
    """Compile ``module`` in place (``nn.Module.compile``: its class, parameters and state dict stay as they are)
    and return it.

    ``dynamic=True`` marks sequence lengths (and batch sizes) dynamic from the first call, so that new lengths do
    not recompile; ``fullgraph=True`` makes any graph break an error instead of a silent slow path. Where
    :func:`compiler_unavailable_reason` finds no working backend for the module's device, this raises
    :class:`CompilerUnavailableError` saying why, or with ``fallback=True`` logs a warning saying why and returns
    the module uncompiled (eager)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"compile_model takes a torch.nn.Module, got {type(module).__name__}")
    reason = compiler_unavailable_reason(module_device(module), backend)
    if reason is not None:
        if not fallback:
            raise CompilerUnavailableError(f"cannot compile with backend={backend!r}: {reason}")
        logger.warning("not compiling, running eager: %s", reason)
        return module
    module.compile(dynamic=dynamic, fullgraph=fullgraph, backend=backend, **options)
    logger.info("compiling %s with torch.compile(backend=%r, dynamic=%s, fullgraph=%s) on its first call",
                type(module).__name__, backend, dynamic, fullgraph)
    return module


@torch.library.custom_op("llm2vec_fast::materialize", mutates_args=())
def _materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that a compiled graph computes once, into a buffer of its own (an opaque op)."""
    return x.clone()


@_materialize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _materialize_under_compile(module: torch.nn.Module, args, output):
    if not torch.compiler.is_compiling() or not isinstance(output, tuple):
        return output
    return tuple(_materialize(t) if isinstance(t, torch.Tensor) else t for t in output)


def compute_rotary_once(model: torch.nn.Module) -> int:
    """Make a compiled ``model`` compute its rotary ``(cos, sin)`` once per forward, not once per layer.

    transformers' rotary embedding modules (``*RotaryEmbedding``) return ``(cos, sin)`` that every layer reads.
    Inductor inlines cheap pointwise producers into their consumers, and on CPU it counts ``cos``/``sin`` as cheap
    (only ``exp``, ``log``, ``tanh``, ``sigmoid`` are "heavy" there), so the compiled graph evaluated them again in
    every layer, for every query and key head. A forward hook passes them through an opaque copy while compiling,
    which makes them buffers of their own; eager calls are unchanged. Idempotent; returns how many modules got it."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            if not getattr(module, "_llm2vec_fast_rotary_once", False):
                module.register_forward_hook(_materialize_under_compile)
                module._llm2vec_fast_rotary_once = True
            count += 1
    return count


def float_attributes_constant():
    """The torch.compile setting every compiled call of ours is traced under (``specialize_float``): float module
    attributes (epsilons, LoRA's ``scaling``, ``nn.Embedding.norm_type``) stay constants, where ``dynamic=True``
    would make them graph inputs that inductor then specializes one by one, tracing the model a second time. Read
    when a graph is traced, i.e. on a call, so it is set around the calls (a context manager)."""
    return torch._dynamo.config.patch(specialize_float=True)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` was called on it (:func:`compile_model` compiles in place)."""
    return getattr(module, "_compiled_call_impl", None) is not None
