"""Bidirectional (non-causal) fused attention: FlashAttention-2 style Triton kernels.

Public function: :func:`bidirectional_attention`. Layout as FlashAttention-2:

* padded batch: q ``(batch, seq, heads, head_dim)``, k/v ``(batch, seq, kv_heads, head_dim)``, optional
  ``key_padding_mask`` ``(batch, seq)`` bool, True = real token;
* packed batch: q ``(total_tokens, heads, head_dim)``, k/v ``(total_tokens, kv_heads, head_dim)``, with
  ``cu_seqlens`` (int32, ``batch + 1``, starting at 0) and ``max_seqlen``.

Grouped-query and multi-query attention are handled inside the kernels (``kv_head = head // group``); K/V are
never repeated in memory. Padded query rows give zeros. Attention dropout is generated in the kernels from a
Philox counter ``(key index, query index, batch * heads + head)`` and a seed drawn from torch's RNG of the
tensors' device, so the backward regenerates exactly the same keep-mask and no ``(B, H, S, S)`` mask exists.

Kernels:

* ``_attn_fwd_kernel``: one program per (query tile, batch, head); online softmax in base 2 with
  ``log2(e)`` folded into the scale, fp32 accumulators; saves the base-2 log-sum-exp (``+inf`` on padded rows).
* ``_attn_bwd_dq_kernel``: one program per (query tile, batch, head); computes ``delta = rowsum(dO * O)``
  for its rows (stored for the next kernel) and loops over key tiles to build dQ.
* ``_attn_bwd_dkdv_kernel``: one program per (key tile, batch, kv head); loops over the query heads of
  its group and over query tiles, so dK/dV of a kv head are summed without atomics.

Loops run over full tiles without boundary masks and over one masked tail tile, so any length works and full
tiles pay nothing for it.

:func:`bidirectional_attention` calls two ``torch.library`` custom ops, ``llm2vec_fast::attention_forward`` and
``llm2vec_fast::attention_backward`` (fake implementations and an autograd formula registered), so that
``torch.compile`` traces a patched model as one graph: the ops run these kernels on CUDA (or under
``TRITON_INTERPRET=1``) and the PyTorch path elsewhere. Argument checks that need values on the host (of
``cu_seqlens``) run inside the op.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import dot_precision as _dot_precision, launch_device, triton_interpreter_enabled, use_triton

try:  # host-side tensor descriptors (Triton >= 3.4): the forward="tma_ws" variant
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: that variant falls back to the default forward
    TensorDescriptor = None

logger = logging.getLogger(__name__)

__all__ = [
    "bidirectional_attention",
    "bidirectional_attention_reference",
    "attention_dropout_keep_mask",
    "draw_dropout_seed",
    "effective_dropout_p",
    "attention_variants",
    "VARIANTS",
    "SUPPORTED_HEAD_DIMS",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: head_dims the Triton kernels accept: multiples of 8 from 16 to 256 (non powers of two are padded in
#: registers up to the next power of two and masked). 32, 64, 96, 128 and 256 are the ones models use.
SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 8))
LOG2E = 1.4426950408889634
_INTERPRET = triton_interpreter_enabled()


# ----------------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------------


def _seq_bucket(max_seqlen: int) -> int:
    """Autotuning key for the sequence length: powers of two, so that encoding batches of many lengths do not
    re-tune for each one."""
    return min(triton.next_power_of_2(max(int(max_seqlen), 16)), 16384)


#: ``LLM2VEC_FAST_AUTOTUNE=0``: one fixed config per kernel (that fits every head_dim) instead of autotuning, for
#: quick correctness runs on a GPU (the GPU tests); the autotuned default is what benchmarks and users get.
_AUTOTUNE = os.environ.get("LLM2VEC_FAST_AUTOTUNE", "1").lower() not in ("0", "false", "no", "off")

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for Hopper, expected fastest first (the first that fits is
# the fixed config). BLOCK_M tiles queries, BLOCK_N keys; the dK/dV kernel keeps a BLOCK_N key tile resident and
# streams BLOCK_M query tiles. `_prune` drops, per head_dim, those that
# would overflow shared memory or (by `_register_estimate`) spill registers; docs/PERF.md lists the sm_90 compile
# report (registers, spills) these choices were calibrated on.
_FWD_CANDIDATES = (
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (128, 32, 8, 2),
    (64, 64, 4, 2), (64, 32, 4, 2),
)
_DQ_CANDIDATES = (
    (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2),
    (32, 32, 4, 2),
)
_DKDV_CANDIDATES = (
    (32, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 3), (16, 64, 4, 2), (16, 64, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2),
    (16, 32, 8, 2),
)
#: the dK/dV variant ``dkdv="wg64"``: each warpgroup (4 warps) owns 64 keys and streams 64 queries, so that on sm_90
#: S^T and dP^T are m64n64 ``wgmma`` per warpgroup and dK/dV m64n(head_dim), as flash-attention 3's Hopper backward
#: (64 queries over 128 keys, two MMA warpgroups): 128 keys with 8 warps, 64 with 4; expected fastest first. Its
#: pruning is the sm_90 gate's verdict (``_DKDV_WG64_FITS``), no estimate; where nothing fits, the variant falls
#: back to the default dK/dV (``_dkdv_wg64_unsupported``).
_DKDV_WG64_CANDIDATES = ((64, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 3), (64, 128, 8, 1))
#: (BLOCK_D, dropout, banded, plain) -> the wg64 configs that compiled for sm_90 without spills (bf16), fastest
#: expected first; ``plain``: one query head per kv head, no padding mask, not packed. Registers are the limit: dK
#: and dV of 64 keys hold 64 (head_dim 64) or 128 (128) per thread beside three 64x64 fp32 score tiles (32 each),
#: and the two Triton releases we run differ, so the table is per release (``_TRITON_RELEASE``). Head_dim 64:
#: plain 64x128 w8 s2 209-213 registers, 64x64 w4 s2 191-218; with GQA, padding or varlen 64x128 w8 s2 238-247
#: under 3.9 (s3 253) but 16-24 bytes spilled under 3.6, where s1 holds (198-204); banded (soft-cap+window,
#: padding="skip") s1 only (219-246; s2 spilled 192-200 under 3.9). Dropout spilled in every tile (56-312 bytes:
#: the Philox state of 32 elements per thread). Head_dim 128 (and 96, padded to 128): only plain, s1, only under
#: 3.9 (251-254; 56-64 bytes spilled under 3.6; with GQA, padding or varlen 120-984 under 3.9).
_TRITON_RELEASE = tuple(int(part) for part in triton.__version__.split(".")[:2])
_DKDV_WG64_FITS = {
    (64, False, False, False): ((64, 128, 8, 2), (64, 128, 8, 3)) if _TRITON_RELEASE >= (3, 9) else ((64, 128, 8, 1),),
    (64, False, False, True): ((64, 128, 8, 2), (64, 64, 4, 2)),
    (64, False, True, False): ((64, 128, 8, 1),),
    (64, False, True, True): ((64, 128, 8, 1),),
    **({(128, False, False, True): ((64, 128, 8, 1),)} if _TRITON_RELEASE >= (3, 9) else {}),
}
#: the Hopper forward (``forward="tma_ws"``): the config space of Triton's fused-attention tutorial on sm_90, 128x128
#: tiles with 8 warps and 128x64 with 4 warps, 2-4 stages (its 8-warp tiles under 128x128 are dropped there);
#: expected fastest first. 16-bit inputs at head_dim 64 and 128 only (the variant falls back elsewhere).
_TMA_FWD_CANDIDATES = (
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 4, 2), (128, 128, 8, 4),
)
#: fp32 inputs ("ieee" dots, no tensor cores): the FMA matmuls hold whole operand rows per thread, and on sm_90
#: every 16-bit candidate above spills there (a 32x32 forward at head_dim 128: 680 bytes; 64x64: 10 KB, and
#: minutes to compile). One 16x16 tile per kernel keeps them in registers up to head_dim 128 (dQ needs 8 warps:
#: 256 bytes spilled with 4; at head_dim 256 dQ still spills 248 bytes); fp32 is the exact path, not the fast one.
_FP32_CANDIDATES = {"fwd": ((16, 16, 4, 1),), "dq": ((16, 16, 8, 1),), "dkdv": ((16, 16, 8, 1),)}
#: head_dim 256 (BLOCK_D 256): the register estimate below does not hold there (the forward's 64x64 w8 spilled
#: while its estimate was half that of 128x32 w8, which did not), so these lists are the sm_90 compiles' verdict,
#: without spills, fastest expected first
_WIDE_HEAD_CANDIDATES = {
    # 128x32 w8 and 64x32 w4 spilled 16 and 48 bytes under Triton 3.6 (0 under 3.9); 64x32 w8: 155 registers
    "fwd": ((64, 32, 8, 2),),
    "dq": ((64, 32, 8, 2), (32, 32, 4, 2)),
    "dkdv": ((32, 32, 8, 2), (16, 32, 8, 2)),
}
#: with dropout, dQ's 64x32 w8 spilled 112 bytes at head_dim 256
_WIDE_HEAD_DROPOUT_CANDIDATES = {**_WIDE_HEAD_CANDIDATES, "dq": ((32, 32, 4, 2),)}
#: (kind, BLOCK_D, dropout) -> configs the sm_90 compiles showed spilling although the estimate lets them
#: through (Triton 3.9): with dropout at head_dim 128 the forward's 128x64 w8 s3 spilled 24 bytes and 64x64 w4
#: s3 40 without padding and GQA (none with both; none under Triton 3.6), and 64x64 w8 s2 sat at 244 registers:
#: 128x32 w8 s2 (178-202) is the default there, and at head_dim 64 too (128x64 w8 s3 spilled 48 bytes with
#: padding+dropout+GQA). dQ at head_dim 128: 64x64 w4 s3 spilled 48 bytes with padding, 64x64 w8 s2 48 with
#: padding+dropout. dK/dV at head_dim 96/128: every 64-key tile spilled in some variant (32x128 w8 24-224 bytes,
#: 32x64 w8 72-96 with soft-capping+window or padding="skip", 32x64 w4 s3 248, 16x64 w4 48-128), so the 32-key
#: tiles (``mma.sync``; 157-174 registers with dropout or a band; in the plain variants 16x32 w8 s2, 128-170
#: registers under both Triton 3.6 and 3.9). Keyed (kind, BLOCK_D,
#: dropout, banded), banded = soft-capping, a window, causal or padding="skip".
_FWD_DROPOUT_SPILLS = {(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2)}
_DKDV_64_KEYS = {(32, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 3), (16, 64, 4, 2), (16, 64, 8, 2), (32, 32, 4, 2)}
_MEASURED_SPILLS = {
    **{("fwd", d, True, banded): _FWD_DROPOUT_SPILLS for d in (64, 128) for banded in (False, True)},
    # soft-capping + window: 128x64 w8 s3 spilled 64 bytes under Triton 3.6; 128x32 w8 s2: 250 registers
    ("fwd", 128, False, True): _FWD_DROPOUT_SPILLS,
    **{("dq", 128, False, banded): {(64, 64, 4, 3)} for banded in (False, True)},
    **{("dq", 128, True, banded): {(64, 64, 4, 3), (64, 64, 8, 2)} for banded in (False, True)},
    # 32x64 w8 s2 spilled 8 bytes with varlen+GQA under Triton 3.6, 32x32 w8 s2 16-24 with GQA under 3.9
    ("dkdv", 128, False, False): _DKDV_64_KEYS | {(32, 32, 8, 2)},
    ("dkdv", 128, False, True): _DKDV_64_KEYS,
    ("dkdv", 128, True, False): _DKDV_64_KEYS,
    ("dkdv", 128, True, True): _DKDV_64_KEYS,
}
#: dropout="philox4x" in place of the dropout lines above, keyed (kind, BLOCK_D, banded): its own sm_90 compiles
#: (Triton 3.9, bf16, plain and padding+dropout+GQA, every config the estimate keeps): the RNG state is 16x
#: smaller, and the forward's 64x64 w4 s3 and 64x64 w8 s2 that spill with the default RNG do not (hd 128: 242-246
#: and 182-211 registers), nor at hd 64 128x64 w8 s3 (207-210), so there its forward keeps the order of the list;
#: at hd 128 128x64 w8 s3 spilled 24 bytes in the plain variant (250 registers, none, with padding+GQA). Those
#: above the estimate's line spilled (hd 64: 128x128 w8 40 bytes, 128x64 w4 64). dQ at hd 128: 32x32 w4 s2 spilled
#: 8 bytes (64x64 w8 s2: 242 registers, none); dK/dV at hd 128: 16x64 w4 s2 136 bytes (16x64 w8 s2: 234, none)
#: and 16x32 w8 s2 24 bytes at 128 registers with padding+GQA (a local copy for the mask's reshape, not register
#: pressure), so it keeps only the default RNG's first 32-key tile, 32x32 w8 s2 (164-166 registers); nothing else
#: spilled at hd 64. Banded (not compiled with philox4x): the default RNG's lines.
_PHILOX4X_SPILLS = {
    ("fwd", 128, False): {(128, 64, 8, 3)},
    **{("fwd", d, True): _FWD_DROPOUT_SPILLS for d in (64, 128)},
    ("dq", 128, False): {(32, 32, 4, 2)},
    ("dq", 128, True): {(64, 64, 4, 3), (64, 64, 8, 2), (32, 32, 4, 2)},
    ("dkdv", 128, False): _DKDV_64_KEYS | {(16, 32, 8, 2)},
    ("dkdv", 128, True): _DKDV_64_KEYS | {(16, 32, 8, 2)},
}
#: at most this many configs per kernel and head_dim are autotuned (in the order above: expected fastest first),
#: to bound compile time
_MAX_TUNED = 5
# The interpreter runs one small config; different M and N tiles there catch index mistakes.
_INTERPRETER_CONFIG = {"fwd": (32, 16, 4, 1), "dq": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1), "fwd_tma": (32, 16, 4, 1),
                       "dkdv_wg64": (32, 16, 4, 1)}


def _make_configs(kind: str, candidates) -> list:
    if kind in _FP32_CANDIDATES:
        extra = _FP32_CANDIDATES[kind] + _WIDE_HEAD_CANDIDATES[kind] + _WIDE_HEAD_DROPOUT_CANDIDATES[kind]
        candidates = tuple(candidates) + tuple(dict.fromkeys(c for c in extra if c not in candidates))
    if _INTERPRET:
        candidates = (_INTERPRETER_CONFIG[kind],)
    hook = _tma_pre_hook if kind == "fwd_tma" else None
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages, pre_hook=hook)
        for m, n, warps, stages in candidates
    ]


def _tma_pre_hook(nargs):
    """The TMA forward's tile shapes: its descriptors are made for the config that runs (autotuner hook)."""
    nargs["desc_q"].block_shape = [nargs["BLOCK_M"], nargs["HEAD_DIM"]]
    for name in ("desc_k", "desc_v"):
        nargs[name].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]


