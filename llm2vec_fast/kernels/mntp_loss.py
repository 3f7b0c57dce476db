"""Fused masked next-token loss: LM head + cross-entropy over the labelled rows only.

MNTP labels only a fraction of the positions (20% by default, 80% for Mistral in the paper), and a full
``(tokens, vocab)`` logits tensor is gigabytes at a 128K vocabulary. This op never builds it:

1. the rows whose (shifted) label is not ``ignore_index`` are compacted on the device, without a host
   synchronisation: a stable sort of the "is ignored" flags puts the valid rows first and their number stays
   a device tensor; kernels read it and programs past it return at once;
2. the forward kernel streams the log-sum-exp over vocabulary tiles (fp32 accumulation); the vocabulary is
   split across programs for parallelism and the partial ``(max, sum-exp)`` pairs are merged in PyTorch;
3. the backward kernel recomputes each ``(rows, vocab)`` logits tile, forms ``softmax - one_hot`` and adds its
   products with ``weight`` and ``hidden`` into fp32 gradient buffers with atomics (Cut Cross-Entropy's
   scheme), so that only one tile of logits ever exists per program.

Without CUDA (and without ``TRITON_INTERPRET=1``) a chunked PyTorch implementation runs instead: it gathers the
valid rows (a host sync, free on CPU) and never holds more than one chunk of logits, in forward or backward.
``masked_next_token_loss_reference`` is the plain full-logits computation, used by the tests.

Every path runs as the torch custom op ``torch.ops.llm2vec_fast.masked_next_token_loss`` (the backward is
``masked_next_token_loss_backward``), with fake implementations and ``register_autograd``, so that
``torch.compile(..., fullgraph=True)`` of a model that calls it sees one opaque op with output shapes known from
the input shapes: the data-dependent count of labelled rows stays inside.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from ._dispatch import dot_precision as _dot_precision
from ._dispatch import launch_device, split_tiles, triton_interpreter_enabled, use_triton
from ._matmul import matmul_fp32

REDUCTIONS = ("mean", "sum", "none")

# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh through exp of a non-positive argument: no overflow, works in the interpreter and on every backend.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(
    H_ptr, W_ptr, B_ptr, src, row_mask, cols, col_mask, HIDDEN, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``(BLOCK_M, BLOCK_V)`` fp32 logits of the gathered rows ``src`` against vocabulary rows ``cols``."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, HIDDEN, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < HIDDEN
        h = tl.load(H_ptr + src[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        # weight rows are contiguous along the hidden dimension: load (BLOCK_V, BLOCK_K) and transpose in the dot
        w = tl.load(W_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tanh_x = acc  # unused unless HAS_SOFTCAP
    if HAS_SOFTCAP:
        tanh_x = _tanh(acc / softcap)
        acc = softcap * tanh_x
    return acc, tanh_x


@triton.jit
def _mntp_loss_fwd_kernel(
    H_ptr, W_ptr, B_ptr, IDX_ptr, Y_ptr, COUNT_ptr,
    MAX_ptr, SUMEXP_ptr, TARGET_ptr,  # (n_splits, n_rows) fp32 partial results
    n_rows, VOCAB, HIDDEN, stride_h, stride_w, tiles_per_split, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    count = tl.load(COUNT_ptr)
    if pid_m * BLOCK_M >= count:  # past the labelled rows: nothing to do, no host sync needed to know it
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < count
    src = tl.load(IDX_ptr + rows, mask=row_mask, other=0)
    target = tl.load(Y_ptr + rows, mask=row_mask, other=-1)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_col = pid_split * tiles_per_split * BLOCK_V
    for tile in range(0, tiles_per_split):
        cols = (first_col + tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < VOCAB
        z, _ = _logits_tile(
            H_ptr, W_ptr, B_ptr, src, row_mask, cols, col_mask, HIDDEN, stride_h, stride_w, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION,
        )
        z = tl.where(col_mask[None, :], z, float("-inf"))
        t_i += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    out = pid_split * n_rows + rows
    tl.store(MAX_ptr + out, m_i, mask=row_mask)
    tl.store(SUMEXP_ptr + out, s_i, mask=row_mask)
    tl.store(TARGET_ptr + out, t_i, mask=row_mask)


@triton.jit
def _mntp_loss_bwd_kernel(
    H_ptr, W_ptr, B_ptr, IDX_ptr, Y_ptr, COUNT_ptr, LSE_ptr, GRAD_ptr,
    DH_ptr, DW_ptr, DB_ptr,  # fp32 accumulators: (rows of hidden, HIDDEN), (VOCAB, HIDDEN), (VOCAB,)
    VOCAB, HIDDEN, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    count = tl.load(COUNT_ptr)
    if pid_m * BLOCK_M >= count:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < count
    src = tl.load(IDX_ptr + rows, mask=row_mask, other=0)
    target = tl.load(Y_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(GRAD_ptr + rows, mask=row_mask, other=0.0)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < VOCAB

    z, tanh_x = _logits_tile(
        H_ptr, W_ptr, B_ptr, src, row_mask, cols, col_mask, HIDDEN, stride_h, stride_w, softcap,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION,
    )
    # d loss / d z = softmax(z) - one_hot(target); through the soft-cap, d z / d x = 1 - tanh(x / cap)^2.
    dz = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - tanh_x * tanh_x)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(DB_ptr + cols, tl.sum(dz * grad[:, None], axis=0), mask=col_mask, sem="relaxed")
    # The upstream gradient (1 / labelled rows for "mean") is applied after the cast, not before: scaled first,
    # the small softmax entries of a large vocabulary would underflow to zero in fp16.
    dz_in = dz.to(W_ptr.dtype.element_ty)
    for k in range(0, HIDDEN, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < HIDDEN
        if COMPUTE_DH:
            w = tl.load(W_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                        other=0.0)
            dh = tl.dot(dz_in, w, input_precision=DOT_PRECISION) * grad[:, None]
            tl.atomic_add(DH_ptr + src[:, None] * HIDDEN + ks[None, :], dh, mask=row_mask[:, None] & k_mask[None, :],
                          sem="relaxed")
        if COMPUTE_DW:
            h = tl.load(H_ptr + src[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            h = (h.to(tl.float32) * grad[:, None]).to(H_ptr.dtype.element_ty)
            dw = tl.dot(tl.trans(dz_in), h, input_precision=DOT_PRECISION)
            tl.atomic_add(DW_ptr + cols[:, None] * HIDDEN + ks[None, :], dw, mask=col_mask[:, None] & k_mask[None, :],
                          sem="relaxed")


@triton.jit
def _softcapped_logits(Z_row, B_ptr, cols, col_mask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One block of a row of raw logits (from cuBLAS), with the bias and the soft-cap applied, fp32; -inf past
    the vocabulary. Also returns ``tanh(x / cap)`` for the soft-cap's derivative."""
    z = tl.load(Z_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tanh_x = z  # unused unless HAS_SOFTCAP
    if HAS_SOFTCAP:
        tanh_x = _tanh(z / softcap)
        z = softcap * tanh_x
    return tl.where(col_mask, z, float("-inf")), tanh_x


@triton.jit
def _mntp_row_softmax_kernel(
    Z_ptr, OUT_ptr, B_ptr, Y_ptr, LSE_ptr, TARGET_ptr, VOCAB, stride_z, stride_out, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The GEMM variant's middle step, one program per labelled row of a chunk: Z holds the row's raw logits
    ``h @ W.T`` (fp32, from cuBLAS). Writes the row's log-sum-exp and target logit, and with ``WRITE_GRAD``
    ``OUT = d loss / d (h @ W.T) = (softmax - one_hot) * (1 - tanh^2)`` (OUT may be Z: written in place)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z_ptr + row * stride_z
    target = tl.load(Y_ptr + row)
    running_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_V,), dtype=tl.float32)
    # Lane-wise running (max, sum) over the vocabulary in one pass; lanes merged at the end.
    for start in range(0, VOCAB, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < VOCAB
        z, _ = _softcapped_logits(z_row, B_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        target_logit += tl.where(cols == target, z, 0.0)
        new_max = tl.maximum(running_max, z)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # lanes past the vocabulary so far
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.exp(z - safe_max)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
    tl.store(LSE_ptr + row, lse)
    tl.store(TARGET_ptr + row, tl.sum(target_logit, axis=0))
    if WRITE_GRAD:
        out_row = OUT_ptr + row * stride_out
        for start in range(0, VOCAB, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < VOCAB
            z, tanh_x = _softcapped_logits(z_row, B_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)
            dz = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            if HAS_SOFTCAP:
                dz = dz * (1.0 - tanh_x * tanh_x)
            tl.store(out_row + cols, dz.to(OUT_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _block_sizes(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages).

    Not tuned on a GPU (none was available while writing this). Checked by compiling for sm_90 offline with
    Triton's ptxas: bf16/fp16 at 64/128/64, 8 warps, 3 stages use wgmma with no register spills (fwd 109-148
    registers, 72 KiB shared memory; bwd 126-204 registers, 80-136 KiB); fp32 (no tensor cores, "ieee" dots)
    spilled at those tiles; 32/64/32 with 4 warps spilled 88 bytes in the trained-head backward under Triton 3.6,
    16/64/32, 4 warps, 2 stages does not (the sm_90 gate, tests/test_sm90_compile.py).
    In the interpreter the cost is per program and per op, so fewer, larger tiles than the shapes tested.
    """
    if device.type != "cuda":
        return 32, 64, 32, 4, 1
    if dtype == torch.float32:
        return 16, 64, 32, 4, 2
    return 64, 128, 64, 8, 3


def _compact_rows(labels: torch.Tensor, seq_len: int, shift: int, ignore_index: int):
    """Valid (shifted-label) rows first, without a host sync.

    Returns ``order`` (positions of the ``(batch, seq - shift)`` grid, valid ones first), ``src`` (their rows in
    the flattened ``(batch * seq, hidden)`` hidden states), ``targets`` (their labels) and ``count`` (int32
    device scalar: how many are valid).
    """
    batch = labels.shape[0]
    length = seq_len - shift
    shifted = labels[:, shift:].reshape(-1)
    ignored = shifted == ignore_index
    order = torch.argsort(ignored.to(torch.uint8), stable=True)
    positions = (
        torch.arange(batch, device=labels.device)[:, None] * seq_len + torch.arange(length, device=labels.device)[None, :]
    ).reshape(-1)
    src = positions[order].contiguous()
    targets = shifted[order].contiguous()
    count = (~ignored).sum().to(torch.int32).reshape(1)
    return order, src, targets, count


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.is_cuda:
        # Device-side assert: no host sync. A failure surfaces as a CUDA assertion at the next sync point.
        torch._assert_async(~bad.any(), f"masked_next_token_loss: labels outside [0, {vocab}) that are not "
                                         f"ignore_index={ignore_index}")
    elif bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"masked_next_token_loss: label {first} is outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index={ignore_index}"
        )


def _grad_per_row(grad_output, reduction, count, order, shift, n_rows):
    """The upstream gradient of each compacted row, fp32 ``(n_rows,)``."""
    if reduction == "none":
        return grad_output[:, shift:].reshape(-1)[order].float().contiguous()
    scale = grad_output.float().reshape(1)
    if reduction == "mean":
        scale = scale / count.clamp(min=1).float()
    return scale.expand(n_rows).contiguous()


def _scatter_rows(per_row, order, count, batch, seq_len, shift):
    """Per-row losses of the compacted rows -> ``(batch, seq)`` aligned with ``labels``, 0 where ignored."""
    n_rows = per_row.shape[0]
    valid = torch.arange(n_rows, device=per_row.device) < count
    grid = torch.zeros(n_rows, device=per_row.device, dtype=per_row.dtype)
    grid[order] = torch.where(valid, per_row, torch.zeros_like(per_row))
    out = per_row.new_zeros(batch, seq_len)
    out[:, shift:] = grid.view(batch, seq_len - shift)
    return out


def _reduce(per_position, reduction, count):
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    return total / count.clamp(min=1).to(total.dtype).reshape(())


def _fused_forward(hidden, weight, bias, labels, shift, reduction, logit_softcap, ignore_index):
    """The fused Triton path's forward, no host sync: ``(loss, order, src, targets, count, lse)``, the compacted
    row bookkeeping and the per-row log-sum-exp ``(batch * (seq - shift),)`` for the backward."""
    batch, seq_len, hidden_size = hidden.shape
    vocab = weight.shape[0]
    n_rows = batch * (seq_len - shift)
    hidden2d = hidden.reshape(batch * seq_len, hidden_size)
    weight = weight.contiguous()
    order, src, targets, count = _compact_rows(labels, seq_len, shift, ignore_index)
    block_m, block_v, block_k, num_warps, num_stages = _block_sizes(hidden.device, weight.dtype)
    row_blocks = triton.cdiv(n_rows, block_m)
    n_tiles = triton.cdiv(vocab, block_v)
    # The vocabulary split so that enough programs run even when few row blocks are labelled.
    splits, tiles_per_split = split_tiles(row_blocks, n_tiles, hidden.device, programs_per_sm=4)
    part_max = torch.empty(splits, n_rows, device=hidden.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_target = torch.empty_like(part_max)
    has_softcap = logit_softcap is not None
    precision = _dot_precision(weight.dtype)
    with launch_device(hidden):
        _mntp_loss_fwd_kernel[(row_blocks, splits)](
            hidden2d, weight, bias if bias is not None else weight, src, targets, count,
            part_max, part_sum, part_target,
            n_rows, vocab, hidden_size, hidden2d.stride(0), weight.stride(0), tiles_per_split,
            float(logit_softcap) if has_softcap else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, DOT_PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages,
        )
    valid = torch.arange(n_rows, device=hidden.device) < count
    row_max = part_max.max(dim=0).values
    row_max = torch.where(valid, row_max, torch.zeros_like(row_max))
    sumexp = (part_sum * torch.exp(part_max - row_max)).sum(dim=0)
    lse = row_max + torch.log(torch.where(valid, sumexp, torch.ones_like(sumexp)))
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    target_logit = torch.where(valid, part_target.sum(dim=0), torch.zeros_like(lse))
    per_position = _scatter_rows(lse - target_logit, order, count, batch, seq_len, shift)
    return _reduce(per_position, reduction, count), order, src, targets, count, lse


def _zero_grads(hidden2d, weight, dtype, need_dh, need_dw, need_db):
    """Zeroed ``dtype`` buffers for d hidden ``(rows, hidden_size)``, d weight and d bias; None where not needed."""
    return (torch.zeros(hidden2d.shape, device=hidden2d.device, dtype=dtype) if need_dh else None,
            torch.zeros(weight.shape, device=weight.device, dtype=dtype) if need_dw else None,
            torch.zeros(weight.shape[0], device=weight.device, dtype=dtype) if need_db else None)


def _fused_backward(grad_output, hidden, weight, bias, order, src, targets, count, lse, shift, reduction,
                    logit_softcap, need_dh, need_dw, need_db):
    """The fused Triton path's backward: the logits recomputed tile by tile, gradients by atomics, no host sync."""
    batch, seq_len, hidden_size = hidden.shape
    hidden2d = hidden.reshape(batch * seq_len, hidden_size)
    weight = weight.contiguous()
    vocab = weight.shape[0]
    n_rows = batch * (seq_len - shift)
    grad_rows = _grad_per_row(grad_output, reduction, count, order, shift, n_rows)
    dh, dw, db = _zero_grads(hidden2d, weight, torch.float32, need_dh, need_dw, need_db)
    block_m, block_v, block_k, num_warps, num_stages = _block_sizes(hidden2d.device, weight.dtype)
    has_softcap = logit_softcap is not None
    with launch_device(hidden2d):
        _mntp_loss_bwd_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(vocab, block_v))](
            hidden2d, weight, bias if bias is not None else weight, src, targets, count, lse, grad_rows,
            dh if need_dh else lse, dw if need_dw else lse, db if need_db else lse,
            vocab, hidden_size, hidden2d.stride(0), weight.stride(0),
            float(logit_softcap) if has_softcap else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
            COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, DOT_PRECISION=_dot_precision(weight.dtype),
            num_warps=num_warps, num_stages=num_stages,
        )
    return dh, dw, db


# ---------------------------------------------------------------------------------------------------------------
# Chunked PyTorch fallback (CPU) and the plain reference
# ---------------------------------------------------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 23  # logits elements per chunk: 8M fp32 = 32 MiB


def _chunk_logits(h, weight, bias, softcap, compute_dtype):
    x = h.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        x = x + bias.to(compute_dtype)
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return softcap * t, t


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunked_forward(hidden, weight, bias, labels, shift, reduction, logit_softcap, ignore_index, chunk_rows,
                     need_dh=False, need_dw=False, need_db=False):
    """The PyTorch path's forward: the valid rows gathered (a host sync, free on CPU), logits built and
    discarded one row chunk at a time. Returns ``(loss, order, src, targets, count, lse, early_dh, early_dw,
    early_db)`` with the bookkeeping at its full static length ``batch * (seq - shift)``.

    For "mean"/"sum" with a gradient to take (:func:`_early`), the gradients of the loss are taken here, from
    the chunk's logits while they exist (``softmax - one_hot``: two more GEMMs per chunk), so that the backward
    only scales them by the incoming gradient instead of computing the logits again; ``lse`` is then not needed
    and empty. Otherwise ``lse`` is the per-row log-sum-exp (0 past the ``count`` labelled rows) for the
    backward's recomputation, and ``early_*`` are empty."""
    batch, seq_len, hidden_size = hidden.shape
    hidden2d = hidden.reshape(batch * seq_len, hidden_size)
    order, src, targets, count = _compact_rows(labels, seq_len, shift, ignore_index)
    n_valid = int(count.item())
    compute_dtype = _compute_dtype(weight.dtype)
    n_rows = batch * (seq_len - shift)
    early = _early(reduction, need_dh, need_dw, need_db)
    lse = torch.zeros(n_rows, device=hidden.device, dtype=compute_dtype)
    per_row = torch.zeros(n_rows, device=hidden.device, dtype=compute_dtype)
    w = weight.to(compute_dtype)  # once, not per chunk: for a 16-bit head this is a full copy of it
    row_scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    dh, dw, db = _zero_grads(hidden2d, w, compute_dtype, *((need_dh, need_dw, need_db) if early else (False,) * 3))
    for start in range(0, n_valid, chunk_rows):
        stop = min(start + chunk_rows, n_valid)
        h = hidden2d[src[start:stop]].to(compute_dtype)
        z, t = _chunk_logits(h, w, bias, logit_softcap, compute_dtype)
        chunk_lse = torch.logsumexp(z, dim=-1)
        lse[start:stop] = chunk_lse
        per_row[start:stop] = chunk_lse - z.gather(1, targets[start:stop, None])[:, 0]
        if early:
            _add_chunk_gradients(z, t, chunk_lse, targets[start:stop], row_scale, src[start:stop], h, w, dh, dw, db)
        del z, t
    per_position = _scatter_rows(per_row, order, count, batch, seq_len, shift)
    if early:
        lse = hidden.new_empty(0, dtype=compute_dtype)
    dh = None if dh is None else dh.view(batch, seq_len, hidden_size)
    grads = [hidden.new_empty(0) if g is None else g for g in (dh, dw, db)]  # distinct empties: outputs never alias
    return (_reduce(per_position, reduction, count), order, src, targets, count, lse, *grads)


def _early(reduction, need_dh, need_dw, need_db):
    """Whether the PyTorch path and the GEMM variant take the gradients in the forward: "mean"/"sum" (the
    per-row upstream gradient is one number), and some gradient is needed."""
    return reduction != "none" and (need_dh or need_dw or need_db)


def _early_backward(grad_output, early_dh, early_dw, early_db, need_dh, need_dw, need_db):
    """The backward of a forward that took the gradients (:func:`_early`): they scaled by the incoming one."""
    factor = grad_output.float() if grad_output.dtype != torch.float64 else grad_output
    # d weight in its own dtype: an fp32 copy of a 16-bit (vocab, hidden) gradient would be gigabytes.
    return (early_dh * factor if need_dh else None, early_dw * factor.to(early_dw.dtype) if need_dw else None,
            early_db * factor if need_db else None)


def _add_chunk_gradients(z, t, chunk_lse, chunk_targets, row_scale, chunk_src, h, w, dh, dw, db):
    """Adds one chunk's ``(softmax - one_hot) * row_scale`` (through the soft-cap's tanh where ``t`` is given) to
    d hidden, d weight and d bias, each where it is not None. The softmax is computed in place of the logits ``z``."""
    dz = torch.exp(z.sub_(chunk_lse[:, None]))
    dz[torch.arange(dz.shape[0]), chunk_targets] -= 1.0
    if t is not None:
        dz.mul_(1.0 - t * t)
    dz.mul_(row_scale)
    if dh is not None:
        dh.index_add_(0, chunk_src, dz @ w)
    if dw is not None:
        dw.addmm_(dz.t(), h)
    if db is not None:
        db += dz.sum(0)


def _chunked_backward(grad_output, hidden, weight, bias, order, src, targets, count, lse, shift, reduction,
                      logit_softcap, chunk_rows, need_dh, need_dw, need_db):
    batch, seq_len, hidden_size = hidden.shape
    hidden2d = hidden.reshape(batch * seq_len, hidden_size)
    compute_dtype = _compute_dtype(weight.dtype)
    n_rows = batch * (seq_len - shift)
    n_valid = int(count.item())
    grad_rows = _grad_per_row(grad_output, reduction, count, order, shift, n_rows)
    w = weight.to(compute_dtype)
    dh, dw, db = _zero_grads(hidden2d, w, compute_dtype, need_dh, need_dw, need_db)
    for start in range(0, n_valid, chunk_rows):
        stop = min(start + chunk_rows, n_valid)
        h = hidden2d[src[start:stop]].to(compute_dtype)
        z, t = _chunk_logits(h, w, bias, logit_softcap, compute_dtype)
        _add_chunk_gradients(z, t, lse[start:stop], targets[start:stop], grad_rows[start:stop, None].to(compute_dtype),
                             src[start:stop], h, w, dh, dw, db)
        del z, t
    return dh, dw, db


# ---------------------------------------------------------------------------------------------------------------
# The GEMM variant: compacted rows, cuBLAS logits, Triton softmax in place, cuBLAS gradients
# ---------------------------------------------------------------------------------------------------------------

GEMM_CHUNK_ELEMENTS = 1 << 25  # fp32 logits per row chunk of the GEMM variant: 128 MiB (256 rows at 128K vocab)
VARIANTS = ("auto", "fused", "gemm")


def _gemm_chunks(h_valid, weight, bias, targets, softcap, chunk_rows, grads, row_scale, compute_dtype):
    """Per labelled row (lse, target logit) fp32, and the gradients named in ``grads`` (a subset of
    ``{"hidden", "weight", "bias"}``) of ``sum_r row_scale_r * loss_r``.

    Per chunk of rows: the logits by one GEMM (fp32 result), the Triton kernel writes the log-sum-exp and,
    in place, ``d loss / d logits``; then d hidden by one GEMM and d weight by one GEMM accumulated into its
    buffer (``addmm_``, no atomics). ``row_scale`` (fp32 ``(rows,)``, or a float) is applied after the 16-bit
    cast of ``d logits``: scaled first, small softmax entries would underflow in fp16."""
    n_valid = h_valid.shape[0]
    vocab = weight.shape[0]
    device = h_valid.device
    w = weight.to(compute_dtype)
    h_all = h_valid.to(compute_dtype)
    lse = torch.empty(n_valid, device=device, dtype=torch.float32)
    target_logit = torch.empty_like(lse)
    acc_dtype, dw_dtype = _accumulation_dtypes(compute_dtype)
    dh = torch.empty(n_valid, weight.shape[1], device=device, dtype=acc_dtype) if "hidden" in grads else None
    dw = torch.zeros(w.shape, device=device, dtype=dw_dtype) if "weight" in grads else None
    db = torch.zeros(vocab, device=device, dtype=acc_dtype) if "bias" in grads else None
    per_row = isinstance(row_scale, torch.Tensor)
    has_softcap = softcap is not None
    block_v = 128 if triton_interpreter_enabled() else 2048
    for start in range(0, n_valid, chunk_rows):
        stop = min(start + chunk_rows, n_valid)
        h = h_all[start:stop]
        z = matmul_fp32(h, w.t())
        d_logits = (z if compute_dtype == torch.float32 else torch.empty(z.shape, device=device, dtype=compute_dtype)) \
            if grads else z
        with launch_device(z):
            _mntp_row_softmax_kernel[(stop - start,)](
                z, d_logits, bias if bias is not None else z, targets[start:stop], lse[start:stop],
                target_logit[start:stop], vocab, z.stride(0), d_logits.stride(0),
                float(softcap) if has_softcap else 1.0, HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
                WRITE_GRAD=bool(grads), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
            )
        if grads:
            scale = row_scale[start:stop, None] if per_row else row_scale
            if dh is not None:
                dh[start:stop] = matmul_fp32(d_logits, w) * scale
            if dw is not None:
                rhs = (h.to(acc_dtype) * scale).to(compute_dtype) if per_row else h
                alpha = 1.0 if per_row else float(scale)
                if dw.dtype == compute_dtype:
                    dw.addmm_(d_logits.t(), rhs, alpha=alpha)
                else:  # fp16 operands into the fp32 buffer: one (vocab, hidden) fp32 product per chunk
                    dw.add_(matmul_fp32(d_logits.t(), rhs), alpha=alpha)
            if db is not None:
                db += (d_logits.to(acc_dtype) * scale).sum(0)
        del z, d_logits
    return lse, target_logit, dh, dw, db


def _accumulation_dtypes(compute_dtype):
    """(accumulation, d weight) dtypes of GEMMs on ``compute_dtype`` operands. d weight accumulates in place in
    bf16 for a bf16 head (as Liger does; cuBLAS adds in fp32 inside each GEMM, and bf16 has fp32's range), in fp32
    otherwise: in fp16, (1 / rows) x small softmax entries would underflow."""
    acc_dtype = _compute_dtype(compute_dtype)
    return acc_dtype, torch.bfloat16 if compute_dtype == torch.bfloat16 else acc_dtype


def _gemm_dtypes(hidden, weight):
    """(compute, accumulation, d weight) dtypes of the GEMM variant: 16-bit operands stay 16-bit on CUDA."""
    compute_dtype = weight.dtype if hidden.is_cuda else _compute_dtype(weight.dtype)
    return (compute_dtype, *_accumulation_dtypes(compute_dtype))


def _gemm_rows(hidden, weight, bias, src, targets, n_valid, logit_softcap, chunk_rows, needs, row_scale,
               dh_dtype=None):
    """:func:`_gemm_chunks` over the first ``n_valid`` compacted rows ``src`` of ``hidden``, for the gradients
    that ``needs`` (d hidden, d weight, d bias flags) asks for; d hidden scattered back to ``hidden``'s shape, in
    ``dh_dtype`` (default: the accumulation dtype): the full-size buffer of a 16-bit model need not be fp32."""
    batch, seq_len, hidden_size = hidden.shape
    hidden2d = hidden.reshape(batch * seq_len, hidden_size)
    src = src[:n_valid]
    grads = {name for name, needed in zip(("hidden", "weight", "bias"), needs) if needed}
    lse, target_logit, dh, dw, db = _gemm_chunks(hidden2d[src], weight, bias, targets[:n_valid], logit_softcap,
                                                 chunk_rows, grads, row_scale, _gemm_dtypes(hidden, weight)[0])
    if dh is not None:
        rows, dh = dh, torch.zeros(hidden2d.shape, device=dh.device, dtype=dh_dtype or dh.dtype)
        dh[src] = rows.to(dh.dtype)
        dh = dh.view(batch, seq_len, hidden_size)
    return lse, target_logit, dh, dw, db


def _gemm_forward(hidden, weight, bias, labels, shift, reduction, logit_softcap, ignore_index, chunk_rows,
                  need_dh, need_dw, need_db):
    """The GEMM variant's forward: the labelled rows compacted and counted (one host sync, ``count.item()``, as
    Cut Cross-Entropy does; none in the backward of "mean"/"sum"), then :func:`_gemm_chunks`. For "mean"/"sum"
    the gradients are taken here and returned (``early_*``: d hidden ``(batch, seq, hidden)`` and d bias in the
    accumulation dtype, d weight in its own) to be scaled by the incoming gradient in the backward; for "none"
    they are empty and the backward recomputes the logits (four GEMMs per chunk)."""
    batch, seq_len, _ = hidden.shape
    order, src, targets, count = _compact_rows(labels, seq_len, shift, ignore_index)
    n_valid = int(count.item())  # the variant's one host sync: the chunks are sized on the host
    needs = (need_dh, need_dw, need_db) if _early(reduction, need_dh, need_dw, need_db) else ()
    row_scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    lse, target_logit, *grads = _gemm_rows(hidden, weight, bias, src, targets, n_valid, logit_softcap, chunk_rows,
                                           needs, row_scale)
    n_rows = batch * (seq_len - shift)
    per_row = torch.zeros(n_rows, device=hidden.device, dtype=torch.float32)
    per_row[:n_valid] = lse - target_logit
    lse_all = torch.zeros_like(per_row)
    lse_all[:n_valid] = lse
    early = [hidden.new_empty(0) if g is None else g for g in grads]  # distinct empties: op outputs never alias
    per_position = _scatter_rows(per_row, order, count, batch, seq_len, shift)
    return (_reduce(per_position, reduction, count), order, src, targets, count, lse_all, *early)


def _gemm_backward(grad_output, hidden, weight, bias, order, src, targets, count, shift, reduction, logit_softcap,
                   chunk_rows, need_dh, need_dw, need_db):
    """The GEMM variant's backward of "none" (the others are :func:`_early_backward`): the per-position gradients
    are known only now, so the logits are recomputed (one more host sync)."""
    n_valid = int(count.item())
    n_rows = hidden.shape[0] * (hidden.shape[1] - shift)
    row_scale = _grad_per_row(grad_output, reduction, count, order, shift, n_rows)[:n_valid]
    _, _, dh, dw, db = _gemm_rows(hidden, weight.contiguous(), bias, src, targets, n_valid, logit_softcap,
                                  chunk_rows, (need_dh, need_dw, need_db), row_scale, hidden.dtype)
    return dh, dw, db


def masked_next_token_loss_reference(hidden, weight, labels, *, bias=None, shift=1, ignore_index=-100,
                                     reduction="mean", logit_softcap=None):
    """Plain PyTorch: full ``(batch, seq, vocab)`` logits, then cross-entropy. Same semantics as the fused op."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    batch, seq_len = labels.shape
    logits = logits[:, : seq_len - shift]
    target = labels[:, shift:]
    per_label = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float() if logits.dtype in (torch.float16, torch.bfloat16)
        else logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1), ignore_index=ignore_index, reduction="none",
    ).view(batch, seq_len - shift)
    per_position = per_label.new_zeros(batch, seq_len)
    per_position[:, shift:] = per_label
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    return per_position.sum() / (target != ignore_index).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# The torch custom ops (torch.compile sees two opaque ops with static output shapes; no graph break)
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("llm2vec_fast::masked_next_token_loss", mutates_args=())
def _mntp_forward_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, shift: int, ignore_index: int,
    reduction: str, logit_softcap: Optional[float], path: str, chunk_rows: int, grad_hidden: bool,
    grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, order, src, targets, count, lse, early_dh, early_dw, early_db)``: the loss and what the backward
    needs. Every output has a shape known from the inputs' shapes: the compaction's data-dependent count of
    labelled rows stays inside (a device scalar ``count``; the bookkeeping tensors at their full length
    ``batch * (seq - shift)``). ``early_*`` are the GEMM variant's forward-time gradients, empty elsewhere.
    ``hidden``: ``(batch, seq, hidden_size)`` in ``weight``'s dtype; ``labels`` int64 ``(batch, seq)``."""
    _check_labels(labels, weight.shape[0], ignore_index)
    hidden = hidden.contiguous()
    labels = labels.contiguous()
    empty = hidden.new_empty(0)
    if path == "fused":
        return (*_fused_forward(hidden, weight, bias, labels, shift, reduction, logit_softcap, ignore_index),
                empty, empty.clone(), empty.clone())
    if path == "gemm":
        return _gemm_forward(hidden, weight.contiguous(), bias, labels, shift, reduction, logit_softcap,
                             ignore_index, chunk_rows, grad_hidden, grad_weight, grad_bias)
    return _chunked_forward(hidden, weight, bias, labels, shift, reduction, logit_softcap, ignore_index, chunk_rows,
                            grad_hidden, grad_weight, grad_bias)


@_mntp_forward_op.register_fake
def _(hidden, weight, bias, labels, shift, ignore_index, reduction, logit_softcap, path, chunk_rows, grad_hidden,
      grad_weight, grad_bias):
    batch, seq_len, hidden_size = hidden.shape
    n_rows = batch * (seq_len - shift)
    dtype = _compute_dtype(weight.dtype) if path == "torch" else torch.float32  # of the loss and log-sum-exps
    loss = hidden.new_empty((batch, seq_len) if reduction == "none" else (), dtype=dtype)
    index = labels.new_empty(n_rows, dtype=torch.int64)
    count = labels.new_empty(1, dtype=torch.int32)
    lse = hidden.new_empty(n_rows, dtype=dtype)
    early = [hidden.new_empty(0) for _ in range(3)]
    if path in ("gemm", "torch") and _early(reduction, grad_hidden, grad_weight, grad_bias):
        _, acc_dtype, dw_dtype = _gemm_dtypes(hidden, weight) if path == "gemm" else (None, dtype, dtype)
        if path == "torch":
            lse = hidden.new_empty(0, dtype=dtype)
        if grad_hidden:
            early[0] = hidden.new_empty(hidden.shape, dtype=acc_dtype)
        if grad_weight:
            early[1] = weight.new_empty(weight.shape, dtype=dw_dtype)
        if grad_bias:
            early[2] = weight.new_empty(weight.shape[0], dtype=acc_dtype)
    return (loss, index, index.clone(), index.clone(), count, lse, *early)


@torch.library.custom_op("llm2vec_fast::masked_next_token_loss_backward", mutates_args=())
def _mntp_backward_op(
    grad_output: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], order: Tensor, src: Tensor,
    targets: Tensor, count: Tensor, lse: Tensor, early_dh: Tensor, early_dw: Tensor, early_db: Tensor, shift: int,
    reduction: str, logit_softcap: Optional[float], path: str, chunk_rows: int, grad_hidden: bool,
    grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d hidden, d weight, d bias)`` in the inputs' dtypes (each path gives them in its accumulation dtype); an
    empty tensor for each one not asked for."""
    hidden = hidden.contiguous()
    if path == "fused":
        grads = _fused_backward(grad_output, hidden, weight, bias, order, src, targets, count, lse, shift,
                                reduction, logit_softcap, grad_hidden, grad_weight, grad_bias)
    elif _early(reduction, grad_hidden, grad_weight, grad_bias):  # the GEMM variant's and the PyTorch path's
        grads = _early_backward(grad_output, early_dh, early_dw, early_db, grad_hidden, grad_weight, grad_bias)
    elif path == "gemm":
        grads = _gemm_backward(grad_output, hidden, weight, bias, order, src, targets, count, shift, reduction,
                               logit_softcap, chunk_rows, grad_hidden, grad_weight, grad_bias)
    else:
        grads = _chunked_backward(grad_output, hidden, weight, bias, order, src, targets, count, lse, shift,
                                  reduction, logit_softcap, chunk_rows, grad_hidden, grad_weight, grad_bias)
    return tuple(hidden.new_empty(0) if g is None else g.view(like.shape).to(like.dtype)
                 for g, like in zip(grads, (hidden, weight, bias)))


@_mntp_backward_op.register_fake
def _(grad_output, hidden, weight, bias, order, src, targets, count, lse, early_dh, early_dw, early_db, shift,
      reduction, logit_softcap, path, chunk_rows, grad_hidden, grad_weight, grad_bias):
    return (torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else hidden.new_empty(0),
            torch.empty_like(bias) if grad_bias else hidden.new_empty(0))


def _mntp_setup_context(ctx, inputs, output):
    hidden, weight, bias, _, shift, _, reduction, logit_softcap, path, chunk_rows, *needs = inputs
    _, order, src, targets, count, lse, early_dh, early_dw, early_db = output
    ctx.save_for_backward(hidden, weight, bias, order, src, targets, count, lse, early_dh, early_dw, early_db)
    ctx.config = (shift, reduction, logit_softcap, path, chunk_rows, *needs)
    ctx.mark_non_differentiable(order, src, targets, count, lse, early_dh, early_dw, early_db)


def _mntp_backward(ctx, grad_loss, *_):
    shift, reduction, logit_softcap, path, chunk_rows, need_dh, need_dw, need_db = ctx.config
    grads = torch.ops.llm2vec_fast.masked_next_token_loss_backward(
        grad_loss, *ctx.saved_tensors, shift, reduction, logit_softcap, path, chunk_rows, need_dh, need_dw, need_db)
    needs = (need_dh, need_dw, need_db)
    return (*(g if needed else None for g, needed in zip(grads, needs)),) + (None,) * 10


_mntp_forward_op.register_autograd(_mntp_backward, setup_context=_mntp_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------


def masked_next_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: int = 1,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_softcap: float | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
    variant: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, on labelled rows only, no full logits.

    Args:
        hidden: ``(batch, seq, hidden_size)`` last hidden states (before the LM head).
        weight: ``(vocab, hidden_size)`` LM head weight, possibly tied to the input embeddings.
        labels: ``(batch, seq)`` token ids, ``ignore_index`` everywhere but the positions to predict.
        bias: optional ``(vocab,)`` LM head bias.
        shift: the hidden state at position ``i - shift`` predicts the label at position ``i``; 1 is MNTP's
            (and causal LM's) alignment, 0 predicts each position from itself.
        reduction: ``"mean"`` over labelled positions (0 when there are none), ``"sum"``, or ``"none"``:
            fp32 ``(batch, seq)`` losses aligned with ``labels`` (0 where ignored or in the first ``shift``).
        logit_softcap: Gemma-2 style final soft-capping ``cap * tanh(logits / cap)``, or None.
        impl: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, chunked PyTorch elsewhere),
            ``"triton"`` or ``"torch"``.
        chunk_rows: rows per logits chunk on the PyTorch path (default: 8M logits elements per chunk) and in the
            GEMM variant (default: 32M fp32 logits, 128 MiB, per chunk).
        variant: the Triton path's algorithm. ``"fused"``: Triton kernels that never hold more than a tile of
            logits (atomics for the gradients) and never synchronise with the host. ``"gemm"``: the labelled
            rows compacted and counted (one host sync per call), then per row chunk a cuBLAS GEMM for the
            logits, a Triton kernel for the log-sum-exp and ``softmax - one_hot`` written in place, and cuBLAS
            GEMMs for d hidden and d weight (gradients taken in the forward for "mean"/"sum"). ``"auto"``: today
            ``"fused"``, to change only on a GPU measurement. The PyTorch path has one algorithm and ignores it.

    The loss is fp32 (float64 for float64 inputs); gradients come back in the inputs' dtypes.
    Labels outside ``[0, vocab)`` other than ``ignore_index`` raise ``ValueError`` (CPU) or trip a device-side
    assertion (CUDA; no host sync).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, seq, hidden_size), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be (vocab, hidden_size={hidden.shape[2]}), got shape {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be (batch, seq) = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor (int64 or int32), got {labels.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (vocab,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be a non-negative int, got {shift!r}")
    if logit_softcap is not None and not (logit_softcap > 0 and math.isfinite(logit_softcap)):
        raise ValueError(f"logit_softcap must be a positive number or None, got {logit_softcap!r}")
    if hidden.device != weight.device or labels.device != hidden.device or (
            bias is not None and bias.device != hidden.device):
        raise ValueError(
            f"hidden, weight, bias and labels must be on one device, got {hidden.device}, {weight.device}, "
            f"{None if bias is None else bias.device}, {labels.device}"
        )
    labels = labels.long()
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    batch, seq_len, _ = hidden.shape
    if seq_len <= shift or batch == 0:  # no (hidden, label) pair at all: a zero loss that still has a graph
        zero = (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
        if reduction == "none":
            return zero.expand(batch, seq_len).clone()
        return zero

    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    path = ("gemm" if variant == "gemm" else "fused") if use_triton(impl, hidden, weight, labels, bias) else "torch"
    if chunk_rows is None:
        chunk_rows = max(1, (CHUNK_ELEMENTS if path == "torch" else GEMM_CHUNK_ELEMENTS) // weight.shape[0])
    grad = torch.is_grad_enabled()
    outputs = torch.ops.llm2vec_fast.masked_next_token_loss(
        hidden, weight, bias, labels, shift, ignore_index, reduction,
        None if logit_softcap is None else float(logit_softcap), path, chunk_rows,
        grad and hidden.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad,
    )
    return outputs[0]


__all__ = [
    "masked_next_token_loss",
    "masked_next_token_loss_reference",
]
