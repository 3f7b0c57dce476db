"""Choosing between a Triton kernel and its PyTorch reference."""

from __future__ import annotations

import contextlib
import os

import torch

IMPLEMENTATIONS = ("auto", "triton", "torch")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """``auto`` means Triton for CUDA tensors, or for any tensor under ``TRITON_INTERPRET=1``."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "triton":
        if not on_cuda and not triton_interpreter_enabled():
            raise RuntimeError(
                "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    return on_cuda or triton_interpreter_enabled()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 inputs keep fp32 products ("ieee", so that a kernel matches an fp32
    reference; the default, tf32, would cost three digits); 16-bit inputs use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's (a model on cuda:1 while the current
    device is cuda:0 would otherwise launch on the wrong device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