_CANDIDATES = {"fwd": _FWD_CANDIDATES, "dq": _DQ_CANDIDATES, "dkdv": _DKDV_CANDIDATES, "fwd_tma": _TMA_FWD_CANDIDATES,
               "dkdv_wg64": _DKDV_WG64_CANDIDATES}


def _register_estimate(kind: str, block_m: int, block_n: int, block_d: int, num_warps: int,
                       has_dropout: bool = False, philox4x: bool = False) -> float:
    """32-bit registers per thread held by the resident tiles and the fp32 score tiles (16-bit inputs): a rough
    model, calibrated on sm_90 compiles (docs/PERF.md). In dK/dV, warps beyond one per 16 keys add no capacity:
    ``wgmma`` gives each warp 16 rows and Triton replicates the rest (32x64 with 8 warps took 230-255 registers
    at head_dim 128, like a 4-warp tile). Dropout holds the Philox state and the
    keep-mask beside the scores (one more score tile; two in dK/dV, which applies it to P^T and dP^T): the
    forward's 128x128 w8 and 128x64 w4 spilled with it at head_dim 64, dK/dV 32x64 w8 at head_dim 96/128.
    ``philox4x`` (dropout="philox4x") holds a 16x smaller Philox state but the same keep-mask tile: the same
    estimate, which its sm_90 compiles bear out (the configs above its line spill, those under it do not;
    ``_PHILOX4X_SPILLS``); the parameter is there so that a calibration can change that."""
    warps = min(num_warps, max(4, block_n // 16)) if kind == "dkdv" else num_warps
    threads_words = warps * 32 * 4  # bytes per "register across the CTA"
    if kind == "fwd":  # q (16-bit) + fp32 accumulator; scores and probabilities
        resident, scores = block_m * block_d * (2 + 4), 2 * block_m * block_n * 4
    elif kind == "dq":  # q, dO (16-bit) + fp32 dQ; P, dP, dS
        resident, scores = block_m * block_d * (2 + 2 + 4), 3 * block_m * block_n * 4
    else:  # k, v (16-bit) + fp32 dK, dV; P^T, dP^T, dS^T and the cast copies
        resident, scores = block_n * block_d * (2 * 2 + 2 * 4), 4 * block_m * block_n * 4
    if has_dropout:
        scores += (2 if kind == "dkdv" else 1) * block_m * block_n * 4
    return (resident + scores) / threads_words


#: spill lines of the estimate above (per kind), from the sm_90 compiles: highest estimate seen without spills
_REGISTER_LIMIT = {"fwd": 224, "dq": 224, "dkdv": 256}


def candidate_configs(kind: str, block_d: int, dot_precision: str, *, group: int = 1, has_dropout: bool = False,
                      has_padding: bool = False, is_varlen: bool = False, banded: bool = False,
                      philox4x: bool = False) -> list[tuple[int, int, int, int]]:
    """The ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates of ``kind`` that fit: shared memory for one
    resident tile plus ``num_stages`` streamed pairs of tiles under 200 KB, and a register estimate under the
    spill line; at most ``_MAX_TUNED``, in the order of the candidate list (so the first is the default), never
    none (else the smallest register footprint). fp32 ("ieee") and head_dim 256 have their own lists. The sm_90
    compile gate (tests/test_sm90_compile.py) compiles what this returns. ``banded``: soft-capping, a window,
    causal or padding="skip" (more registers in dK/dV). ``philox4x``: dropout="philox4x" (its key tiles must be
    multiples of 16 keys: every candidate's are). ``group``, ``has_padding`` and ``is_varlen`` are accepted so
    that a calibration can use them; no spill line measured so far depends on them alone."""
    philox4x = philox4x and has_dropout
    if kind == "dkdv_wg64":  # 16-bit; the sm_90 compiles' verdict, possibly none (then the variant falls back)
        if dot_precision == "ieee":  # FMA matmuls: no wgmma to shape the tiles for
            return []
        plain = group == 1 and not has_padding and not is_varlen
        return list(_DKDV_WG64_FITS.get((max(block_d, 64), has_dropout, banded, plain), ()))
    if kind == "fwd_tma":  # 16-bit, head_dim 64/128, no dropout: the variant falls back to the default elsewhere
        block_d = min(block_d, 128)
    elif dot_precision == "ieee":
        return list(_FP32_CANDIDATES[kind])
    elif block_d >= 256:
        return list((_WIDE_HEAD_DROPOUT_CANDIDATES if has_dropout else _WIDE_HEAD_CANDIDATES)[kind])
    candidates = _CANDIDATES[kind]

    def regs(config):
        block_m, block_n, warps, _ = config
        return _register_estimate("fwd" if kind == "fwd_tma" else kind, block_m, block_n, block_d, warps, has_dropout,
                                  philox4x)

    def fits(config):
        block_m, block_n, _, stages = config
        resident, streamed = (block_n, block_m) if kind == "dkdv" else (block_m, block_n)
        smem = (resident * block_d + max(stages, 1) * 2 * streamed * block_d) * 2
        return smem <= 200 * 1024 and regs(config) <= _REGISTER_LIMIT["fwd" if kind == "fwd_tma" else kind]

    if philox4x:
        spilled = _PHILOX4X_SPILLS.get((kind, block_d, banded), ())
    else:
        spilled = _MEASURED_SPILLS.get((kind, block_d, has_dropout, banded), ())
    kept = [config for config in candidates if fits(config) and config not in spilled]
    return kept[:_MAX_TUNED] if kept else [min(candidates, key=regs)]


def _fitting_configs(kind: str, configs, block_d: int, dot_precision: str, **flags) -> list:
    """The autotuner's ``configs`` that :func:`candidate_configs` keeps (``flags``: its keyword arguments)."""
    if _INTERPRET:  # one interpreter config (the variant's own, where a kernel has several), whatever fits on a GPU
        shape = _INTERPRETER_CONFIG[kind]
        own = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == shape]
        return (own or list(configs))[:1]
    by_shape = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
    kept = candidate_configs(kind, block_d, dot_precision, **flags)
    return [by_shape[shape] for shape in kept if shape in by_shape]


#: the flags that make a kernel "banded" for the pruning (more registers in dK/dV)
BANDED_FLAGS = ("SOFTCAP", "WINDOWED", "CAUSAL", "PAD_SKIP")
#: every constexpr of the autotuned kernels (tile sizes aside) is read by the pruning or on record here with the
#: reason it does not change which configs fit (tests/test_attention_kernel.py checks that the two cover them)
PRUNE_READS = (
    "BLOCK_D", "DOT_PRECISION", "GROUP", "HAS_DROPOUT", "HAS_PADDING", "IS_VARLEN", "PHILOX4X", "WG64",
) + BANDED_FLAGS
PRUNE_IGNORES = {
    "HEAD_DIM": "BLOCK_D, its power of two, sizes every tile",
    "STORE_LSE": "one row store after the key loop; the sm_90 gate compiles defaults with it and without",
    "WARP_SPECIALIZE": "always on where the tma_ws forward runs",
}


def _prune(kind: str):
    """Autotuner hook: the fitting configs, or only the first with ``LLM2VEC_FAST_AUTOTUNE=0``."""

    def prune(configs, named_args, **kwargs):
        named = {**named_args, **kwargs}
        kept = _fitting_configs(
            "dkdv_wg64" if kind == "dkdv" and named.get("WG64", False) else kind, configs,
            named.get("BLOCK_D", 128), named.get("DOT_PRECISION", "tf32"),
            group=int(named.get("GROUP", 1)), has_dropout=bool(named.get("HAS_DROPOUT", False)),
            has_padding=bool(named.get("HAS_PADDING", False)), is_varlen=bool(named.get("IS_VARLEN", False)),
            banded=any(bool(named.get(flag, False)) for flag in BANDED_FLAGS),
            philox4x=bool(named.get("PHILOX4X", False)),
        )
        return kept if _AUTOTUNE else kept[:1]

    return prune


_FORCED_CONFIGS: dict = {}


@contextlib.contextmanager
def forced_configs(**configs):
    """Run the kernels named ``fwd``, ``dq``, ``dkdv`` with the given ``triton.Config`` instead of the autotuned
    one (tests: every candidate config must be correct, not only the one the autotuner picks here)."""
    unknown = set(configs) - {"fwd", "dq", "dkdv", "fwd_tma"}
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; expected fwd, dq, dkdv (either variant), fwd_tma")
    previous = dict(_FORCED_CONFIGS)
    _FORCED_CONFIGS.update(configs)
    try:
        yield
    finally:
        _FORCED_CONFIGS.clear()
        _FORCED_CONFIGS.update(previous)


def _launch(kernel, kind: str, grid, *args, **kwargs):
    """Launch ``kernel`` (an autotuner) with the forced config of ``kind`` if any, else with the only config the
    pruning keeps (Triton before 3.8 benchmarks even a single pruned config), else autotuned. Every constexpr
    the pruning reads is passed by keyword."""
    config = _FORCED_CONFIGS.get(kind)
    if config is None:
        kept = _prune(kind)(kernel.configs, {}, **kwargs)
        if len(kept) != 1:
            return kernel[grid](*args, **kwargs)
        config = kept[0]
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(kernel.fn.arg_names, args)), **kwargs, **config.kwargs})
    return kernel.fn[grid](
        *args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
    )


_AUTOTUNE_KEY = ["BLOCK_D", "SEQ_BUCKET", "IS_VARLEN", "HAS_PADDING", "HAS_DROPOUT", "GROUP", "DOT_PRECISION"]
# The band and soft-cap specializations change the work per tile: tuned apart (the window itself is not a key);
# so does the dropout RNG (the tma_ws forward has no dropout).
_AUTOTUNE_KEY_BAND = _AUTOTUNE_KEY + ["CAUSAL", "WINDOWED", "SOFTCAP", "PHILOX4X"]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(seed, bh, q_idx, k_idx, dropout_p):
    """Keep-mask of a tile: Philox counter (key index, query index, batch*heads+head, 0) under ``seed``.
    ``q_idx`` and ``k_idx`` are int32 tiles of the same shape; the same element always gets the same number,
    whatever the tile shape, so forward, both backward kernels and the test helper agree."""
    zero = q_idx * 0
    r, _, _, _ = tl.philox(seed, k_idx, q_idx, zero + bh, zero)
    return tl.random.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _dropout_keep16(seed, bh, q_idx, k_idx, dropout_p):
    """Keep-mask ``[len(q_idx), len(k_idx)]`` of ``dropout="philox4x"``: one Philox call per query and 16 keys
    (counter ``(key // 16, query, batch*heads+head, 1)`` under ``seed``) gives four 32-bit words, 16 bytes; the
    byte of key ``k`` is byte ``k % 4`` (from the least significant) of word ``(k % 16) // 4``, and the key is
    kept iff that byte is at least ``256 * dropout_p`` (``dropout_p`` a multiple of 1/256, see
    ``effective_dropout_p``). ``q_idx`` and ``k_idx`` are 1-D int32; ``k_idx`` runs over whole groups of 16 keys
    (a tile's keys from a multiple of 16), so every element gets the same decision whatever the tile shape."""
    BLOCK_Q: tl.constexpr = q_idx.shape[0]
    BLOCK_K: tl.constexpr = k_idx.shape[0]
    tl.static_assert(BLOCK_K % 16 == 0, "dropout=philox4x needs key tiles of a multiple of 16 keys")
    GROUPS: tl.constexpr = BLOCK_K // 16
    group = tl.min(tl.reshape(k_idx, [GROUPS, 16]), 1) // 16  # [GROUPS]: key // 16 of each group of 16 keys
    c0 = group[None, :] + q_idx[:, None] * 0
    c1 = q_idx[:, None] + group[None, :] * 0
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + bh, zero + 1)
    # [Q, G, 2, 2] holds word 2 * x + y at [..., x, y]: flattened, the words in order 0..3
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_Q, GROUPS, 4])
    shifts = (tl.arange(0, 4) * 8).to(tl.uint32)
    octets = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xFF  # [Q, G, word, byte]
    # a [1, 1] tensor: the interpreter passes dropout_p as a Python float, which has no .to()
    threshold = (tl.zeros([1, 1], dtype=tl.float32) + (dropout_p * 256.0 + 0.5)).to(tl.int32)
    return tl.reshape(octets.to(tl.int32), [BLOCK_Q, BLOCK_K]) >= threshold


