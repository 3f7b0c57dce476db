"""Choosing between a Triton kernel and its PyTorch reference, and what its launch needs."""

from __future__ import annotations

import contextlib
import os

import torch
import triton

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


def split_tiles(row_blocks: int, tiles: int, device: torch.device, programs_per_sm: int) -> tuple[int, int]:
    """``(splits, tiles_per_split)``: the ``tiles`` along a row block's columns split over programs, so that about
    ``programs_per_sm`` programs per SM run even when few row blocks do (the partial results are merged after);
    off a GPU or under the interpreter 2 splits, to exercise that merge. Every split starts inside the tiles."""
    if device.type != "cuda" or triton_interpreter_enabled():
        splits = min(2, tiles)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(tiles, triton.cdiv(programs_per_sm * sms, row_blocks)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's (a model on cuda:1 while the current
    device is cuda:0 would otherwise launch on the wrong device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
