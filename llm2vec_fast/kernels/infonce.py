"""Fused cosine-similarity InfoNCE (sentence-transformers' ``MultipleNegativesRankingLoss``, llm2vec's
``HardNegativeNLLLoss``).

For queries ``q`` ``(B, D)``, positives ``p`` ``(B, D)`` and optional hard negatives ``n`` ``(N, D)``, with
``docs = [p; n]`` ``(B + N, D)``::

    s[i, j] = scale * cos(q[i], docs[j])
    loss    = mean_i ( logsumexp_j s[i, j] - s[i, i] )

The ``(B, B + N)`` score matrix is never held:

* the forward is a GEMM whose epilogue is a streaming log-sum-exp: each program owns a block of query rows
  and a range of document columns, multiplies tiles with fp32 accumulation, applies the inverse norms
  (computed once per row) and the scale, and keeps only a running max and sum per row;
* the backward recomputes the scores one slab of ``ROWS_PER_SLAB`` query rows at a time, writes
  ``softmax - onehot`` for that slab only, and turns it into gradients with two GEMMs; memory is
  ``O((B + N) * D + ROWS_PER_SLAB * (B + N))``, linear in the batch.

The normalisation is folded into the kernels: with ``q^ = q / |q|`` and ``A = dL/dq^``, the gradient
``dL/dq = (A - (A . q^) q^) / |q|`` is applied per row after the GEMMs.

``impl="torch"`` (the CPU fallback) walks the same slabs with PyTorch matmuls; since each slab holds complete
rows, it takes the gradients in the forward (three GEMMs in all) and only scales them in the backward.
``variant="gemm"`` is that scheme on the Triton path: per slab, cuBLAS computes the scores (fp32 results from
16-bit operands), one Triton program per row takes the log-sum-exp and writes ``softmax - onehot``, and two
more cuBLAS GEMMs give the gradients. ``info_nce_loss_reference`` is the plain PyTorch formula that holds the
whole matrix, used to test all of them.

False negatives: with ``positive_ids`` (and ``negative_ids``), int64 identities of the texts (``text_hashes``),
every column whose id equals that of query i's own positive, other than that positive, gets score -inf in
query i's row in every path, forward and backward. The target column is never masked, so each row's
log-sum-exp stays finite; a row whose every other column is masked has loss 0.

Every pointer offset is computed in int64: ``row * stride`` passes 2^31 once (B + N) x D does.

Every path runs as the torch custom op ``torch.ops.llm2vec_fast.info_nce_loss`` (backward:
``info_nce_loss_backward``), with fake implementations and ``register_autograd``, so that it compiles with
``torch.compile(..., fullgraph=True)``. The gather across ranks (``_GatherWithGrad``, the shard-size check,
the all-reduce of the value) stays outside the op: compiled with ``gather_across_ranks``, it breaks the graph.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
import triton
import triton.language as tl

from ._dispatch import dot_precision as _dot_precision
from ._dispatch import launch_device, split_tiles, triton_interpreter_enabled, use_triton
from ._matmul import matmul_fp32

# The norm clamp of torch.nn.functional.normalize, which sentence-transformers' cos_sim uses.
NORM_EPS = 1e-12
# Query rows whose scores are recomputed together in the backward (and in the PyTorch forward).
ROWS_PER_SLAB = 1024

__all__ = ["info_nce_loss", "info_nce_loss_reference", "text_hashes"]


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _infonce_norm_kernel(X, RN, n_rows, dim, stride_x, EPS: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """RN[r] = 1 / max(|X[r]|, EPS), in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    # row * stride in int64: it passes 2^31 once (B + N) x D does (8 ranks x 128K docs at D 4096). Indices
    # themselves stay int32 (fewer registers in the tiles' compares).
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(0, dim, BLOCK_D):
        mask = (rows[:, None] < n_rows) & ((k + cols)[None, :] < dim)
        x = tl.load(x_rows + (k + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(acc), EPS)
    tl.store(RN + rows, inv, mask=rows < n_rows)

@triton.jit
def _score_tile(Q, DOCS, RQ, RD, rows, cols, n_rows, n_cols, dim, stride_q, stride_d, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """scale * cos(Q[rows], DOCS[cols]) as a (BLOCK_M, BLOCK_N) fp32 tile; D is walked in BLOCK_K steps.
    ``row * stride`` is taken in int64, so that it cannot wrap."""
    ks = tl.arange(0, BLOCK_K)
    q_rows = Q + rows.to(tl.int64)[:, None] * stride_q
    d_cols = DOCS + cols.to(tl.int64)[None, :] * stride_d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, dim, BLOCK_K):
        kk = k + ks
        q = tl.load(q_rows + kk[None, :], mask=(rows[:, None] < n_rows) & (kk[None, :] < dim), other=0.0)
        d = tl.load(d_cols + kk[:, None], mask=(cols[None, :] < n_cols) & (kk[:, None] < dim), other=0.0)
        acc = tl.dot(q, d, acc, input_precision=DOT_PRECISION)
    rq = tl.load(RQ + rows, mask=rows < n_rows, other=0.0)
    rd = tl.load(RD + cols, mask=cols < n_cols, other=0.0)
    return acc * (rq[:, None] * scale) * rd[None, :]

@triton.jit
def _duplicates_of_target(DOC_IDS, cols, n_cols, targets, target_ids):
    """(BLOCK_M, BLOCK_N) mask of the columns that are the same text as the row's own positive, the positive
    itself excepted: false negatives, left out of the row's softmax."""
    col_ids = tl.load(DOC_IDS + cols, mask=cols < n_cols, other=0)
    return (col_ids[None, :] == target_ids[:, None]) & (cols[None, :] != targets[:, None])

@triton.jit
def _infonce_fwd_kernel(Q, DOCS, RQ, RD, DOC_IDS, MAX_OUT, SUM_OUT, TARGET_OUT, n_rows, n_cols, dim, stride_q,
                        stride_d, label_offset, scale, tiles_per_split, HAS_IDS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Partial (running max, sum of exp, target score) of one row block over one range of column tiles."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    targets = rows + label_offset
    target_ids = tl.zeros((BLOCK_M,), dtype=tl.int64)
    if HAS_IDS:
        target_ids = tl.load(DOC_IDS + targets, mask=rows < n_rows, other=0)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_tile = split * tiles_per_split
    for tile in range(first_tile, first_tile + tiles_per_split):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _score_tile(Q, DOCS, RQ, RD, rows, cols, n_rows, n_cols, dim, stride_q, stride_d, scale,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        s = tl.where(cols[None, :] < n_cols, s, float("-inf"))
        if HAS_IDS:
            s = tl.where(_duplicates_of_target(DOC_IDS, cols, n_cols, targets, target_ids), float("-inf"), s)
        target += tl.sum(tl.where(cols[None, :] == targets[:, None], s, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        # A row whose tiles so far are all padding keeps max -inf; shift by 0 there to avoid inf - inf.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(s - safe_max[:, None]), axis=1)
        running_max = new_max
    out = split * n_rows + rows
    tl.store(MAX_OUT + out, running_max, mask=rows < n_rows)
    tl.store(SUM_OUT + out, running_sum, mask=rows < n_rows)
    tl.store(TARGET_OUT + out, target, mask=rows < n_rows)

@triton.jit
def _infonce_bwd_kernel(Q, DOCS, RQ, RD, DOC_IDS, LSE, SLAB, n_rows, n_cols, dim, stride_q, stride_d, stride_slab,
                        label_offset, scale, HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """SLAB[i, j] = softmax(s)[i, j] - [j == i + label_offset] for the slab's rows, recomputing s."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    targets = rows + label_offset
    s = _score_tile(Q, DOCS, RQ, RD, rows, cols, n_rows, n_cols, dim, stride_q, stride_d, scale,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    if HAS_IDS:
        target_ids = tl.load(DOC_IDS + targets, mask=rows < n_rows, other=0)
        s = tl.where(_duplicates_of_target(DOC_IDS, cols, n_cols, targets, target_ids), float("-inf"), s)
    lse = tl.load(LSE + rows, mask=rows < n_rows, other=0.0)
    h = tl.exp(s - lse[:, None]) - tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(SLAB + rows.to(tl.int64)[:, None] * stride_slab + cols[None, :], h.to(SLAB.dtype.element_ty),
             mask=mask)

@triton.jit
def _row_scores(s_row, DOC_IDS, cols, n_cols, target, target_id, HAS_IDS: tl.constexpr):
    """One block of a score row, -inf past the end and at the target's duplicates."""
    s = tl.load(s_row + cols, mask=cols < n_cols, other=float("-inf"))
    if HAS_IDS:
        ids = tl.load(DOC_IDS + cols, mask=cols < n_cols, other=0)
        s = tl.where((ids == target_id) & (cols != target), float("-inf"), s)
    return s

@triton.jit
def _infonce_row_softmax_kernel(S, OUT, DOC_IDS, LSE, TARGET, n_cols, stride_s, stride_out, label_offset,
                                HAS_IDS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """The GEMM variant's epilogue, one program per query row of a slab of fp32 scores S ``(rows, n_cols)``
    that cuBLAS computed: the row's log-sum-exp and target score, and with ``WRITE_GRAD``
    ``OUT[i, j] = softmax(s)[i, j] - [j == target]`` (OUT may be S itself)."""
    row = tl.program_id(0).to(tl.int64)
    target = row + label_offset
    s_row = S + row * stride_s
    target_id = tl.load(DOC_IDS + target) if HAS_IDS else 0
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Lane-wise running (max, sum): one pass over the row, merged across lanes at the end.
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        s = _row_scores(s_row, DOC_IDS, cols, n_cols, target, target_id, HAS_IDS)
        new_max = tl.maximum(running_max, s)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.exp(s - safe_max)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)  # finite: the target column is never masked
    lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
    tl.store(LSE + row, lse)
    tl.store(TARGET + row, tl.load(s_row + target))
    if WRITE_GRAD:
        out_row = OUT + row * stride_out
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            s = _row_scores(s_row, DOC_IDS, cols, n_cols, target, target_id, HAS_IDS)
            h = tl.exp(s - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(out_row + cols, h.to(OUT.dtype.element_ty), mask=cols < n_cols)


def _block_sizes(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if triton_interpreter_enabled():
        return 32, 32, 32, 1, 1  # the interpreter runs numpy per op: few, small tiles keep it quick
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 64, 64, 4, 3


def _inverse_norms(x: torch.Tensor, triton_path: bool) -> torch.Tensor:
    """1 / max(|x_r|, eps) per row, fp32 ``(rows,)``."""
    if not triton_path:
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal()
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    block_r = 16
    block_d = min(256, triton.next_power_of_2(x.shape[1]))
    with launch_device(x):
        _infonce_norm_kernel[(triton.cdiv(x.shape[0], block_r),)](
            x, out, x.shape[0], x.shape[1], x.stride(0), EPS=NORM_EPS, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def _forward_triton(q, docs, rq, rd, doc_ids, scale, label_offset):
    """Per-row (logsumexp, target score) in fp32, ``(B,)`` each."""
    n_rows, dim = q.shape
    n_cols = docs.shape[0]
    block_m, block_n, block_k, warps, stages = _block_sizes(q.dtype)
    row_blocks = triton.cdiv(n_rows, block_m)
    col_tiles = triton.cdiv(n_cols, block_n)
    splits, tiles_per_split = split_tiles(row_blocks, col_tiles, q.device, programs_per_sm=2)
    partial = torch.empty(3, splits, n_rows, device=q.device, dtype=torch.float32)
    with launch_device(q):
        _infonce_fwd_kernel[(row_blocks, splits)](
            q, docs, rq, rd, doc_ids if doc_ids is not None else rq, partial[0], partial[1], partial[2], n_rows,
            n_cols, dim, q.stride(0), docs.stride(0), label_offset, float(scale), tiles_per_split,
            HAS_IDS=doc_ids is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    maxima, sums, targets = partial
    lse = torch.logsumexp(maxima + sums.log(), dim=0)
    return lse, targets.sum(dim=0)


def _slab_triton(q, docs, rq, rd, doc_ids, lse, scale, label_offset, slab_dtype):
    n_rows, dim = q.shape
    n_cols = docs.shape[0]
    block_m, block_n, block_k, warps, stages = _block_sizes(q.dtype)
    slab = torch.empty(n_rows, n_cols, device=q.device, dtype=slab_dtype)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    with launch_device(q):
        _infonce_bwd_kernel[grid](
            q, docs, rq, rd, doc_ids if doc_ids is not None else rq, lse, slab, n_rows, n_cols, dim, q.stride(0),
            docs.stride(0), slab.stride(0), label_offset, float(scale), HAS_IDS=doc_ids is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=warps, num_stages=stages)
    return slab


# --------------------------------------------------------------------------------------------------------------------
# The slab paths that take the gradients in the forward: PyTorch (CPU fallback) and the GEMM variant
# --------------------------------------------------------------------------------------------------------------------
def _project_out_radial(grad_unit: torch.Tensor, x: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """d/dx of a loss given its gradient w.r.t. x / max(|x|, eps): ``(g - (g . x^) x^) / |x|``, fp32."""
    unit = x.float() * inv_norm[:, None]
    radial = (grad_unit * unit).sum(dim=1, keepdim=True)
    # Rows clamped at eps are scaled, not normalised: no radial term there (as autograd through normalize).
    radial = radial * (inv_norm < 1.0 / NORM_EPS).float()[:, None]
    return (grad_unit - radial * unit) * inv_norm[:, None]


def _softmax_torch(s, doc_ids, label_offset, want_grad, grad_dtype):
    """(lse, target, softmax - onehot or None) of a slab of fp32 scores, with the targets' duplicates masked."""
    rows = torch.arange(s.shape[0], device=s.device)
    cols = rows + label_offset
    if doc_ids is not None:
        s.masked_fill_(_duplicate_mask(doc_ids, cols), float("-inf"))
    lse = torch.logsumexp(s, dim=1)
    target = s[rows, cols]
    if not want_grad:
        return lse, target, None
    h = s.sub_(lse[:, None]).exp_()  # softmax, in place of the scores
    h[rows, cols] -= 1.0
    return lse, target, h.to(grad_dtype)


def _softmax_triton(s, doc_ids, label_offset, want_grad, grad_dtype):
    """The same in one Triton program per row; ``softmax - onehot`` is written over the scores when fp32."""
    n_rows, n_cols = s.shape
    lse = torch.empty(n_rows, device=s.device, dtype=torch.float32)
    target = torch.empty_like(lse)
    h = (s if grad_dtype == torch.float32 else torch.empty(s.shape, device=s.device, dtype=grad_dtype)) \
        if want_grad else s
    block_n = 128 if triton_interpreter_enabled() else min(2048, triton.next_power_of_2(n_cols))
    with launch_device(s):
        _infonce_row_softmax_kernel[(n_rows,)](
            s, h, doc_ids if doc_ids is not None else lse, lse, target, n_cols, s.stride(0), h.stride(0),
            label_offset, HAS_IDS=doc_ids is not None, WRITE_GRAD=want_grad, BLOCK_N=block_n,
            num_warps=4 if block_n >= 1024 else 2)
    return lse, target, (h if want_grad else None)


def _loss_and_grads_in_slabs(q, docs, rq, rd, doc_ids, scale, label_offset, total_rows, want_grad, softmax,
                             compute_dtype):
    """Per-row (logsumexp, target score), and with ``want_grad`` the gradients of ``sum(lse - target) /
    total_rows``, fp32. One slab of query rows at a time: every slab holds complete rows of the score matrix,
    so its softmax is final and the gradients are taken there and then (three GEMMs, like the plain formula,
    instead of recomputing the scores in the backward). ``softmax`` is ``_softmax_torch`` or
    ``_softmax_triton``; the GEMMs take ``compute_dtype`` operands and give fp32 results."""
    unit_docs = (docs.float() * rd[:, None]).to(compute_dtype)
    lse = torch.empty(q.shape[0], device=q.device, dtype=torch.float32)
    target = torch.empty_like(lse)
    grad_q = torch.empty(q.shape, device=q.device, dtype=torch.float32) if want_grad else None
    grad_unit_docs = torch.zeros(docs.shape, device=docs.device, dtype=torch.float32) if want_grad else None
    for start in range(0, q.shape[0], ROWS_PER_SLAB):
        stop = min(start + ROWS_PER_SLAB, q.shape[0])
        unit_q = (q[start:stop].float() * rq[start:stop, None]).to(compute_dtype)
        s = matmul_fp32(unit_q * scale, unit_docs.T)
        lse[start:stop], target[start:stop], h = softmax(s, doc_ids, label_offset + start, want_grad, compute_dtype)
        if want_grad:
            grad_q[start:stop] = _project_out_radial(matmul_fp32(h, unit_docs), q[start:stop], rq[start:stop])
            grad_unit_docs += matmul_fp32(h.T, unit_q)
        del s, h
    if not want_grad:
        return lse, target, None, None
    factor = scale / total_rows
    grad_q *= factor
    grad_docs = _project_out_radial(grad_unit_docs * factor, docs, rd)
    return lse, target, grad_q, grad_docs


def _duplicate_mask(doc_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)``: True where column j is the same text as the row's target column, the target excepted."""
    cols = torch.arange(doc_ids.shape[0], device=doc_ids.device)
    return (doc_ids[None, :] == doc_ids[targets][:, None]) & (cols[None, :] != targets[:, None])


VARIANTS = ("auto", "fused", "gemm")


# --------------------------------------------------------------------------------------------------------------------
# The torch custom ops (torch.compile sees two opaque ops with static output shapes; no graph break)
# --------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("llm2vec_fast::info_nce_loss", mutates_args=())
def _info_nce_forward_op(queries: Tensor, docs: Tensor, doc_ids: Optional[Tensor], scale: float, label_offset: int,
                         total_rows: int, path: str, want_grad: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, rq, rd, lse, grad_q, grad_docs)``: the sum over this process's query rows of
    ``logsumexp_j s[i, j] - s[i, i + label_offset]``, divided by ``total_rows`` (0-dim fp32), and what the
    backward needs: the fp32 inverse norms ``(B,)``, ``(M,)`` and per-row log-sum-exps ``(B,)``; with
    ``want_grad`` on the slab paths ("torch", "gemm"), which take the gradients in the forward, the fp32
    gradients ``(B, D)``, ``(M, D)`` of the loss, empty otherwise. ``path``: ``"fused"`` (Triton: streaming
    forward, backward recomputing the scores slab by slab), ``"gemm"`` (cuBLAS GEMMs, row softmax in Triton) or
    ``"torch"`` (the same scheme in PyTorch, fp32)."""
    triton_path = path != "torch"
    rq = _inverse_norms(queries, triton_path)
    rd = _inverse_norms(docs, triton_path)
    empty = [queries.new_empty(0, dtype=torch.float32) for _ in range(2)]
    if path == "fused":
        lse, target = _forward_triton(queries, docs, rq, rd, doc_ids, scale, label_offset)
        grads = empty
    else:
        softmax = _softmax_triton if path == "gemm" else _softmax_torch
        # The GEMM variant keeps 16-bit operands on CUDA (tensor cores, fp32 results); elsewhere fp32.
        compute_dtype = queries.dtype if (path == "gemm" and queries.is_cuda) else torch.float32
        lse, target, grad_q, grad_docs = _loss_and_grads_in_slabs(
            queries, docs, rq, rd, doc_ids, scale, label_offset, total_rows, want_grad, softmax, compute_dtype)
        grads = [grad_q, grad_docs] if want_grad else empty
    return ((lse - target).sum() / total_rows, rq, rd, lse, *grads)


@_info_nce_forward_op.register_fake
def _(queries, docs, doc_ids, scale, label_offset, total_rows, path, want_grad):
    f32 = dict(dtype=torch.float32)
    slab_grads = want_grad and path != "fused"
    return (queries.new_empty((), **f32), queries.new_empty(queries.shape[0], **f32),
            docs.new_empty(docs.shape[0], **f32), queries.new_empty(queries.shape[0], **f32),
            queries.new_empty(queries.shape if slab_grads else (0,), **f32),
            docs.new_empty(docs.shape if slab_grads else (0,), **f32))


@torch.library.custom_op("llm2vec_fast::info_nce_loss_backward", mutates_args=())
def _info_nce_backward_op(grad_loss: Tensor, queries: Tensor, docs: Tensor, doc_ids: Optional[Tensor], rq: Tensor,
                          rd: Tensor, lse: Tensor, grad_q: Tensor, grad_docs: Tensor, scale: float, label_offset: int,
                          total_rows: int, path: str) -> tuple[Tensor, Tensor]:
    """``(d queries, d docs)`` in the inputs' dtypes."""
    grad_loss = grad_loss.float()
    if path != "fused":
        return (grad_q * grad_loss).to(queries.dtype), (grad_docs * grad_loss).to(docs.dtype)
    compute_dtype = queries.dtype
    # softmax - onehot lies in [-1, 1]; 16-bit inputs keep 16-bit slabs so that the GEMMs use tensor cores.
    unit_docs = (docs.float() * rd[:, None]).to(compute_dtype)
    grad_queries = torch.empty(queries.shape, device=queries.device, dtype=torch.float32)
    grad_unit_docs = torch.zeros(docs.shape, device=docs.device, dtype=torch.float32)
    factor = grad_loss * scale / total_rows
    for start in range(0, queries.shape[0], ROWS_PER_SLAB):
        stop = min(start + ROWS_PER_SLAB, queries.shape[0])
        q = queries[start:stop]
        slab = _slab_triton(q, docs, rq[start:stop], rd, doc_ids, lse[start:stop], scale, label_offset + start,
                            compute_dtype)
        grad_unit_q = (slab @ unit_docs).float() * factor
        grad_queries[start:stop] = _project_out_radial(grad_unit_q, q, rq[start:stop])
        unit_q = (q.float() * rq[start:stop, None]).to(compute_dtype)
        grad_unit_docs += (slab.T @ unit_q).float()
        del slab
    grad_docs = _project_out_radial(grad_unit_docs * factor, docs, rd)
    return grad_queries.to(queries.dtype), grad_docs.to(docs.dtype)


@_info_nce_backward_op.register_fake
def _(grad_loss, queries, docs, doc_ids, rq, rd, lse, grad_q, grad_docs, scale, label_offset, total_rows, path):
    return torch.empty_like(queries), torch.empty_like(docs)


def _info_nce_setup_context(ctx, inputs, output):
    queries, docs, doc_ids, scale, label_offset, total_rows, path, _ = inputs
    _, rq, rd, lse, grad_q, grad_docs = output
    ctx.save_for_backward(queries, docs, doc_ids, rq, rd, lse, grad_q, grad_docs)
    ctx.config = (scale, label_offset, total_rows, path)
    ctx.mark_non_differentiable(rq, rd, lse, grad_q, grad_docs)


def _info_nce_backward(ctx, grad_loss, *_):
    grad_q, grad_docs = torch.ops.llm2vec_fast.info_nce_loss_backward(grad_loss, *ctx.saved_tensors, *ctx.config)
    return grad_q, grad_docs, None, None, None, None, None, None


_info_nce_forward_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# Gathering across ranks
# --------------------------------------------------------------------------------------------------------------------
class _GatherWithGrad(torch.autograd.Function):
    """All-gather of equal-sized shards along dim 0; backward sums every rank's gradient for this rank's shard."""

    @staticmethod
    def forward(ctx, shard):
        world = dist.get_world_size()
        out = torch.empty((world * shard.shape[0], *shard.shape[1:]), device=shard.device, dtype=shard.dtype)
        # all_gather_single is the newer name (torch >= 2.12) of all_gather_into_tensor.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, shard.contiguous())
        ctx.rows = shard.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        rank = dist.get_rank()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.rows, *grad.shape[1:]), device=grad.device, dtype=grad.dtype)
            scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            scatter(out, grad)
            return out
        grad = grad.clone()  # all_reduce works in place: autograd's incoming gradient must stay untouched
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows]


def _check_equal_shards(sizes: list[int], device: torch.device) -> None:
    # On the tensors' own device: NCCL needs CUDA tensors, and the current CUDA device may not be theirs.
    local = torch.tensor(sizes, dtype=torch.long, device=device if dist.get_backend() == "nccl" else "cpu")
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()
    if not bool((table == table[0]).all()):
        raise ValueError(
            "gather_across_ranks needs the same number of queries and of negatives on every rank, and ids on all "
            "ranks or none; got (queries, negatives, has ids) per rank = "
            f"{[tuple(row.tolist()) for row in table]}")


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def _validate(queries, positives, negatives, scale):
    for name, t in (("queries", queries), ("positives", positives), ("negatives", negatives)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if queries.shape[0] == 0:
        raise ValueError("info_nce_loss got an empty batch (0 queries)")
    if queries.shape[1] == 0:
        raise ValueError("info_nce_loss got embeddings of dimension 0")
    if positives.shape != queries.shape:
        raise ValueError(f"positives must have the queries' shape {tuple(queries.shape)}, got {tuple(positives.shape)}")
    if negatives is not None and negatives.shape[1] != queries.shape[1]:
        raise ValueError(f"negatives must have dimension {queries.shape[1]} like the queries, got {negatives.shape[1]}")
    tensors = [t for t in (queries, positives, negatives) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"queries, positives and negatives must share a dtype, got {[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"queries, positives and negatives must be on one device, got {[t.device for t in tensors]}")
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a Python number (a learnable temperature is not supported)")
    if not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")


def _validate_ids(ids, name, rows, device):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 text hashes (see text_hashes), got "
                        f"{type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (see text_hashes), got {ids.dtype}")
    if ids.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), one id per row, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} must be on the embeddings' device {device}, got {ids.device}")


def _document_ids(queries, negatives, positive_ids, negative_ids):
    """The ids of the document columns ``[positives; negatives]`` ``(B + N,)`` int64, or None."""
    n_neg = 0 if negatives is None else negatives.shape[0]
    if positive_ids is None:
        if negative_ids is not None:
            raise ValueError("negative_ids needs positive_ids: a false negative is a duplicate of a query's positive")
        return None
    _validate_ids(positive_ids, "positive_ids", queries.shape[0], queries.device)
    if negative_ids is None:
        if n_neg:
            raise ValueError(f"positive_ids was given with {n_neg} negatives but negative_ids was not: every "
                             "document column needs its id")
        return positive_ids
    _validate_ids(negative_ids, "negative_ids", n_neg, queries.device)
    return torch.cat([positive_ids, negative_ids])


def text_hashes(texts) -> torch.Tensor:
    """Stable int64 ids of texts for ``info_nce_loss``'s ``positive_ids`` / ``negative_ids``: the first 8 bytes
    of BLAKE2b of the UTF-8 text (the same in every process and run, unlike Python's salted ``hash``). Equal
    texts get equal ids; two different texts collide with probability about ``n^2 / 2^65``.

    Args:
        texts: a sequence of ``str``.

    Returns:
        ``(len(texts),)`` int64 CPU tensor.
    """
    if isinstance(texts, str):
        raise TypeError("text_hashes takes a sequence of texts, got a single str")
    values = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text_hashes: item {i} is {type(text).__name__}, not str")
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        values.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(values, dtype=torch.int64)


def info_nce_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    scale: float = 20.0,
    gather_across_ranks: bool = False,
    impl: str = "auto",
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    variant: str = "auto",
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Cosine-similarity InfoNCE: query i's target is column i of ``[positives; negatives]``.

    Args:
        queries: ``(B, D)`` float32/float16/bfloat16.
        positives: ``(B, D)``, same dtype and device.
        negatives: optional ``(N, D)`` hard negatives, shared by all queries as extra columns.
        scale: multiplies the cosine similarity (20.0 is temperature 0.05; llm2vec's supervised stage uses 50).
        gather_across_ranks: all-gather queries' documents across ``torch.distributed`` ranks, so every query
            is scored against the global batch's positives and negatives; query i of rank r targets column
            ``r * B + i``. Every rank must hold the same B and N. The returned value is the loss over the
            global batch (the same on every rank, as llm2vec computes it); each rank's backward gives its own
            rows exactly the gradient of that global loss. Under DDP, which averages gradients over ranks,
            this is llm2vec's ``HardNegativeNLLLoss`` gradient; multiply the loss by the world size for
            sentence-transformers' ``gather_across_devices`` convention (the sum over ranks).
        impl: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else PyTorch), ``"triton"``, ``"torch"``.
        positive_ids: optional ``(B,)`` int64 identity of each positive's text (``text_hashes``), on the
            embeddings' device. With it, a document column with the same id as query i's positive (another
            row's positive or a hard negative that is the same text: a false negative) is left out of query
            i's softmax; query i's own positive stays. Gathered across ranks with the embeddings.
        negative_ids: ``(N,)`` int64 ids of the negatives; required with ``positive_ids`` when there are
            negatives.
        variant: the Triton path's algorithm: ``"fused"`` (a Triton GEMM with a streaming log-sum-exp forward;
            the backward recomputes the scores slab by slab), ``"gemm"`` (per slab of rows three cuBLAS GEMMs,
            the row softmax in Triton, gradients taken in the forward), or ``"auto"`` (today ``"fused"``; to
            change only on a GPU measurement). The PyTorch path has one algorithm and ignores it.
        matryoshka_dims: optional leading dimensions ``d`` (sentence-transformers' ``MatryoshkaLoss``): the loss
            is then the sum over ``d`` of ``weight_d *`` the loss on the embeddings' first ``d`` dimensions (the
            cosine of the truncated vectors). The documents and ids are gathered across ranks once, at full
            dimension, and truncated per ``d``; the global value is reduced once.
        matryoshka_weights: one weight per ``matryoshka_dims`` entry (default 1 each).

    Returns:
        a 0-dim float32 tensor, the mean over queries of the cross-entropy. Rows whose every document but the
        positive is masked contribute 0 (finite).
    """
    _validate(queries, positives, negatives, scale)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    doc_ids = _document_ids(queries, negatives, positive_ids, negative_ids)
    triton_path = use_triton(impl, queries, positives, negatives)
    path = ("gemm" if variant == "gemm" else "fused") if triton_path else "torch"
    label_offset, total_rows = 0, queries.shape[0]
    if gather_across_ranks:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("gather_across_ranks=True needs an initialised torch.distributed process group")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world > 1:
            _check_equal_shards([queries.shape[0], 0 if negatives is None else negatives.shape[0],
                                 int(doc_ids is not None)], queries.device)
            n_pos = queries.shape[0]
            positives = _GatherWithGrad.apply(positives)
            if negatives is not None:
                negatives = _GatherWithGrad.apply(negatives)
            if doc_ids is not None:
                # Columns are [all ranks' positives; all ranks' negatives]: the ids go through the same gathers.
                parts = (doc_ids[:n_pos], doc_ids[n_pos:]) if negatives is not None else (doc_ids,)
                doc_ids = torch.cat([_GatherWithGrad.apply(part) for part in parts])
            label_offset, total_rows = rank * queries.shape[0], world * queries.shape[0]
    docs = positives if negatives is None or negatives.shape[0] == 0 else torch.cat([positives, negatives], dim=0)
    want_grad = torch.is_grad_enabled() and (queries.requires_grad or docs.requires_grad)
    doc_ids = None if doc_ids is None else doc_ids.contiguous()
    loss = None
    for dim, weight in _matryoshka_terms(matryoshka_dims, matryoshka_weights, queries.shape[1]):
        q, d = (queries, docs) if dim is None else (queries[:, :dim], docs[:, :dim])
        term = torch.ops.llm2vec_fast.info_nce_loss(q.contiguous(), d.contiguous(), doc_ids, float(scale),
                                                    label_offset, total_rows, path, want_grad)[0]
        term = term if weight is None else weight * term
        loss = term if loss is None else loss + term
    if total_rows != queries.shape[0]:
        # This rank's share of the global loss carries the gradient; the value becomes the global loss.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        loss = loss + (global_loss - loss.detach())
    return loss


def _matryoshka_terms(dims, weights, size):
    """``[(dim, weight)]`` of the loss's terms: ``[(None, None)]`` (the whole embedding, unweighted) without
    ``dims``."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights were given without matryoshka_dims")
        return [(None, None)]
    dims = list(dims)
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if not dims or len(weights) != len(dims):
        raise ValueError(f"matryoshka_dims needs at least one dim and one weight per dim, got dims {dims}, "
                         f"weights {weights}")
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= size:
            raise ValueError(f"matryoshka_dims must be ints in [1, {size}] (the embedding size), got {dims}")
    return list(zip(dims, weights))


def info_nce_loss_reference(queries, positives, negatives=None, *, scale=20.0, positive_ids=None,
                            negative_ids=None):
    """The plain formula (sentence-transformers' cos_sim + cross_entropy), holding the whole ``(B, B + N)``
    matrix; computed in the inputs' dtype, or in float64 for float64 inputs. With ids, the targets'
    duplicates are set to -inf before the cross-entropy."""
    docs = positives if negatives is None else torch.cat([positives, negatives], dim=0)
    scores = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(docs, dim=1).T * scale
    labels = torch.arange(queries.shape[0], device=queries.device)
    scores = scores.float() if scores.dtype != torch.float64 else scores
    if positive_ids is not None:
        doc_ids = positive_ids if negative_ids is None else torch.cat([positive_ids, negative_ids])
        scores = scores.masked_fill(_duplicate_mask(doc_ids, labels), float("-inf"))
    return torch.nn.functional.cross_entropy(scores, labels)