@triton.jit
def _dropout_keep_tile(seed, bh, offs_m, offs_n, dropout_p, PHILOX4X: tl.constexpr):
    """The (queries x keys) keep-mask of the query offsets ``offs_m`` and key offsets ``offs_n``, drawn by the
    dropout variant in use (``PHILOX4X``: 16 decisions per Philox call)."""
    if PHILOX4X:
        keep = _dropout_keep16(seed, bh, offs_m, offs_n, dropout_p)
    else:
        q_idx = offs_m[:, None] + offs_n[None, :] * 0
        k_idx = offs_n[None, :] + offs_m[:, None] * 0
        keep = _dropout_keep(seed, bh, q_idx, k_idx, dropout_p)
    return keep


@triton.jit
def _tanh(x):
    """tanh through exp2 of a non-positive argument (no overflow; every backend and the interpreter have exp2);
    absolute error ~1e-7, which is what the soft-capped logits need."""
    e = tl.math.exp2(tl.abs(x) * (-2.0 * 1.4426950408889634))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softcap(qk, cap_in, cap_out):
    """Soft-capped unscaled scores and the tanh (for the backward): ``cap_out * tanh(qk * cap_in)`` with
    ``cap_in = scale / softcap`` and ``cap_out = softcap / scale``, so that multiplying by the softmax scale
    afterwards gives ``softcap * tanh(qk * scale / softcap)``, as Gemma-2 does."""
    t = _tanh(qk * cap_in)
    return t * cap_out, t


@triton.jit
def _visible(q_idx, k_idx, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Band mask of a tile (broadcastable int32 index tiles): causal ``k <= q``, window ``|q - k| < window``
    (causal and window: ``q - window < k <= q``)."""
    diff = q_idx - k_idx
    if CAUSAL:
        ok = diff >= 0
        if WINDOWED:
            ok = ok & (diff < window)
    else:
        ok = (diff < window) & (diff > -window)
    return ok


@triton.jit
def _program_tile(max_seqlen, num_heads, BLOCK: tl.constexpr):
    """This program's tile, programs ordered tile-fastest: the first row of its ``BLOCK``-row tile, its
    ``batch * num_heads + head``, its batch and its head (kv head in dK/dV)."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(max_seqlen, BLOCK)
    bh = pid // num_blocks
    return (pid % num_blocks) * BLOCK, bh, bh // num_heads, bh % num_heads


@triton.jit
def _mask_keys(
    x, fill, offs_m, offs_n, kpm_base, stride_ms, seqlen, first, end, holes, window,
    HAS_PADDING: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    PAD_SKIP: tl.constexpr,
):
    """``x`` (a query x key tile: the forward's scores, dQ's probabilities) with ``fill`` where the key is
    padding (the mask ``kpm_base``; with ``PAD_SKIP`` only in rows with holes, the range check masking the rest)
    and, in a ``MASKED`` tile, where it lies past ``end``, before ``first`` (``PAD_SKIP``) or outside the band."""
    if HAS_PADDING:
        if PAD_SKIP:
            if holes:
                key_ok = tl.load(kpm_base + offs_n * stride_ms, mask=offs_n < seqlen, other=0)
                x = tl.where(key_ok[None, :] != 0, x, fill)
        else:
            if MASKED:
                key_ok = tl.load(kpm_base + offs_n * stride_ms, mask=offs_n < seqlen, other=0)
            else:
                key_ok = tl.load(kpm_base + offs_n * stride_ms)
            x = tl.where(key_ok[None, :] != 0, x, fill)
    if MASKED:
        ok = offs_n[None, :] < end
        if PAD_SKIP:
            ok = ok & (offs_n[None, :] >= first)
        if CAUSAL or WINDOWED:
            ok = ok & _visible(offs_m[:, None], offs_n[None, :], window, CAUSAL, WINDOWED)
        x = tl.where(ok, x, fill)
    return x


@triton.jit
def _real_range(RANGES, b, seqlen, PAD_SKIP: tl.constexpr):
    """Row ``b``'s real tokens ``[first, end)`` and whether padding lies between them (``PAD_SKIP``: from the
    host's ``_real_token_ranges``); otherwise the whole sequence and no holes."""
    if PAD_SKIP:
        first = tl.load(RANGES + 3 * b)
        end = tl.load(RANGES + 3 * b + 1)
        holes = tl.load(RANGES + 3 * b + 2) != 0
    else:
        first = seqlen * 0
        end = seqlen
        holes = seqlen < 0
    return first, end, holes


@triton.jit
def _sequence(CU_SEQLENS, b, seqlen_padded, IS_VARLEN: tl.constexpr):
    """Sequence ``b``'s first row (int64) and its length: from ``cu_seqlens`` when packed (``IS_VARLEN``);
    otherwise row 0 of batch ``b`` (the batch stride finds it) and the padded length."""
    if IS_VARLEN:
        row0 = tl.load(CU_SEQLENS + b).to(tl.int64)
        seqlen = (tl.load(CU_SEQLENS + b + 1) - tl.load(CU_SEQLENS + b)).to(tl.int32)
    else:
        row0 = b.to(tl.int64) * 0
        seqlen = seqlen_padded
    return row0, seqlen


@triton.jit
def _dropout_seed(SEED, HAS_DROPOUT: tl.constexpr):
    """The dropout seed, read on the device (``draw_dropout_seed``: no host sync); 0, unused, without dropout."""
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    return seed


@triton.jit
def _head_base(X, b64, row0, head, stride_b, stride_s, stride_h):
    """Where ``head``'s rows of sequence ``b64`` (starting at row ``row0`` when packed) start in ``X``."""
    return X + b64 * stride_b + row0 * stride_s + head * stride_h


@triton.jit
def _load_tile(ptrs, rows_in, d_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """A tile of K/V (or Q/dO) inside a key (query) loop: in a ``MASKED`` tile only the rows that exist
    (``rows_in``, a column) and the ``HEAD_DIM`` columns; in a full tile the columns only where ``BLOCK_D``
    pads ``HEAD_DIM``, else no mask at all. Zeros where masked."""
    if MASKED:
        x = tl.load(ptrs, mask=rows_in & d_mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        x = tl.load(ptrs, mask=d_mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _band_tiles(
    start, first, end, window,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    KEYS_OUTER: tl.constexpr, PAD_SKIP: tl.constexpr,
):
    """Loop bounds of the inner tiles for the outer tile ``[start, start + BLOCK_OUT)`` (queries, or keys when
    ``KEYS_OUTER``): masked inner tiles ``[a, b)``, full tiles ``[b, c)`` that need no mask at all, masked tiles
    ``[c, d)``. Tiles outside ``[a, d)`` see nothing (above the diagonal, outside the window) and are never
    visited. ``[first, end)`` are the inner positions that exist: the sequence, or with ``PAD_SKIP`` the real
    tokens of the row (padding before and after them is never visited). Without causal/window/skip: ``[0, 0)``,
    every full tile, then the tail tile past the last full one."""
    lo = first  # visible inner range [lo, hi)
    hi = end
    full_lo = first  # inner positions visible from every outer position of the tile: [full_lo, full_hi)
    full_hi = end
    if WINDOWED:
        lo = tl.maximum(start - window + 1, first)
        hi = tl.minimum(start + BLOCK_OUT + window - 1, end)
        full_lo = tl.maximum(start + BLOCK_OUT - window, first)
        full_hi = tl.minimum(start + window, end)
    if CAUSAL:
        if KEYS_OUTER:  # inner = queries i >= key j
            lo = tl.maximum(lo, start)
            full_lo = tl.maximum(full_lo, start + BLOCK_OUT - 1)
        else:  # inner = keys j <= query i
            hi = tl.minimum(hi, start + BLOCK_OUT)
            full_hi = tl.minimum(full_hi, start + 1)
    d = tl.cdiv(hi, BLOCK_IN) * BLOCK_IN
    c = (full_hi // BLOCK_IN) * BLOCK_IN
    if (CAUSAL or WINDOWED) or PAD_SKIP:
        a = (lo // BLOCK_IN) * BLOCK_IN
        b = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_IN) * BLOCK_IN, a), d)
        c = tl.minimum(tl.maximum(c, b), d)
    else:
        a = 0
        b = 0
    return a, b, c, d


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, stride_ms,
    offs_m, offs_d, lo, hi, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, window, cap_in, cap_out,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    PAD_SKIP: tl.constexpr, PHILOX4X: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        keys_in = offs_n[:, None] < seqlen
        k = _load_tile(k_ptrs, keys_in, d_mask, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # unscaled; the scale goes into one FMA below
        if SOFTCAP:
            qk, _ = _softcap(qk, cap_in, cap_out)
        # finite: a tile whose keys are all padding keeps the running max finite, and a row may see no key of
        # a band tile (its own key, always visible, clears that later)
        qk = _mask_keys(qk, -1.0e30, offs_m, offs_n, kpm_base, stride_ms, seqlen, first, end, holes, window,
                        HAS_PADDING, MASKED, CAUSAL, WINDOWED, PAD_SKIP)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: max and scale commute
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep_tile(seed, bh, offs_m, offs_n, dropout_p, PHILOX4X)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_ptrs, keys_in, d_mask, HEAD_DIM, BLOCK_D, MASKED)  # late: V's registers live shortest
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=_make_configs("fwd", _FWD_CANDIDATES), key=_AUTOTUNE_KEY_BAND, prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, CU_SEQLENS, RANGES, SEED,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_mb, stride_ms,
    seqlen_padded, num_heads, max_seqlen, qk_scale, dropout_p, inv_keep, window, cap_in, cap_out, SEQ_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    PAD_SKIP: tl.constexpr, PHILOX4X: tl.constexpr,
):
    start_m, bh, b, h = _program_tile(max_seqlen, num_heads, BLOCK_M)
    kvh = h // GROUP
    row0, seqlen = _sequence(CU_SEQLENS, b, seqlen_padded, IS_VARLEN)
    if start_m >= seqlen:
        return
    first, end, holes = _real_range(RANGES, b, seqlen, PAD_SKIP)
    b64 = b.to(tl.int64)
    q_base = _head_base(Q, b64, row0, h, stride_qb, stride_qs, stride_qh)
    k_base = _head_base(K, b64, row0, kvh, stride_kb, stride_ks, stride_kh)
    v_base = _head_base(V, b64, row0, kvh, stride_vb, stride_vs, stride_vh)
    o_base = _head_base(O, b64, row0, h, stride_ob, stride_os, stride_oh)
    kpm_base = KPM + b64 * stride_mb
    seed = _dropout_seed(SEED, HAS_DROPOUT)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < seqlen
    io_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    if PAD_SKIP:
        if (start_m + BLOCK_M <= first) | (start_m >= end):  # a tile of padded rows: zeros, nothing computed
            tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :],
                     tl.zeros([BLOCK_M, BLOCK_D], dtype=O.dtype.element_ty), mask=io_mask)
            if STORE_LSE:
                tl.store(LSE + b64 * stride_lb + h * stride_lh + row0 + offs_m,
                         tl.full([BLOCK_M], float("inf"), dtype=tl.float32), mask=row_mask)
            return
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    a, b_full, c_full, d = _band_tiles(start_m, first, end, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED, False, PAD_SKIP)
    if (CAUSAL or WINDOWED) or PAD_SKIP:  # the leading masked tiles (without a band or a skip there are none)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_ks, stride_vs, stride_ms,
            offs_m, offs_d, a, b_full, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, window, cap_in, cap_out,
            BLOCK_N, HEAD_DIM, BLOCK_D, HAS_PADDING, HAS_DROPOUT, True, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X,
        )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_ks, stride_vs, stride_ms,
        offs_m, offs_d, b_full, c_full, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, window, cap_in, cap_out,
        BLOCK_N, HEAD_DIM, BLOCK_D, HAS_PADDING, HAS_DROPOUT, False, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_ks, stride_vs, stride_ms,
        offs_m, offs_d, c_full, d, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, window, cap_in, cap_out,
        BLOCK_N, HEAD_DIM, BLOCK_D, HAS_PADDING, HAS_DROPOUT, True, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X,
    )
    # l_i >= 1: the running maximum always contributes exp2(0)
    acc = acc * (1.0 / l_i)[:, None]
    if HAS_DROPOUT:
        acc = acc * inv_keep
    if HAS_PADDING:
        query_ok = tl.load(kpm_base + offs_m * stride_ms, mask=row_mask, other=0) != 0
        acc = tl.where(query_ok[:, None], acc, 0.0)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(O.dtype.element_ty), mask=io_mask)
    if STORE_LSE:
        lse = m_i + tl.math.log2(l_i)
        if HAS_PADDING:
            lse = tl.where(query_ok, lse, float("inf"))  # backward: padded rows get probability 0
        lse_base = LSE + b64 * stride_lb + h * stride_lh + row0
        tl.store(lse_base + offs_m, lse, mask=row_mask)


