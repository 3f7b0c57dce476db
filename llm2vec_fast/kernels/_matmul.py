"""Matrix products with fp32 results for the loss kernels' cuBLAS variants."""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 (or, for float64 operands, float64) result. 16-bit CUDA operands go to cuBLAS as
    they are, with an fp32 output (no upcast copies of the operands); 16-bit CPU operands are upcast first."""
    if a.dtype in _HALF:
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()
    return a @ b
