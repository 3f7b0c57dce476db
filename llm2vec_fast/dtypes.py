"""Compute dtype names, as configs and command lines give them (imports torch only)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MODEL_DTYPES = ("auto", *DTYPES)  # the names a config or a command line may give


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where the device computes it natively (CUDA with bf16 support), fp32 elsewhere."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str | None) -> torch.dtype:
    """A dtype name (or "auto"/None: :func:`default_dtype`) as a ``torch.dtype``."""
    if name in (None, "auto"):
        return default_dtype()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]