# The Hopper forward (``attention_variants(forward="tma_ws")``): K/V tiles loaded through tensor descriptors (TMA on
# sm_90: one bulk copy per tile, issued by a producer warp) in a warp-specialized loop, as in Triton's
# fused-attention tutorial; everything else as the default forward, so that it writes the same output and
# log-sum-exp and the backward kernels serve both.
@triton.jit
def _attn_fwd_tma_step(
    acc, l_i, m_i, q, desc_k, desc_v, k_row, k_col, v_row, v_col, offs_m, offs_n, kpm_base, stride_ms, seqlen,
    qk_scale,
    HAS_PADDING: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key tile of the online softmax. The descriptors read past a sequence's end into the next rows of
    the matrix (or zeros past its last row): ``MASKED`` masks those keys and zeros those value rows."""
    k = desc_k.load([k_row, k_col])
    qk = tl.dot(q, k.T, input_precision=DOT_PRECISION)
    qk = _mask_keys(qk, -1.0e30, offs_m, offs_n, kpm_base, stride_ms, seqlen, 0, seqlen, False, 0,
                    HAS_PADDING, MASKED, False, False, False)
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = desc_v.load([v_row, v_col])
    if MASKED:  # rows past the sequence may hold anything (0 * NaN is NaN)
        v = tl.where(offs_n[:, None] < seqlen, v, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_ij


@triton.autotune(configs=_make_configs("fwd_tma", _TMA_FWD_CANDIDATES), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune("fwd_tma")})
@triton.jit
def _attn_fwd_tma_kernel(
    desc_q, desc_k, desc_v, O, LSE, KPM, CU_SEQLENS,
    q_row_b, q_row_h, q_col_h, k_row_b, k_row_h, k_col_h, v_row_b, v_row_h, v_col_h,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_mb, stride_ms,
    seqlen_padded, num_heads, max_seqlen, qk_scale, SEQ_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """The forward for one query tile, batch and head, without dropout, band or soft-cap. Q, K and V are 2-D
    ``(rows, columns)`` matrices (``_tma_matrix``): head ``h`` of batch ``b`` starts at row ``b * row_b + h *
    row_h`` (plus its ``cu_seqlens`` offset when packed), column ``h * col_h`` (kv heads for K and V)."""
    tl.static_assert(HEAD_DIM == BLOCK_D)
    tl.static_assert(not HAS_DROPOUT)
    start_m, bh, b, h = _program_tile(max_seqlen, num_heads, BLOCK_M)
    kvh = h // GROUP
    if IS_VARLEN:
        row0 = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - row0
    else:
        row0 = b * 0
        seqlen = seqlen_padded
    if start_m >= seqlen:
        return
    b64 = b.to(tl.int64)
    o_base = O + b64 * stride_ob + row0.to(tl.int64) * stride_os + h * stride_oh
    kpm_base = KPM + b64 * stride_mb

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_mask = offs_m < seqlen
    q = desc_q.load([b * q_row_b + h * q_row_h + row0 + start_m, h * q_col_h])
    k_row = b * k_row_b + kvh * k_row_h + row0
    k_col = kvh * k_col_h
    v_row = b * v_row_b + kvh * v_row_h + row0
    v_col = kvh * v_col_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_tma_step(
            acc, l_i, m_i, q, desc_k, desc_v, k_row + start_n, k_col, v_row + start_n, v_col, offs_m,
            start_n + offs_n0, kpm_base, stride_ms, seqlen, qk_scale, HAS_PADDING, False, DOT_PRECISION,
        )
    if full < seqlen:  # the tail tile
        acc, l_i, m_i = _attn_fwd_tma_step(
            acc, l_i, m_i, q, desc_k, desc_v, k_row + full, k_col, v_row + full, v_col, offs_m, full + offs_n0,
            kpm_base, stride_ms, seqlen, qk_scale, HAS_PADDING, True, DOT_PRECISION,
        )
    acc = acc * (1.0 / l_i)[:, None]  # l_i >= 1: the running maximum always contributes exp2(0)
    if HAS_PADDING:
        query_ok = tl.load(kpm_base + offs_m * stride_ms, mask=row_mask, other=0) != 0
        acc = tl.where(query_ok[:, None], acc, 0.0)
    # a masked store, not a descriptor's: a query tile may end past its sequence, inside the next one
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_mask[:, None])
    if STORE_LSE:
        lse = m_i + tl.math.log2(l_i)
        if HAS_PADDING:
            lse = tl.where(query_ok, lse, float("inf"))
        tl.store(LSE + b64 * stride_lb + h * stride_lh + row0 + offs_m, lse, mask=row_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, stride_ms,
    offs_m, offs_d, lo, hi, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, inv_keep, window, cap_in, cap_out,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    PAD_SKIP: tl.constexpr, PHILOX4X: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        keys_in = offs_n[:, None] < seqlen
        k = _load_tile(k_ptrs, keys_in, d_mask, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_ptrs, keys_in, d_mask, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP:
            qk, t = _softcap(qk, cap_in, cap_out)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])  # padded query rows: lse = +inf, p = 0
        p = _mask_keys(p, 0.0, offs_m, offs_n, kpm_base, stride_ms, seqlen, first, end, holes, window,
                       HAS_PADDING, MASKED, CAUSAL, WINDOWED, PAD_SKIP)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep_tile(seed, bh, offs_m, offs_n, dropout_p, PHILOX4X)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # d softcap*tanh(x / softcap) / dx = 1 - tanh^2
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_make_configs("dq", _DQ_CANDIDATES), key=_AUTOTUNE_KEY_BAND, prune_configs_by={"early_config_prune": _prune("dq")})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, KPM, CU_SEQLENS, RANGES, SEED,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    stride_mb, stride_ms,
    seqlen_padded, num_heads, max_seqlen, qk_scale, sm_scale, dropout_p, inv_keep, window, cap_in, cap_out,
    SEQ_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    PAD_SKIP: tl.constexpr, PHILOX4X: tl.constexpr,
):
    """dQ for one query tile, and delta = rowsum(dO * O) of its rows (O and dO share strides)."""
    start_m, bh, b, h = _program_tile(max_seqlen, num_heads, BLOCK_M)
    kvh = h // GROUP
    row0, seqlen = _sequence(CU_SEQLENS, b, seqlen_padded, IS_VARLEN)
    if start_m >= seqlen:
        return
    first, end, holes = _real_range(RANGES, b, seqlen, PAD_SKIP)
    b64 = b.to(tl.int64)
    q_base = _head_base(Q, b64, row0, h, stride_qb, stride_qs, stride_qh)
    k_base = _head_base(K, b64, row0, kvh, stride_kb, stride_ks, stride_kh)
    v_base = _head_base(V, b64, row0, kvh, stride_vb, stride_vs, stride_vh)
    o_off = b64 * stride_ob + row0 * stride_os + h * stride_oh  # O and dO share strides
    dq_base = _head_base(DQ, b64, row0, h, stride_dqb, stride_dqs, stride_dqh)
    lse_off = b64 * stride_lb + h * stride_lh + row0
    kpm_base = KPM + b64 * stride_mb
    seed = _dropout_seed(SEED, HAS_DROPOUT)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < seqlen
    d_mask = offs_d[None, :] < HEAD_DIM
    io_mask = row_mask[:, None] & d_mask
    if PAD_SKIP:
        if (start_m + BLOCK_M <= first) | (start_m >= end):  # padded rows: dQ = 0 (delta is never read there)
            tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :],
                     tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty), mask=io_mask)
            return
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + o_off + offs_m[:, None] * stride_os + offs_d[None, :], mask=io_mask, other=0.0)
    o = tl.load(O + o_off + offs_m[:, None] * stride_os + offs_d[None, :], mask=io_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + lse_off + offs_m, delta, mask=row_mask)
    lse = tl.load(LSE + lse_off + offs_m, mask=row_mask, other=float("inf"))

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    a, b_full, c_full, d = _band_tiles(start_m, first, end, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED, False, PAD_SKIP)
    if (CAUSAL or WINDOWED) or PAD_SKIP:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, kpm_base, stride_ks, stride_vs, stride_ms,
            offs_m, offs_d, a, b_full, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, inv_keep, window, cap_in, cap_out,
            BLOCK_N, HEAD_DIM, BLOCK_D, HAS_PADDING, HAS_DROPOUT, True, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X,
        )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, kpm_base, stride_ks, stride_vs, stride_ms,
        offs_m, offs_d, b_full, c_full, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, inv_keep, window, cap_in, cap_out,
        BLOCK_N, HEAD_DIM, BLOCK_D, HAS_PADDING, HAS_DROPOUT, False, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, kpm_base, stride_ks, stride_vs, stride_ms,
        offs_m, offs_d, c_full, d, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, inv_keep, window, cap_in, cap_out,
        BLOCK_N, HEAD_DIM, BLOCK_D, HAS_PADDING, HAS_DROPOUT, True, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X,
    )
    dq = dq * sm_scale
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_os,
    offs_n, offs_d, lo, hi, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, inv_keep, window, cap_in, cap_out,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    PAD_SKIP: tl.constexpr, PHILOX4X: tl.constexpr, WG64: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M)
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_os + offs_d[None, :]
        row_in = offs_m < seqlen
        q = _load_tile(q_ptrs, row_in[:, None], d_mask, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_tile(do_ptrs, row_in[:, None], d_mask, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=row_in, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=row_in, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # transposed tiles (keys x queries): rows of dK/dV stay in registers
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if SOFTCAP:
            qk_t, t_t = _softcap(qk_t, cap_in, cap_out)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASKED:
            if CAUSAL or WINDOWED:  # rows beyond seqlen already have lse = +inf, so p = 0
                p_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], window, CAUSAL, WINDOWED), p_t, 0.0)
        if not WG64:
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            if PHILOX4X:  # keys x queries: the transposed (queries x keys) mask
                keep = tl.trans(_dropout_keep16(seed, bh, offs_m, offs_n, dropout_p))
            else:
                q_idx = offs_m[None, :] + offs_n[:, None] * 0
                k_idx = offs_n[:, None] + offs_m[None, :] * 0
                keep = _dropout_keep(seed, bh, q_idx, k_idx, dropout_p)
            dv = tl.dot(tl.where(keep, p_t * inv_keep, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if WG64:  # dV's matmul first: P^T's 16-bit copy is dead before dP^T's accumulator lives
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_make_configs("dkdv", _DKDV_CANDIDATES) + _make_configs("dkdv_wg64", _DKDV_WG64_CANDIDATES),
                 key=_AUTOTUNE_KEY_BAND + ["WG64"], prune_configs_by={"early_config_prune": _prune("dkdv")})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU_SEQLENS, RANGES, SEED,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    stride_mb, stride_ms,
    seqlen_padded, num_kv_heads, max_seqlen, qk_scale, sm_scale, dropout_p, inv_keep, window, cap_in, cap_out,
    SEQ_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    PAD_SKIP: tl.constexpr, PHILOX4X: tl.constexpr, WG64: tl.constexpr,
):
    """dK and dV for one key tile of one kv head, summed over the GROUP query heads that share it. ``WG64``: the
    ``dkdv="wg64"`` variant's configs (64 keys per warpgroup, 64 queries) and its order (dV's matmul before dP^T's)."""
    start_n, bkvh, b, kvh = _program_tile(max_seqlen, num_kv_heads, BLOCK_N)
    row0, seqlen = _sequence(CU_SEQLENS, b, seqlen_padded, IS_VARLEN)
    if start_n >= seqlen:
        return
    first, end, holes = _real_range(RANGES, b, seqlen, PAD_SKIP)
    b64 = b.to(tl.int64)
    seed = _dropout_seed(SEED, HAS_DROPOUT)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_in = offs_n < seqlen
    io_mask = key_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    if PAD_SKIP:
        if (start_n + BLOCK_N <= first) | (start_n >= end):  # padded keys: no query attends them
            zeros = tl.zeros([BLOCK_N, BLOCK_D], dtype=DK.dtype.element_ty)
            tl.store(_head_base(DK, b64, row0, kvh, stride_dkb, stride_dks, stride_dkh)
                     + offs_n[:, None] * stride_dks + offs_d[None, :], zeros, mask=io_mask)
            tl.store(_head_base(DV, b64, row0, kvh, stride_dvb, stride_dvs, stride_dvh)
                     + offs_n[:, None] * stride_dvs + offs_d[None, :], zeros, mask=io_mask)
            return
    k = tl.load(_head_base(K, b64, row0, kvh, stride_kb, stride_ks, stride_kh)
                + offs_n[:, None] * stride_ks + offs_d[None, :], mask=io_mask, other=0.0)
    v = tl.load(_head_base(V, b64, row0, kvh, stride_vb, stride_vs, stride_vh)
                + offs_n[:, None] * stride_vs + offs_d[None, :], mask=io_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    a, b_full, c_full, d = _band_tiles(start_n, first, end, window, BLOCK_N, BLOCK_M, CAUSAL, WINDOWED, True, PAD_SKIP)
    for g in range(GROUP):
        h = kvh * GROUP + g
        bh = b * (num_kv_heads * GROUP) + h
        q_base = _head_base(Q, b64, row0, h, stride_qb, stride_qs, stride_qh)
        do_base = _head_base(DO, b64, row0, h, stride_ob, stride_os, stride_oh)
        lse_off = b64 * stride_lb + h * stride_lh + row0
        if (CAUSAL or WINDOWED) or PAD_SKIP:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE + lse_off, DELTA + lse_off, stride_qs, stride_os,
                offs_n, offs_d, a, b_full, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, inv_keep, window, cap_in, cap_out,
                BLOCK_M, HEAD_DIM, BLOCK_D, HAS_DROPOUT, True, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X, WG64,
            )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + lse_off, DELTA + lse_off, stride_qs, stride_os,
            offs_n, offs_d, b_full, c_full, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, inv_keep, window, cap_in, cap_out,
            BLOCK_M, HEAD_DIM, BLOCK_D, HAS_DROPOUT, False, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X, WG64,
        )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + lse_off, DELTA + lse_off, stride_qs, stride_os,
            offs_n, offs_d, c_full, d, seqlen, first, end, holes, qk_scale, seed, bh, dropout_p, inv_keep, window, cap_in, cap_out,
            BLOCK_M, HEAD_DIM, BLOCK_D, HAS_DROPOUT, True, DOT_PRECISION, CAUSAL, WINDOWED, SOFTCAP, PAD_SKIP, PHILOX4X, WG64,
        )
    dk = dk * sm_scale
    if HAS_PADDING:  # a padded key is attended by no query: its gradients are zero
        key_ok = tl.load(KPM + b64 * stride_mb + offs_n * stride_ms, mask=key_in, other=0) != 0
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    tl.store(_head_base(DK, b64, row0, kvh, stride_dkb, stride_dks, stride_dkh)
             + offs_n[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=io_mask)
    tl.store(_head_base(DV, b64, row0, kvh, stride_dvb, stride_dvs, stride_dvh)
             + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=io_mask)


@triton.jit
def _dropout_mask_kernel(MASK, SEED, max_seqlen, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PHILOX4X: tl.constexpr):
    """Writes the keep-mask ``(batch, heads, max_seqlen, max_seqlen)`` the attention kernels use: tests only."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(SEED)
    base = MASK + bh.to(tl.int64) * max_seqlen * max_seqlen
    for start in range(0, max_seqlen, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if PHILOX4X:
            keep = _dropout_keep16(seed, bh, rows, cols, dropout_p)
        else:
            keep = _dropout_keep(seed, bh, rows[:, None] + cols[None, :] * 0, cols[None, :] + rows[:, None] * 0,
                                 dropout_p)
        in_bounds = (rows[:, None] < max_seqlen) & (cols[None, :] < max_seqlen)
        tl.store(base + rows[:, None] * max_seqlen + cols[None, :], keep.to(tl.int8), mask=in_bounds)


@triton.jit
def _zero_tail_kernel(X, CU_SEQLENS, batch, total, row_elems, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Zeros rows ``cu_seqlens[batch]..total`` of a contiguous ``(total, row_elems)`` tensor: the packed tokens
    past the last sequence, which no attention program writes. Programs below that row return at once."""
    row = tl.program_id(0) * BLOCK_T
    end = tl.load(CU_SEQLENS + batch)
    if row + BLOCK_T <= end:
        return
    rows = row + tl.arange(0, BLOCK_T)
    in_tail = (rows >= end) & (rows < total)
    base = X + rows.to(tl.int64)[:, None] * row_elems
    for start in range(0, row_elems, BLOCK_E):
        cols = start + tl.arange(0, BLOCK_E)
        tl.store(base + cols[None, :], tl.zeros([BLOCK_T, BLOCK_E], dtype=X.dtype.element_ty),
                 mask=in_tail[:, None] & (cols[None, :] < row_elems))


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------

#: Kernel design variants, by name; the first of each is the default (defaults change only on a GPU measurement).
#: padding: ``"mask"`` loads the key mask in every tile; ``"skip"`` visits only the tiles of each row's real tokens
#: (from ``first`` to ``last`` real token: tiles of only padding are skipped, query tiles of only padding just store
#: zeros) and masks only boundary tiles, unless the row has padding between real tokens; packed outputs are
#: allocated empty and only the tokens past ``cu_seqlens[-1]`` are zeroed.
#: forward: ``"default"`` is ``_attn_fwd_kernel``; ``"tma_ws"`` is the Hopper forward ``_attn_fwd_tma_kernel``
#: (tensor-descriptor loads, a warp-specialized key loop; Triton's fused-attention tutorial) for what it supports:
#: 16-bit inputs (fp32 too under the interpreter) at head_dim 64 or 128 on sm_90 or newer, padded or packed, with
#: padding masks and GQA, without dropout, soft-capping, a window, causal or padding="skip". Other calls run the
#: default forward, with one warning per reason. Both write the same log-sum-exp: one backward serves both.
#: dropout: ``"philox"`` draws one Philox call per (query, key) and uses its first 32-bit word; ``"philox4x"``
#: uses all 16 bytes of one call for 16 keys (``_dropout_keep16``, as FlashAttention-2's dropout.h), with an
#: 8-bit threshold: the dropout probability applied is ``effective_dropout_p(p)`` = round(256 p) / 256.
#: dkdv: ``"default"`` streams 16-32 query tiles past 32-128 keys (``_DKDV_CANDIDATES``); ``"wg64"`` gives each warpgroup
#: 64 keys and streams 64 queries (``_DKDV_WG64_CANDIDATES``: m64n64 ``wgmma`` on sm_90) for 16-bit inputs (fp32 too under
#: the interpreter) where its tiles fit registers (``_dkdv_wg64_unsupported``); other calls run the default dK/dV, with
#: one warning per reason. It is read when the backward runs.
VARIANTS = {
    "padding": ("mask", "skip"), "forward": ("default", "tma_ws"), "dropout": ("philox", "philox4x"),
    "dkdv": ("default", "wg64"),
}
_VARIANT = {name: choices[0] for name, choices in VARIANTS.items()}


@contextlib.contextmanager
def attention_variants(**choices):
    """Use the named kernel variants (see ``VARIANTS``) inside the block, e.g.
    ``with attention_variants(padding="skip"): ...``. The variants are read when each kernel launches: a backward
    run outside the block runs the default variants (keep it inside for ``dkdv``, which only the backward has)."""
    for name, choice in choices.items():
        if name not in VARIANTS:
            raise ValueError(f"unknown attention variant {name!r}; known: {sorted(VARIANTS)}")
        if choice not in VARIANTS[name]:
            raise ValueError(f"unknown {name} variant {choice!r}; choose from {list(VARIANTS[name])}")
    previous = dict(_VARIANT)
    _VARIANT.update(choices)
    try:
        yield
    finally:
        _VARIANT.clear()
        _VARIANT.update(previous)


#: dropout="philox4x": the most a quantized dropout probability may differ from the one asked for (relative)
PHILOX4X_MAX_ERROR = 0.1


def effective_dropout_p(dropout_p: float, variant: str | None = None) -> float:
    """The dropout probability the Triton kernels apply for ``dropout_p`` under the dropout ``variant`` (by
    default the one selected by :func:`attention_variants`): ``dropout_p`` itself with ``"philox"``; with
    ``"philox4x"``, whose keep-decisions compare one random byte with an 8-bit threshold, ``t / 256`` for
    ``t = round(256 * dropout_p)`` (kept values are scaled by ``256 / (256 - t)``, so the expectation stays
    exact). Raises ``ValueError`` for a ``dropout_p`` in (0, 1) that this moves by more than
    ``PHILOX4X_MAX_ERROR`` (10%) of itself (below about 0.02 unless near a multiple of 1/256)."""
    variant = _VARIANT["dropout"] if variant is None else variant
    if variant not in VARIANTS["dropout"]:
        raise ValueError(f"unknown dropout variant {variant!r}; choose from {list(VARIANTS['dropout'])}")
    if variant == "philox" or dropout_p == 0:
        return float(dropout_p)
    threshold = math.floor(float(dropout_p) * 256 + 0.5)
    effective = threshold / 256
    if not 0 < threshold < 256 or abs(effective - dropout_p) > PHILOX4X_MAX_ERROR * dropout_p:
        raise ValueError(
            f'dropout_p={dropout_p!r} cannot be applied by attention_variants(dropout="philox4x"): its 8-bit '
            f"threshold gives {threshold}/256 = {effective:.5g}, more than {PHILOX4X_MAX_ERROR:.0%} off; use a "
            'dropout_p within that of a multiple of 1/256, or the default dropout="philox"'
        )
    return effective


def _real_token_ranges(mask: torch.Tensor) -> torch.Tensor:
    """``(batch, 3)`` int32 on the mask's device, without a host sync: first real token, one past the last, and
    whether padding lies between them (then the kernels still read the mask inside that range). A row without
    real tokens gets ``[0, 0)``."""
    seq = mask.shape[1]
    any_real = mask.any(dim=1)
    as_int = mask.to(torch.int32)
    first = torch.where(any_real, as_int.argmax(dim=1), 0)
    end = torch.where(any_real, seq - as_int.flip(1).argmax(dim=1), 0)
    holes = as_int.sum(dim=1) != end - first
    return torch.stack([first, end, holes.to(end.dtype)], dim=1).to(torch.int32).contiguous()


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """The dropout seed, drawn from torch's RNG of ``device`` (a 1-element int64 tensor on ``device``, read by
    the kernels, so no host sync). Restoring torch's RNG state therefore replays the same dropout."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


class _Problem:
    """Validated shapes and the host-side arguments shared by the three kernels."""

    def __init__(
        self, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p,
        logit_softcap=None, window=None, causal=False, dropout_rng=0,
    ):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.total, self.heads, self.head_dim = q.shape
            self.kv_heads = k.shape[1]
            self.batch = cu_seqlens.shape[0] - 1
            self.seqlen = 0
            self.max_seqlen = int(max_seqlen)
        else:
            self.batch, self.seqlen, self.heads, self.head_dim = q.shape
            self.kv_heads = k.shape[2]
            self.max_seqlen = self.seqlen
        self.group = self.heads // self.kv_heads
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.sm_scale = float(softmax_scale) if softmax_scale is not None else self.head_dim**-0.5
        # dropout_rng: the index in VARIANTS["dropout"] of the forward's dropout variant (the backward gets it too)
        self.philox4x = VARIANTS["dropout"][dropout_rng] == "philox4x" and dropout_p > 0
        self.dropout_p = effective_dropout_p(float(dropout_p), VARIANTS["dropout"][dropout_rng])
        self.inv_keep = 1.0 / (1.0 - self.dropout_p)
        self.mask = key_padding_mask
        self.cu_seqlens = cu_seqlens
        self.dot_precision = _dot_precision(q.dtype)
        self.causal = bool(causal)
        self.window = int(window) if window is not None else 0
        self.softcap = float(logit_softcap) if logit_softcap is not None else None
        # the kernels cap the unscaled scores: cap_out * tanh(qk * cap_in), then scale (see _softcap)
        self.cap_in = self.sm_scale / self.softcap if self.softcap else 1.0
        self.cap_out = self.softcap / self.sm_scale if self.softcap else 1.0
        self.skip_padding = _VARIANT["padding"] == "skip"
        self.ranges = (
            _real_token_ranges(key_padding_mask) if self.skip_padding and key_padding_mask is not None else None
        )
        self.tma_forward = _VARIANT["forward"] == "tma_ws" and _supported(
            _tma_unsupported(self, q), _warned_tma,
            'attention forward="tma_ws" does not support %s: using the default forward')

    def ranges_arg(self, device) -> torch.Tensor:
        return self.ranges if self.ranges is not None else torch.empty(1, device=device, dtype=torch.int32)

    def new_output(self, like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor shaped as ``like`` for an output or gradient: empty where the kernels write every
        element; packed outputs are zeroed past ``cu_seqlens[-1]`` (by default the whole tensor, with the skip
        variant only that tail)."""
        if self.varlen and not self.skip_padding:
            return torch.zeros_like(like, memory_format=torch.contiguous_format)
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        if self.varlen and out.numel():
            row_elems = out[0].numel()
            block_t = 16
            with launch_device(out):
                _zero_tail_kernel[(triton.cdiv(out.shape[0], block_t),)](
                    out, self.cu_seqlens, self.batch, out.shape[0], row_elems,
                    BLOCK_T=block_t, BLOCK_E=min(1024, triton.next_power_of_2(row_elems)),
                )
        return out

    def band_args(self) -> tuple[int, float, float]:
        """The runtime window and soft-cap arguments every kernel takes after ``inv_keep``."""
        return self.window, self.cap_in, self.cap_out

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, token, head) strides; the batch stride is 0 for packed tensors."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        # padded: lse (batch, heads, seq); packed: lse (heads, total)
        return (lse.stride(0), lse.stride(1)) if not self.varlen else (0, lse.stride(0))

    def new_lse(self, device) -> torch.Tensor:
        if self.varlen:
            return torch.empty((self.heads, self.total), device=device, dtype=torch.float32)
        return torch.empty((self.batch, self.heads, self.seqlen), device=device, dtype=torch.float32)

    def mask_args(self, device):
        if self.mask is None:
            return torch.empty(1, device=device, dtype=torch.uint8), 0, 0
        mask = self.mask.view(torch.uint8)
        return mask, mask.stride(0), mask.stride(1)

    def cu_arg(self, device):
        return self.cu_seqlens if self.varlen else torch.empty(1, device=device, dtype=torch.int32)

    def constexprs(self):
        return dict(
            GROUP=self.group,
            HEAD_DIM=self.head_dim,
            BLOCK_D=self.block_d,
            IS_VARLEN=self.varlen,
            HAS_PADDING=self.mask is not None,
            HAS_DROPOUT=self.dropout_p > 0.0,
            DOT_PRECISION=self.dot_precision,
            CAUSAL=self.causal,
            WINDOWED=self.window > 0,
            SOFTCAP=self.softcap is not None,
            PAD_SKIP=self.ranges is not None,
            PHILOX4X=self.philox4x,
        )


