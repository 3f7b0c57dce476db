"""Embedding precision with sentence-transformers' meaning (``quantize_embeddings``).

- ``float32``: unchanged;
- ``int8`` / ``uint8``: per-dimension scalar quantization into 256 buckets between calibrated ranges (each
  dimension's min and max over ``calibration_embeddings``, else over the embeddings themselves); ``int8`` is the
  bucket index minus 128;
- ``binary`` / ``ubinary``: one bit per dimension (``value > 0``), packed 8 to a byte (``dim / 8`` bytes, the
  last byte zero-padded); ``binary`` stores each byte minus 128 as int8.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def quantization_ranges(calibration: np.ndarray) -> np.ndarray:
    """``(2, dim)``: each dimension's minimum and maximum over ``calibration`` ``(n, dim)``."""
    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim != 2 or calibration.shape[0] < 2:
        raise ValueError(f"int8/uint8 ranges need at least 2 calibration embeddings as (n, dim), got shape "
                         f"{calibration.shape}: pass ranges or calibration_embeddings from a representative set")
    if calibration.shape[0] < 100:
        logger.warning("int8/uint8 ranges computed from only %d embeddings; pass ranges or calibration_embeddings "
                       "from a larger representative set for stable buckets", calibration.shape[0])
    return np.stack([calibration.min(axis=0), calibration.max(axis=0)])


def quantize_embeddings(embeddings: np.ndarray, precision: str, *, ranges: np.ndarray | None = None,
                        calibration_embeddings: np.ndarray | None = None) -> np.ndarray:
    """float ``(n, dim)`` or ``(dim,)`` -> the same rows in ``precision`` (see the module docstring).

    ``ranges`` ``(2, dim)`` or ``calibration_embeddings`` ``(m, dim)`` fix the int8/uint8 buckets; without
    either they come from ``embeddings`` (at least 2 rows)."""
    check_precision(precision)
    embeddings = np.asarray(embeddings)
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise TypeError(f"embeddings to quantize must be floating point, got {embeddings.dtype}")
    embeddings = embeddings.astype(np.float32, copy=False)
    if precision == "float32":
        return embeddings
    if precision in ("binary", "ubinary"):
        packed = np.packbits(embeddings > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    if ranges is None:
        ranges = quantization_ranges(embeddings if calibration_embeddings is None else calibration_embeddings)
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, embeddings.shape[-1]):
        raise ValueError(f"ranges must be (2, {embeddings.shape[-1]}), got {ranges.shape}")
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)  # a constant dimension: every value in bucket 0
    buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
    return (buckets - 128).astype(np.int8) if precision == "int8" else buckets.astype(np.uint8)