_TMA_HEAD_DIMS = (64, 128)
_warned_tma: set = set()


def _tma_unsupported(problem: _Problem, q: torch.Tensor) -> str | None:
    """Why the ``tma_ws`` forward cannot run this call, or None."""
    if TensorDescriptor is None:
        return f"this Triton ({triton.__version__}) has no tensor descriptors"
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        return "tensor-memory-accelerator loads need compute capability 9.0 (Hopper) or newer"
    if q.dtype == torch.float32 and not _INTERPRET:
        return "fp32 inputs (the variant is for 16-bit tensor-core matmuls)"
    if q.numel() == 0:
        return "empty inputs"
    if problem.head_dim not in _TMA_HEAD_DIMS:
        return f"head_dim {problem.head_dim} (it supports {', '.join(map(str, _TMA_HEAD_DIMS))})"
    flags = [name for name, on in (("dropout", problem.dropout_p > 0), ("causal", problem.causal),
                                   ("window", problem.window > 0), ("logit_softcap", problem.softcap is not None),
                                   ('padding="skip"', problem.skip_padding and problem.mask is not None)) if on]
    if flags:
        return f"{', '.join(flags)} (not in this variant)"
    return None


def _supported(reason, warned: set, message: str) -> bool:
    """Whether ``reason`` (why a kernel or variant cannot run this call) is None; else ``message % reason`` is logged,
    once per reason (``warned``: those logged) and not while torch.compile traces (logging would break the graph)."""
    if reason is not None and reason not in warned and not torch.compiler.is_compiling():
        warned.add(reason)
        logger.warning(message, reason)
    return reason is None


def _tma_matrix(t: torch.Tensor, problem: _Problem, copied: bool = False):
    """``t`` (q, k or v) as a 2-D ``(rows, columns)`` matrix over its own storage, for a tensor descriptor, with
    the row and column steps of batch and head: ``(matrix, row_b, row_h, col_h)``. Tokens are rows; the heads of
    a token lie side by side in its row (``(batch, seq, heads, head_dim)`` contiguous) or are blocks of rows
    (``(batch, heads, seq, head_dim)`` memory seen through ``transpose(1, 2)``, as transformers' attention
    modules give it). Another layout, a stride or an address a descriptor cannot take (16-byte multiples) is
    copied first (a fresh contiguous tensor always fits)."""
    batch_stride, token, head = problem.strides(t)
    heads, head_dim = t.shape[-2], t.shape[-1]
    item = t.element_size()
    aligned = t.stride(-1) == 1 and (token * item) % 16 == 0 and t.data_ptr() % 16 == 0
    if aligned and batch_stride % token == 0 and head % token == 0:  # heads are blocks of rows
        row_b, row_h, col_h = batch_stride // token, head // token, 0
    elif aligned and batch_stride % token == 0 and (heads - 1) * head + head_dim <= token and (head * item) % 16 == 0:
        row_b, row_h, col_h = batch_stride // token, 0, head  # heads side by side in a row
    else:
        return _tma_matrix(t.clone(memory_format=torch.contiguous_format), problem, True) if not copied else None
    tokens = problem.total if problem.varlen else problem.seqlen
    rows = (problem.batch - 1) * row_b * (not problem.varlen) + (heads - 1) * row_h + tokens
    try:
        matrix = t.as_strided((rows, token), (token, 1))
    except RuntimeError:  # the last row would run past the storage (a view cut from a wider tensor)
        if copied:
            raise
        return _tma_matrix(t.clone(memory_format=torch.contiguous_format), problem, True)
    return matrix, row_b, row_h, col_h


def _attention_forward_tma(q, k, v, problem: _Problem, grid, o, lse, lse_strides, mask_args, store_lse: bool):
    """The ``tma_ws`` forward, launched by ``_attention_forward`` into its outputs ``o`` and ``lse``."""
    mask, stride_mb, stride_ms = mask_args
    matrices, steps = zip(*((m, s) for m, *s in (_tma_matrix(t, problem) for t in (q, k, v))))
    block = [16, problem.head_dim]  # the config's tile shapes are set by _tma_pre_hook
    descs = [TensorDescriptor(m, list(m.shape), list(m.stride()), list(block)) for m in matrices]
    constexprs = problem.constexprs()
    _launch(
        _attn_fwd_tma_kernel, "fwd_tma", grid,
        *descs, o, lse, mask, problem.cu_arg(q.device),
        *steps[0], *steps[1], *steps[2],
        *problem.strides(o), *lse_strides, stride_mb, stride_ms,
        problem.seqlen, problem.heads, problem.max_seqlen, problem.sm_scale * LOG2E, _seq_bucket(problem.max_seqlen),
        STORE_LSE=store_lse, WARP_SPECIALIZE=True,
        **{name: constexprs[name] for name in ("GROUP", "HEAD_DIM", "BLOCK_D", "IS_VARLEN", "HAS_PADDING",
                                               "HAS_DROPOUT", "DOT_PRECISION")},
    )


_warned_wg64: set = set()


def _dkdv_wg64_unsupported(problem: _Problem, q: torch.Tensor) -> str | None:
    """Why the ``wg64`` dK/dV cannot run this backward, or None: a pre-Hopper GPU or fp32 on a GPU (no ``wgmma`` to
    shape its tiles for), or no 64-key warpgroup tile that the sm_90 compiles of this Triton release showed
    fitting registers at this head_dim with these flags."""
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        return "pre-Hopper GPUs (its tiles are shaped for sm_90's wgmma; its register table is sm_90's)"
    if q.dtype == torch.float32 and not _INTERPRET:
        return "fp32 inputs (the variant is for 16-bit tensor-core matmuls)"
    flags = problem.constexprs()
    banded = any(flags[name] for name in BANDED_FLAGS)
    if not candidate_configs("dkdv_wg64", problem.block_d, "tf32", group=problem.group,
                             has_dropout=flags["HAS_DROPOUT"], has_padding=flags["HAS_PADDING"],
                             is_varlen=problem.varlen, banded=banded):
        what = [name for name, on in (("dropout", flags["HAS_DROPOUT"]), ("soft-cap, window, causal or padding=skip",
                                                                         banded)) if on]
        return (f"head_dim {problem.head_dim}{' with ' + ' and '.join(what) if what else ''} (every 64-key warpgroup "
                f"tile spilled registers there in the sm_90 compiles of Triton {triton.__version__})")
    return None


def _dkdv_wg64(problem: _Problem, q: torch.Tensor) -> bool:
    """Whether this backward runs the ``wg64`` dK/dV (the variant chosen and supported; else one warning per reason)."""
    return _VARIANT["dkdv"] == "wg64" and _supported(
        _dkdv_wg64_unsupported(problem, q), _warned_wg64,
        'attention dkdv="wg64" does not support %s: using the default dK/dV')


def _attention_forward(q, k, v, problem: _Problem, seed: torch.Tensor, store_lse: bool):
    o = problem.new_output(q)
    lse = problem.new_lse(q.device) if store_lse else torch.zeros(1, device=q.device, dtype=torch.float32)
    mask, stride_mb, stride_ms = problem.mask_args(q.device)
    lse_strides = problem.lse_strides(lse) if store_lse else (0, 0)
    heads, batch, max_seqlen = problem.heads, problem.batch, problem.max_seqlen
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    with launch_device(q):
        if problem.tma_forward:
            _attention_forward_tma(q, k, v, problem, grid, o, lse, lse_strides, (mask, stride_mb, stride_ms), store_lse)
            return o, lse
        _launch(
            _attn_fwd_kernel, "fwd", grid,
            q, k, v, o, lse, mask, problem.cu_arg(q.device), problem.ranges_arg(q.device), seed,
            *problem.strides(q), *problem.strides(k), *problem.strides(v), *problem.strides(o),
            *lse_strides, stride_mb, stride_ms,
            problem.seqlen, heads, max_seqlen, problem.sm_scale * LOG2E, problem.dropout_p, problem.inv_keep,
            *problem.band_args(), _seq_bucket(max_seqlen),
            STORE_LSE=store_lse, **problem.constexprs(),
        )
    return o, lse


def _attention_backward(do, q, k, v, o, lse, problem: _Problem, seed: torch.Tensor):
    do = do.contiguous()  # shares o's (contiguous) strides
    dq, dk, dv = problem.new_output(q), problem.new_output(k), problem.new_output(v)
    delta = torch.empty_like(lse)
    mask, stride_mb, stride_ms = problem.mask_args(q.device)
    cu, ranges = problem.cu_arg(q.device), problem.ranges_arg(q.device)
    heads, kv_heads, batch, max_seqlen = problem.heads, problem.kv_heads, problem.batch, problem.max_seqlen
    qk_scale = problem.sm_scale * LOG2E
    common_tail = (problem.dropout_p, problem.inv_keep, *problem.band_args(), _seq_bucket(max_seqlen))
    with launch_device(q):
        dq_grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
        _launch(
            _attn_bwd_dq_kernel, "dq", dq_grid,
            q, k, v, o, do, dq, lse, delta, mask, cu, ranges, seed,
            *problem.strides(q), *problem.strides(k), *problem.strides(v), *problem.strides(o),
            *problem.strides(dq), *problem.lse_strides(lse), stride_mb, stride_ms,
            problem.seqlen, heads, max_seqlen, qk_scale, problem.sm_scale, *common_tail,
            **problem.constexprs(),
        )
        dkdv_grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]) * batch * kv_heads,)  # noqa: E731
        _launch(
            _attn_bwd_dkdv_kernel, "dkdv", dkdv_grid,
            q, k, v, do, dk, dv, lse, delta, mask, cu, ranges, seed,
            *problem.strides(q), *problem.strides(k), *problem.strides(v), *problem.strides(do),
            *problem.strides(dk), *problem.strides(dv), *problem.lse_strides(lse), stride_mb, stride_ms,
            problem.seqlen, kv_heads, max_seqlen, qk_scale, problem.sm_scale, *common_tail,
            **problem.constexprs(), WG64=_dkdv_wg64(problem, q),
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# The attention as torch custom ops (torch.compile sees two opaque ops with fake impls and an autograd formula)
# ----------------------------------------------------------------------------------------------------------

# Flags travel as plain numbers: logit_softcap 0.0 = none, window 0 = none, max_seqlen 0 when padded.
_FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens, Tensor? seed, SymInt max_seqlen, "
    "float softmax_scale, float dropout_p, float logit_softcap, int window, bool causal, bool use_triton, "
    "bool store_lse, int dropout_rng=0) -> (Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? key_padding_mask, Tensor? cu_seqlens, "
    "Tensor? seed, SymInt max_seqlen, float softmax_scale, float dropout_p, float logit_softcap, int window, "
    "bool causal, bool use_triton, int dropout_rng=0) -> (Tensor, Tensor, Tensor)"
)


def _op_problem(q, k, v, key_padding_mask, cu_seqlens, seed, max_seqlen, softmax_scale, dropout_p, logit_softcap,
                window, causal, dropout_rng):
    """The Triton path's ``(q, k, v, problem, seed)`` from the ops' arguments: q, k, v with unit last-dim strides,
    the flags back from plain numbers, a placeholder seed without dropout."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    problem = _Problem(q, k, v, key_padding_mask, cu_seqlens, max_seqlen if cu_seqlens is not None else None,
                       softmax_scale, dropout_p, logit_softcap or None, window or None, causal, dropout_rng)
    return q, k, v, problem, seed if seed is not None else torch.empty(1, device=q.device, dtype=torch.int64)


@torch.library.custom_op("llm2vec_fast::attention_forward", mutates_args=(), schema=_FORWARD_SCHEMA)
def _attention_forward_op(q, k, v, key_padding_mask, cu_seqlens, seed, max_seqlen, softmax_scale, dropout_p,
                          logit_softcap, window, causal, use_triton, store_lse, dropout_rng=0):
    """``(out, lse)``: out contiguous, shaped as q; lse ``(batch, heads, seq)`` / ``(heads, total)`` fp32 when the
    Triton path, or the CPU path without dropout and soft-capping (ATen's CPU flash attention), stores it for the
    backward, else a 1-element placeholder."""
    if cu_seqlens is not None:
        _check_cu_seqlens_values(cu_seqlens, max_seqlen, q.shape[0], causal)
    if not use_triton:
        if store_lse and _cpu_flash(q, dropout_p, logit_softcap):
            return _cpu_flash_forward(q, k, v, key_padding_mask, cu_seqlens, softmax_scale, window or None, causal)
        out = _torch_attention(q, k, v, key_padding_mask, cu_seqlens, softmax_scale, dropout_p, logit_softcap or None,
                               window or None, causal, seed)
        return out.contiguous(), q.new_zeros((1,), dtype=torch.float32)
    q, k, v, problem, seed = _op_problem(q, k, v, key_padding_mask, cu_seqlens, seed, max_seqlen, softmax_scale,
                                         dropout_p, logit_softcap, window, causal, dropout_rng)
    return _attention_forward(q, k, v, problem, seed, store_lse)


@_attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, key_padding_mask, cu_seqlens, seed, max_seqlen, softmax_scale, dropout_p,
                            logit_softcap, window, causal, use_triton, store_lse, dropout_rng=0):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if not (store_lse and (use_triton or _cpu_flash(q, dropout_p, logit_softcap))):
        return out, q.new_empty((1,), dtype=torch.float32)
    if cu_seqlens is not None:
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast::attention_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _attention_backward_op(do, q, k, v, o, lse, key_padding_mask, cu_seqlens, seed, max_seqlen, softmax_scale,
                           dropout_p, logit_softcap, window, causal, use_triton, dropout_rng=0):
    """``(dq, dk, dv)``, contiguous. The Triton path runs the two backward kernels from o and lse, and so does the
    CPU path where its forward stored lse (ATen's CPU flash-attention backward); otherwise the PyTorch path
    recomputes the probabilities (the same dropout, drawn again from ``seed``) and applies the softmax backward."""
    if not use_triton:
        if lse.dim() > 1 and _cpu_flash(q, dropout_p, logit_softcap):  # the forward stored the log-sum-exps
            return _cpu_flash_backward(do, q, k, v, o, lse, key_padding_mask, cu_seqlens, softmax_scale,
                                       window or None, causal)
        return _torch_attention_backward(do, q, k, v, key_padding_mask, cu_seqlens, softmax_scale, dropout_p,
                                         logit_softcap or None, window or None, causal, seed)
    q, k, v, problem, seed = _op_problem(q, k, v, key_padding_mask, cu_seqlens, seed, max_seqlen, softmax_scale,
                                         dropout_p, logit_softcap, window, causal, dropout_rng)
    return _attention_backward(do, q, k, v, o, lse, problem, seed)


@_attention_backward_op.register_fake
def _attention_backward_fake(do, q, k, v, o, lse, key_padding_mask, cu_seqlens, seed, max_seqlen, softmax_scale,
                             dropout_p, logit_softcap, window, causal, use_triton, dropout_rng=0):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, seed, *flags = inputs
    # The mask and cu_seqlens are saved too, so that autograd catches an in-place change between forward and
    # backward instead of the backward silently using the changed values.
    ctx.save_for_backward(q, k, v, output[0], output[1], key_padding_mask, cu_seqlens, seed)
    *flags, _store_lse, dropout_rng = flags
    ctx.flags = (*flags, dropout_rng)  # max_seqlen ... use_triton, dropout_rng (store_lse is the forward's own)


def _attention_backward_formula(ctx, do, dlse):
    q, k, v, o, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(do, q, k, v, o, lse, key_padding_mask, cu_seqlens, seed, *ctx.flags)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


_attention_forward_op.register_autograd(_attention_backward_formula, setup_context=_attention_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Reference and CPU path
# ----------------------------------------------------------------------------------------------------------


def bidirectional_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    dropout_keep_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    logit_softcap: float | None = None,
    window: int | None = None,
    causal: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch attention: explicit ``softmax(mask(softcap(q k^T * scale))) v`` with K/V repeated per
    group; the tests' reference and the CPU path for soft-capping (which SDPA cannot do).

    Same shapes and flags as :func:`bidirectional_attention`. ``upcast=True`` computes in fp32 (fp64 stays fp64)
    and returns the input dtype; ``upcast=False`` computes in the input dtype (the low-precision error that the
    kernel's tolerance is measured against). ``dropout_keep_mask`` ``(batch, heads, max_seqlen, max_seqlen)``
    bool, with ``dropout_p``, applies that exact dropout (kept values scaled by ``1 / (1 - dropout_p)``).
    Padded query rows give zeros.
    """
    if cu_seqlens is not None:
        def sequence(i, lo, hi):
            keep = None if dropout_keep_mask is None else dropout_keep_mask[i : i + 1, :, : hi - lo, : hi - lo]
            return (bidirectional_attention_reference(
                q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], softmax_scale=softmax_scale, dropout_keep_mask=keep,
                dropout_p=dropout_p, logit_softcap=logit_softcap, window=window, causal=causal, upcast=upcast),)

        return _per_sequence(cu_seqlens.tolist(), sequence, q)[0]
    dtype = q.dtype
    compute = (torch.float64 if dtype == torch.float64 else torch.float32) if upcast else dtype
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[2] // k.shape[2]
    qt = q.to(compute).transpose(1, 2)
    kt = k.to(compute).transpose(1, 2).repeat_interleave(group, dim=1)
    vt = v.to(compute).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if logit_softcap is not None:  # Gemma-2's order: scale, cap, then mask
        scores = torch.tanh(scores / logit_softcap) * logit_softcap
    band = _band_mask(q.shape[1], window, causal, q.device)
    if band is not None:
        scores = scores.masked_fill(~band, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        # padded query rows attend to everything, then are zeroed: no NaN, no gradient
        scores = scores.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    if dropout_keep_mask is not None:
        probs = probs.masked_fill(~dropout_keep_mask, 0.0) / (1.0 - dropout_p)
    out = torch.matmul(probs, vt).transpose(1, 2)
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
    return out.to(dtype)


def _per_sequence(bounds: list, fn, *like) -> list:
    """A packed batch one sequence at a time: ``fn(i, lo, hi)`` gives the batch-1 results of sequence ``i``, tokens
    ``lo:hi`` (``bounds`` is ``cu_seqlens`` as a list; empty sequences are skipped), written into zeroed tensors
    shaped as ``like``, so that tokens past ``cu_seqlens[-1]``, which belong to no sequence, stay zero."""
    outs = [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in like]
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            for out, piece in zip(outs, fn(i, lo, hi)):
                out[lo:hi] = piece[0]
    return outs


def _band_mask(seq: int, window: int | None, causal: bool, device) -> torch.Tensor | None:
    """``(seq, seq)`` bool, True where key ``j`` is visible to query ``i`` (positions in the row); None when
    every key is."""
    if window is None and not causal:
        return None
    i = torch.arange(seq, device=device)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    visible = torch.ones(seq, seq, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= (i - j).abs() < window
    return visible


_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)  # SplitMix64's constants as signed int64 (products wrap)
_SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_SPLITMIX_MUL2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: the sign bits are masked off)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _seeded_keep_mask(seed: torch.Tensor, shape: tuple, dropout_p: float, device) -> torch.Tensor:
    """The PyTorch path's dropout keep-mask, drawn from ``seed`` (so that its backward draws the same again) on
    the seed's device without a host sync: a counter-based generator, SplitMix64's output function of
    ``seed + gamma * (index + 1)`` per entry, whose top 24 bits are the uniform number compared with
    ``dropout_p``. (Reading the seed to the host for a ``torch.Generator`` would stall the CUDA stream and
    break a compiled graph.)"""
    index = torch.arange(1, math.prod(shape) + 1, device=device, dtype=torch.int64).view(shape)
    z = seed.reshape(()).to(device=device, dtype=torch.int64) + index * _SPLITMIX_GAMMA
    z = (z ^ _shift_right(z, 30)) * _SPLITMIX_MUL1
    z = (z ^ _shift_right(z, 27)) * _SPLITMIX_MUL2
    z = z ^ _shift_right(z, 31)
    uniform = _shift_right(z, 40).to(torch.float32) * (1.0 / (1 << 24))
    return uniform >= dropout_p


def _torch_attention(q, k, v, key_padding_mask, cu_seqlens, softmax_scale, dropout_p, logit_softcap, window, causal,
                     seed=None):
    """The CPU path: PyTorch SDPA (one call per sequence when packed); soft-capping, which SDPA cannot express, and
    dropout (an explicit keep-mask drawn from ``seed``, so that the backward replays it) go through the explicit
    reference computation in the input dtype."""
    flags = (logit_softcap, window, causal)
    if logit_softcap is not None or dropout_p > 0:
        keep = None
        if dropout_p > 0:
            if seed is None:
                raise ValueError("the PyTorch attention path needs a dropout seed (draw_dropout_seed) with dropout_p > 0")
            batch = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
            seq = q.shape[1] if cu_seqlens is None else int(cu_seqlens.diff().max())
            keep = _seeded_keep_mask(seed, (batch, q.shape[-2], seq, seq), dropout_p, q.device)
        return bidirectional_attention_reference(
            q, k, v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale,
            dropout_keep_mask=keep, dropout_p=dropout_p, logit_softcap=logit_softcap, window=window,
            causal=causal, upcast=False,
        )
    if cu_seqlens is not None:
        return _per_sequence(cu_seqlens.tolist(), lambda i, lo, hi: (_torch_attention(
            q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], None, None, softmax_scale, dropout_p, *flags),), q)[0]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    plain_causal = causal and window is None and key_padding_mask is None  # SDPA's is_causal, no mask
    mask = None if plain_causal else _visible_keys(key_padding_mask, q.shape[1], window, causal, q.device)
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None, scale=softmax_scale,
        enable_gqa=k.shape[2] != q.shape[2],
    ).transpose(1, 2)
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
    return out


def _cpu_flash(q, dropout_p, logit_softcap) -> bool:
    """Whether the PyTorch path runs ATen's CPU flash attention, which returns the log-sum-exps (so that the
    backward is a flash backward from them, not a recomputation through ``(seq, seq)`` probabilities): on CPU,
    without dropout (its keep-mask is ours, drawn from the seed) and soft-capping (which SDPA cannot express)."""
    return q.device.type == "cpu" and q.dtype in SUPPORTED_DTYPES and dropout_p == 0 and not logit_softcap


def _visible_keys(key_padding_mask, seq, window, causal, device) -> torch.Tensor | None:
    """The bool mask ``(batch or 1, 1, seq or 1, seq)`` of the keys each query attends to (True = visible), or
    None when every key is. Padded query rows attend to everything (their output is zeroed): a fully masked row
    would be NaN in SDPA, forward and backward, so there is none."""
    band = _band_mask(seq, window, causal, device)
    if key_padding_mask is None:
        return None if band is None else band[None, None]
    if band is None:
        # A sequence with no real token attends to all its keys (then is zeroed); every other sequence sees
        # exactly its key mask, broadcast over queries.
        return (key_padding_mask | ~key_padding_mask.any(dim=1, keepdim=True))[:, None, None, :]
    return ((band & key_padding_mask[:, None, :]) | ~key_padding_mask[:, :, None])[:, None]


def _cpu_flash_call(q, k, v, key_padding_mask, scale, window, causal, backward=None):
    """One padded batch ``(batch, seq, heads, dim)`` through ATen's CPU flash attention: ``(out, lse)``, or with
    ``backward = (do, o, lse)`` the gradients ``(dq, dk, dv)``. GQA: K/V heads repeated for the call (ATen's
    kernel needs equal heads), their gradients summed back over each group."""
    batch, seq, heads, dim = q.shape
    group = heads // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if group > 1:
        kt, vt = (t.repeat_interleave(group, dim=1) for t in (kt, vt))
    visible = _visible_keys(key_padding_mask, seq, window, causal, q.device)
    is_causal = causal and window is None and key_padding_mask is None
    mask = None
    if visible is not None and not is_causal:
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    if backward is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, is_causal, attn_mask=mask, scale=scale)
        out = out.transpose(1, 2)
        if key_padding_mask is not None:
            out = out.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
        return out.contiguous(), lse
    do, o, lse = backward
    if key_padding_mask is not None:  # padded rows are zeroed in the output: no gradient flows through them
        do = do.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do.transpose(1, 2), qt, kt, vt, o.transpose(1, 2), lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    if group > 1:
        dk, dv = (g.reshape(batch, heads // group, group, seq, dim).sum(dim=2) for g in (dk, dv))
    return tuple(g.transpose(1, 2).contiguous() for g in (dq, dk, dv))


def _cpu_flash_forward(q, k, v, key_padding_mask, cu_seqlens, scale, window, causal):
    """The CPU path with the log-sum-exps: ``(out, lse)``, lse ``(batch, heads, seq)`` padded or ``(heads,
    total)`` packed (one call per sequence; zero past ``cu_seqlens[-1]``), fp32, as the Triton path stores it."""
    if cu_seqlens is None:
        out, lse = _cpu_flash_call(q, k, v, key_padding_mask, scale, window, causal)
        return out, lse.float().contiguous()

    def sequence(i, lo, hi):
        piece, piece_lse = _cpu_flash_call(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], None, scale, window, causal)
        return piece, piece_lse.transpose(1, 2)  # (1, tokens, heads): written along the tokens like the output

    out, lse = _per_sequence(cu_seqlens.tolist(), sequence, q, q.new_empty(q.shape[:2], dtype=torch.float32))
    return out, lse.t().contiguous()


def _cpu_flash_backward(do, q, k, v, o, lse, key_padding_mask, cu_seqlens, scale, window, causal):
    """The gradients of :func:`_cpu_flash_forward` from its output and log-sum-exps (no recomputed scores)."""
    if cu_seqlens is None:
        return _cpu_flash_call(q, k, v, key_padding_mask, scale, window, causal, backward=(do, o, lse))
    return tuple(_per_sequence(cu_seqlens.tolist(), lambda i, lo, hi: _cpu_flash_call(
        q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], None, scale, window, causal,
        backward=(do[None, lo:hi], o[None, lo:hi], lse[None, :, lo:hi].contiguous())), q, k, v))


def _explicit_backward(do, q, k, v, key_padding_mask, scale, keep, dropout_p, logit_softcap, window, causal):
    """dq, dk, dv of :func:`bidirectional_attention_reference` for one padded batch ``(batch, seq, heads, dim)``,
    computed in fp32 (fp64 stays fp64): the softmax backward written out (a custom op's implementation runs below
    autograd, so it cannot ask autograd for it). GQA without repeating K/V: the ``group`` query heads of a K/V
    head are stacked along the rows, ``(batch, kv_heads, group * seq, dim)``, so that every product is one
    batched GEMM per K/V head and dK/dV come out summed over the group; masks apply to the
    ``(batch, kv_heads, group, seq, seq)`` view of the scores."""
    dtype = q.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads

    def stacked(t):  # (batch, seq, heads, dim) -> (batch, kv_heads, group * seq, dim), in the compute dtype
        return t.to(compute).transpose(1, 2).reshape(batch, kv_heads, group * seq, dim)

    qg, dog = stacked(q), stacked(do)
    kt = k.to(compute).transpose(1, 2)
    vt = v.to(compute).transpose(1, 2)
    scores = torch.matmul(qg, kt.transpose(-1, -2)).mul_(scale)
    grid = scores.view(batch, kv_heads, group, seq, seq)
    capped = None
    if logit_softcap is not None:
        capped = torch.tanh(scores / logit_softcap)
        scores = capped * logit_softcap
        grid = scores.view(batch, kv_heads, group, seq, seq)
    band = _band_mask(seq, window, causal, q.device)
    if band is not None:
        grid.masked_fill_(~band, float("-inf"))
    if key_padding_mask is not None:
        padded_rows = ~key_padding_mask[:, None, None, :, None]
        grid.masked_fill_(~key_padding_mask[:, None, None, None, :], float("-inf"))
        grid.masked_fill_(padded_rows, 0.0)
        dog = dog.view(batch, kv_heads, group, seq, dim).masked_fill(padded_rows, 0.0).view_as(dog)  # zeroed rows
    probs = torch.softmax(scores, dim=-1)
    keep_grid = None if keep is None else keep.view(batch, kv_heads, group, seq, seq)
    dropped = probs
    if keep_grid is not None:
        dropped = (probs.view_as(keep_grid).masked_fill(~keep_grid, 0.0) / (1.0 - dropout_p)).view_as(probs)
    dv = torch.matmul(dropped.transpose(-1, -2), dog)
    dprobs = torch.matmul(dog, vt.transpose(-1, -2))
    if keep_grid is not None:
        dprobs = (dprobs.view_as(keep_grid).masked_fill(~keep_grid, 0.0) / (1.0 - dropout_p)).view_as(probs)
    dscores = probs * (dprobs - (dprobs * probs).sum(dim=-1, keepdim=True))
    if key_padding_mask is not None:
        dscores = dscores.view_as(grid).masked_fill(padded_rows, 0.0).view_as(probs)
    if capped is not None:
        dscores = dscores * (1.0 - capped * capped)
    dscores = dscores * scale
    dq = torch.matmul(dscores, kt).view(batch, heads, seq, dim)
    dk = torch.matmul(dscores.transpose(-1, -2), qg)
    return tuple(g.transpose(1, 2).to(dtype).contiguous() for g in (dq, dk, dv))


def _torch_attention_backward(do, q, k, v, key_padding_mask, cu_seqlens, softmax_scale, dropout_p, logit_softcap,
                              window, causal, seed):
    """The PyTorch path's backward: :func:`_explicit_backward` per batch, or per sequence when packed (tokens past
    ``cu_seqlens[-1]`` get zero gradients), with the forward's keep-mask drawn again from ``seed``."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    flags = (logit_softcap, window, causal)
    if cu_seqlens is None:
        keep = None
        if dropout_p > 0:
            keep = _seeded_keep_mask(seed, (q.shape[0], q.shape[2], q.shape[1], q.shape[1]), dropout_p, q.device)
        return _explicit_backward(do, q, k, v, key_padding_mask, scale, keep, dropout_p, *flags)
    bounds = cu_seqlens.tolist()
    keep = None
    if dropout_p > 0:
        longest = max(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]))  # from the bounds read once already
        keep = _seeded_keep_mask(seed, (len(bounds) - 1, q.shape[-2], longest, longest), dropout_p, q.device)

    def sequence(i, lo, hi):
        piece_keep = None if keep is None else keep[i : i + 1, :, : hi - lo, : hi - lo]
        return _explicit_backward(do[None, lo:hi], q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], None, scale,
                                  piece_keep, dropout_p, *flags)

    return tuple(_per_sequence(bounds, sequence, q, k, v))


# ----------------------------------------------------------------------------------------------------------
# Validation and public entry points
# ----------------------------------------------------------------------------------------------------------


def _validate(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, logit_softcap, window,
              causal) -> None:
    if logit_softcap is not None and (
        isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float))
        or not 0 < logit_softcap < math.inf  # NaN fails it too; a comparison, so that torch.compile traces it
    ):
        raise ValueError(f"logit_softcap must be a positive finite number or None, got {logit_softcap!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an int >= 1 (key j visible to query i when |i - j| < window) or None, "
                         f"got {window!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError("give either cu_seqlens (packed batch, no padding) or key_padding_mask, not both")
        if q.dim() != 3 or k.dim() != 3:
            raise ValueError(
                "with cu_seqlens, q must be (total_tokens, heads, head_dim) and k/v (total_tokens, kv_heads, "
                f"head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError("cu_seqlens must be a 1-D int32 tensor of batch + 1 cumulative lengths starting at 0")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must have batch + 1 >= 2 entries, got {cu_seqlens.numel()}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        if max_seqlen is None:
            raise ValueError("cu_seqlens needs max_seqlen (the longest sequence), as in flash_attn_varlen_func")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 1:
            raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens but k/v have {k.shape[0]}")
    else:
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed batches)")
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                "q must be (batch, seq, heads, head_dim) and k/v (batch, seq, kv_heads, head_dim) "
                f"(or packed 3-D with cu_seqlens); got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if k.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"q and k/v must share batch and seq (self-attention); got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
                raise TypeError(
                    f"key_padding_mask must be a bool tensor (True = real token), got {got}; "
                    "convert a 0/1 attention mask with mask.bool()"
                )
            if tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
                raise ValueError(
                    f"key_padding_mask must be (batch, seq) = {tuple(q.shape[:2])}, got {tuple(key_padding_mask.shape)}"
                )
            if key_padding_mask.device != q.device:
                raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but k/v have {k.shape[-1]}")
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if softmax_scale is not None and (not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _check_cu_seqlens_values(cu_seqlens: torch.Tensor, max_seqlen: int, total: int, causal: bool) -> None:
    """The values of ``cu_seqlens`` against ``max_seqlen`` and the token count, checked where the op runs (inside
    a compiled graph too): on the device without a host sync, on CPU with a clear message."""
    lengths = cu_seqlens.diff()
    if cu_seqlens.is_cuda:
        # Checked on the device, without a host sync: wrong metadata would otherwise read out of bounds or
        # leave the queries past max_seqlen silently zero. The error surfaces at the next synchronisation.
        torch._assert_async(
            (cu_seqlens[0] == 0) & (lengths >= 0).all() & (lengths.max() <= max_seqlen)
            & (cu_seqlens[-1] <= total),
            "cu_seqlens must start at 0, never decrease, end at most at total_tokens, and no sequence may be "
            "longer than max_seqlen",
        )
        if causal:
            torch._assert_async(
                (lengths > 0).all() & (cu_seqlens[-1] == total), _CAUSAL_PACKING_MESSAGE
            )
    else:  # CPU values are free to check with a clear message
        if int(cu_seqlens[0]) != 0 or bool((lengths < 0).any()) or int(cu_seqlens[-1]) > total:
            raise ValueError(
                f"cu_seqlens must start at 0, never decrease and end at most at total_tokens={total}; "
                f"got {cu_seqlens.tolist()}"
            )
        if int(lengths.max()) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence, {int(lengths.max())}")
        if causal and (bool((lengths <= 0).any()) or int(cu_seqlens[-1]) != total):
            raise ValueError(f"{_CAUSAL_PACKING_MESSAGE}; got {cu_seqlens.tolist()} for {total} tokens")


_CAUSAL_PACKING_MESSAGE = (
    "causal=True with cu_seqlens needs contiguous packed sequences: cu_seqlens strictly increasing (no empty "
    "sequence) and ending at total_tokens, so that every token belongs to exactly one sequence, in order"
)
_warned_fallback: set = set()


def bidirectional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    logit_softcap: float | None = None,
    window: int | None = None,
    causal: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention: bidirectional by default, optionally soft-capped, windowed or causal.

    Args:
        q: ``(batch, seq, heads, head_dim)``, or ``(total_tokens, heads, head_dim)`` with ``cu_seqlens``.
        k, v: ``(batch, seq, kv_heads, head_dim)`` or ``(total_tokens, kv_heads, head_dim)``; ``heads`` must
            be a multiple of ``kv_heads`` (GQA/MQA, handled without repeating K/V).
        key_padding_mask: ``(batch, seq)`` bool, True = real token. Padded keys get no attention; padded query
            rows return zeros.
        cu_seqlens: int32 ``(batch + 1,)`` cumulative sequence lengths of a packed batch, starting at 0.
        max_seqlen: longest sequence of the packed batch (required with ``cu_seqlens``; sets the grid, so no
            host sync).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        dropout_p: attention dropout probability (apply it in training only: it is applied whenever > 0).
        logit_softcap: ``softcap > 0``: scores become ``softcap * tanh(scores / softcap)`` after the softmax scale
            and before any mask, as Gemma-2's attention does.
        window: ``w >= 1``: key ``j`` is visible to query ``i`` only when ``|i - j| < w`` (Gemma-3's bidirectional
            sliding window). ``i`` and ``j`` are positions within the sequence when packed, and indices along
            the ``seq`` dimension of the padded row otherwise (padding is still masked). Real tokens of a
            left- or right-padded row are contiguous, so their index distance is their distance in the unpadded
            sequence and a padded batch gives, row by row, the unpadded result; a mask with holes counts the
            holes in the distance.
        causal: key ``j`` visible only when ``j <= i`` (same indices as ``window``; within each sequence when
            packed, which then must be contiguous: ``cu_seqlens`` strictly increasing and ending at
            ``total_tokens``). With ``window``: ``i - w < j <= i``.
        impl: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else PyTorch SDPA), ``"triton"``,
            ``"torch"``.

    Returns:
        Same shape and dtype as ``q``.
    """
    _validate(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, logit_softcap, window,
              causal)
    triton_ok = q.shape[-1] in SUPPORTED_HEAD_DIMS
    if impl == "triton" and not triton_ok:
        raise ValueError(f"the Triton kernel supports head_dim in 16..256, multiples of 8; got {q.shape[-1]}")
    triton = use_triton(impl, q, k, v, key_padding_mask, cu_seqlens) and _supported(
        None if triton_ok else q.shape[-1], _warned_fallback,
        "head_dim %d is not supported by the Triton kernel; using PyTorch SDPA")
    softmax_scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (not triton and not needs_grad and cu_seqlens is None and dropout_p == 0
            and logit_softcap is None and torch.compiler.is_compiling()):
        # Compiled inference on the PyTorch path: SDPA (the CPU flash kernel) and the padding fill traced into the
        # graph, where inductor fuses the layouts and the fill around them, instead of an opaque op.
        return _torch_attention(q, k, v, key_padding_mask, None, softmax_scale, 0.0, None, window, causal)
    seed = draw_dropout_seed(q.device) if dropout_p > 0 else None
    effective_dropout_p(dropout_p)  # a dropout_p the dropout variant cannot apply raises here
    out, _ = torch.ops.llm2vec_fast.attention_forward(
        q, k, v, key_padding_mask, cu_seqlens, seed, max_seqlen if cu_seqlens is not None else 0,
        softmax_scale, float(dropout_p), float(logit_softcap) if logit_softcap is not None else 0.0,
        int(window) if window is not None else 0, causal, triton, needs_grad,
        VARIANTS["dropout"].index(_VARIANT["dropout"]),
    )
    return out


def attention_dropout_keep_mask(
    seed: torch.Tensor, batch: int, heads: int, max_seqlen: int, dropout_p: float
) -> torch.Tensor:
    """The keep-mask ``(batch, heads, max_seqlen, max_seqlen)`` bool the kernels use for ``seed`` (from
    :func:`draw_dropout_seed`) under the dropout variant selected by :func:`attention_variants`. For tests and
    small shapes only: it materializes what the kernels never do. Entry ``[b, h, i, j]`` is query ``i`` and key
    ``j`` of sequence ``b`` (positions within the sequence when packed). With ``dropout="philox4x"`` the
    kept values are scaled by ``1 / (1 - effective_dropout_p(dropout_p))``."""
    if not use_triton("auto", seed):
        raise RuntimeError("attention_dropout_keep_mask runs the Triton RNG: needs CUDA or TRITON_INTERPRET=1")
    mask = torch.empty((batch, heads, max_seqlen, max_seqlen), device=seed.device, dtype=torch.int8)
    grid = (triton.cdiv(max_seqlen, 32), batch * heads)
    _dropout_mask_kernel[grid](mask, seed, max_seqlen, effective_dropout_p(float(dropout_p)), BLOCK_M=32,
                               BLOCK_N=64, PHILOX4X=_VARIANT["dropout"] == "philox4x")
    return mask.bool()
