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
rows, it takes the gradients in the forward (three GEMMs in all) and only scales them in the backward;
``info_nce_loss_reference`` is the plain PyTorch formula that holds the whole matrix, used to test both.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import launch_device, triton_interpreter_enabled, use_triton

import triton
import triton.language as tl

# The norm clamp of torch.nn.functional.normalize, which sentence-transformers' cos_sim uses.
NORM_EPS = 1e-12
# Query rows whose scores are recomputed together in the backward (and in the PyTorch forward).
ROWS_PER_SLAB = 1024

__all__ = ["info_nce_loss", "info_nce_loss_reference", "InfoNCEFunction"]


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _infonce_norm_kernel(X, RN, n_rows, dim, stride_x, EPS: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        """RN[r] = 1 / max(|X[r]|, EPS), in fp32."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(0, dim, BLOCK_D):
            mask = (rows[:, None] < n_rows) & ((k + cols)[None, :] < dim)
            x = tl.load(X + rows[:, None] * stride_x + (k + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(x * x, axis=1)
        inv = 1.0 / tl.maximum(tl.sqrt(acc), EPS)
        tl.store(RN + rows, inv, mask=rows < n_rows)

    @triton.jit
    def _score_tile(Q, DOCS, RQ, RD, rows, cols, n_rows, n_cols, dim, stride_q, stride_d, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """scale * cos(Q[rows], DOCS[cols]) as a (BLOCK_M, BLOCK_N) fp32 tile; D is walked in BLOCK_K steps."""
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, dim, BLOCK_K):
            kk = k + ks
            q = tl.load(Q + rows[:, None] * stride_q + kk[None, :],
                        mask=(rows[:, None] < n_rows) & (kk[None, :] < dim), other=0.0)
            d = tl.load(DOCS + cols[None, :] * stride_d + kk[:, None],
                        mask=(cols[None, :] < n_cols) & (kk[:, None] < dim), other=0.0)
            acc = tl.dot(q, d, acc, input_precision=DOT_PRECISION)
        rq = tl.load(RQ + rows, mask=rows < n_rows, other=0.0)
        rd = tl.load(RD + cols, mask=cols < n_cols, other=0.0)
        return acc * (rq[:, None] * scale) * rd[None, :]

    @triton.jit
    def _infonce_fwd_kernel(Q, DOCS, RQ, RD, MAX_OUT, SUM_OUT, TARGET_OUT, n_rows, n_cols, dim, stride_q, stride_d,
                            label_offset, scale, tiles_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Partial (running max, sum of exp, target score) of one row block over one range of column tiles."""
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        targets = rows + label_offset
        running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        target = tl.zeros((BLOCK_M,), dtype=tl.float32)
        first_tile = split * tiles_per_split
        for tile in range(first_tile, first_tile + tiles_per_split):
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            s = _score_tile(Q, DOCS, RQ, RD, rows, cols, n_rows, n_cols, dim, stride_q, stride_d, scale,
                            BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
            s = tl.where(cols[None, :] < n_cols, s, float("-inf"))
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
    def _infonce_bwd_kernel(Q, DOCS, RQ, RD, LSE, SLAB, n_rows, n_cols, dim, stride_q, stride_d, stride_slab,
                            label_offset, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
        """SLAB[i, j] = softmax(s)[i, j] - [j == i + label_offset] for the slab's rows, recomputing s."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _score_tile(Q, DOCS, RQ, RD, rows, cols, n_rows, n_cols, dim, stride_q, stride_d, scale,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        lse = tl.load(LSE + rows, mask=rows < n_rows, other=0.0)
        h = tl.exp(s - lse[:, None]) - tl.where(cols[None, :] == (rows + label_offset)[:, None], 1.0, 0.0)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        tl.store(SLAB + rows[:, None] * stride_slab + cols[None, :], h.to(SLAB.dtype.element_ty), mask=mask)


def _block_sizes(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if triton_interpreter_enabled():
        return 32, 32, 32, 1, 1  # the interpreter runs numpy per op: few, small tiles keep it quick
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 64, 64, 4, 3


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products (the default, tf32, would cost three digits); 16-bit inputs use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


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


def _column_splits(n_row_blocks: int, n_col_tiles: int, device: torch.device) -> int:
    """Split the columns over programs when there are too few row blocks to fill the GPU."""
    if triton_interpreter_enabled() or device.type != "cuda":
        return min(2, n_col_tiles)  # exercise the partial-result merge in tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(2 * sms, n_row_blocks)
    return max(1, min(wanted, n_col_tiles))


def _forward_triton(q, docs, rq, rd, scale, label_offset):
    """Per-row (logsumexp, target score) in fp32, ``(B,)`` each."""
    n_rows, dim = q.shape
    n_cols = docs.shape[0]
    block_m, block_n, block_k, warps, stages = _block_sizes(q.dtype)
    row_blocks = triton.cdiv(n_rows, block_m)
    col_tiles = triton.cdiv(n_cols, block_n)
    splits = _column_splits(row_blocks, col_tiles, q.device)
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)
    partial = torch.empty(3, splits, n_rows, device=q.device, dtype=torch.float32)
    with launch_device(q):
        _infonce_fwd_kernel[(row_blocks, splits)](
            q, docs, rq, rd, partial[0], partial[1], partial[2], n_rows, n_cols, dim, q.stride(0), docs.stride(0),
            label_offset, float(scale), tiles_per_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    maxima, sums, targets = partial
    lse = torch.logsumexp(maxima + sums.log(), dim=0)
    return lse, targets.sum(dim=0)


def _slab_triton(q, docs, rq, rd, lse, scale, label_offset, slab_dtype):
    n_rows, dim = q.shape
    n_cols = docs.shape[0]
    block_m, block_n, block_k, warps, stages = _block_sizes(q.dtype)
    slab = torch.empty(n_rows, n_cols, device=q.device, dtype=slab_dtype)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    with launch_device(q):
        _infonce_bwd_kernel[grid](
            q, docs, rq, rd, lse, slab, n_rows, n_cols, dim, q.stride(0), docs.stride(0), slab.stride(0),
            label_offset, float(scale), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return slab


# --------------------------------------------------------------------------------------------------------------------
# The PyTorch slab path (CPU fallback)
# --------------------------------------------------------------------------------------------------------------------
def _project_out_radial(grad_unit: torch.Tensor, x: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """d/dx of a loss given its gradient w.r.t. x / max(|x|, eps): ``(g - (g . x^) x^) / |x|``, fp32."""
    unit = x.float() * inv_norm[:, None]
    radial = (grad_unit * unit).sum(dim=1, keepdim=True)
    # Rows clamped at eps are scaled, not normalised: no radial term there (as autograd through normalize).
    radial = radial * (inv_norm < 1.0 / NORM_EPS).float()[:, None]
    return (grad_unit - radial * unit) * inv_norm[:, None]


def _loss_and_grads_torch(q, docs, rq, rd, scale, label_offset, total_rows, want_grad):
    """Per-row (logsumexp, target score), and with ``want_grad`` the gradients of ``sum(lse - target) /
    total_rows``, fp32. One slab of query rows at a time: every slab holds complete rows of the score matrix,
    so its softmax is final and the gradients are taken there and then (three GEMMs, like the plain formula,
    instead of recomputing the scores in the backward)."""
    unit_docs = docs.float() * rd[:, None]
    lse = torch.empty(q.shape[0], device=q.device, dtype=torch.float32)
    target = torch.empty_like(lse)
    grad_q = torch.empty(q.shape, device=q.device, dtype=torch.float32) if want_grad else None
    grad_unit_docs = torch.zeros(docs.shape, device=docs.device, dtype=torch.float32) if want_grad else None
    for start in range(0, q.shape[0], ROWS_PER_SLAB):
        stop = min(start + ROWS_PER_SLAB, q.shape[0])
        unit_q = q[start:stop].float() * rq[start:stop, None]
        s = (unit_q * scale) @ unit_docs.T
        rows = torch.arange(stop - start, device=q.device)
        cols = rows + label_offset + start
        lse[start:stop] = torch.logsumexp(s, dim=1)
        target[start:stop] = s[rows, cols]
        if want_grad:
            h = s.sub_(lse[start:stop, None]).exp_()  # softmax, in place of the scores
            h[rows, cols] -= 1.0
            grad_q[start:stop] = _project_out_radial(h @ unit_docs, q[start:stop], rq[start:stop])
            grad_unit_docs.addmm_(h.T, unit_q)
        del s
    if not want_grad:
        return lse, target, None, None
    factor = scale / total_rows
    grad_q *= factor
    grad_docs = _project_out_radial(grad_unit_docs * factor, docs, rd)
    return lse, target, grad_q, grad_docs


class InfoNCEFunction(torch.autograd.Function):
    """Sum over this process's query rows of ``logsumexp_j s[i, j] - s[i, i + label_offset]``, divided by
    ``total_rows``. Inputs: queries ``(B, D)``, docs ``(M, D)`` of one dtype; returns a 0-dim fp32 tensor.

    Triton path: streaming forward, backward recomputing the scores slab by slab. PyTorch path: gradients
    computed in the forward (``want_grad``) and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, queries, docs, scale, label_offset, total_rows, triton_path, want_grad):
        rq = _inverse_norms(queries, triton_path)
        rd = _inverse_norms(docs, triton_path)
        ctx.scale, ctx.label_offset, ctx.total_rows, ctx.triton_path = scale, label_offset, total_rows, triton_path
        ctx.dtypes = (queries.dtype, docs.dtype)
        if triton_path:
            lse, target = _forward_triton(queries, docs, rq, rd, scale, label_offset)
            if want_grad:
                ctx.save_for_backward(queries, docs, rq, rd, lse)
        else:
            lse, target, grad_q, grad_docs = _loss_and_grads_torch(queries, docs, rq, rd, scale, label_offset,
                                                                   total_rows, want_grad)
            if want_grad:
                ctx.save_for_backward(grad_q, grad_docs)
        return (lse - target).sum() / total_rows

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.triton_path:
            grad_q, grad_docs = ctx.saved_tensors
            grad_loss = grad_loss.float()
            return ((grad_q * grad_loss).to(ctx.dtypes[0]), (grad_docs * grad_loss).to(ctx.dtypes[1]),
                    None, None, None, None, None)
        queries, docs, rq, rd, lse = ctx.saved_tensors
        scale, offset = ctx.scale, ctx.label_offset
        compute_dtype = queries.dtype
        # softmax - onehot lies in [-1, 1]; 16-bit inputs keep 16-bit slabs so that the GEMMs use tensor cores.
        unit_docs = (docs.float() * rd[:, None]).to(compute_dtype)
        grad_queries = torch.empty(queries.shape, device=queries.device, dtype=torch.float32)
        grad_unit_docs = torch.zeros(docs.shape, device=docs.device, dtype=torch.float32)
        factor = grad_loss.float() * scale / ctx.total_rows
        for start in range(0, queries.shape[0], ROWS_PER_SLAB):
            stop = min(start + ROWS_PER_SLAB, queries.shape[0])
            q = queries[start:stop]
            slab = _slab_triton(q, docs, rq[start:stop], rd, lse[start:stop], scale, offset + start, compute_dtype)
            grad_unit_q = (slab @ unit_docs).float() * factor
            grad_queries[start:stop] = _project_out_radial(grad_unit_q, q, rq[start:stop])
            unit_q = (q.float() * rq[start:stop, None]).to(compute_dtype)
            grad_unit_docs += (slab.T @ unit_q).float()
            del slab
        grad_docs = _project_out_radial(grad_unit_docs * factor, docs, rd)
        return grad_queries.to(queries.dtype), grad_docs.to(docs.dtype), None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------------
# Gathering across ranks
# --------------------------------------------------------------------------------------------------------------------
class _GatherWithGrad(torch.autograd.Function):
    """All-gather of equal-sized shards along dim 0; backward sums every rank's gradient for this rank's shard."""

    @staticmethod
    def forward(ctx, shard):
        import torch.distributed as dist

        world = dist.get_world_size()
        out = torch.empty((world * shard.shape[0], *shard.shape[1:]), device=shard.device, dtype=shard.dtype)
        # all_gather_single is the newer name (torch >= 2.12) of all_gather_into_tensor.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, shard.contiguous())
        ctx.rows = shard.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

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
    import torch.distributed as dist

    # On the tensors' own device: NCCL needs CUDA tensors, and the current CUDA device may not be theirs.
    local = torch.tensor(sizes, dtype=torch.long, device=device if dist.get_backend() == "nccl" else "cpu")
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()
    if not bool((table == table[0]).all()):
        raise ValueError(
            "gather_across_ranks needs the same number of queries and of negatives on every rank; got "
            f"(queries, negatives) per rank = {[tuple(row.tolist()) for row in table]}")


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


def info_nce_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    scale: float = 20.0,
    gather_across_ranks: bool = False,
    impl: str = "auto",
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

    Returns:
        a 0-dim float32 tensor, the mean over queries of the cross-entropy.
    """
    _validate(queries, positives, negatives, scale)
    triton_path = use_triton(impl, queries, positives, negatives)
    if triton_path and triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    label_offset, total_rows = 0, queries.shape[0]
    if gather_across_ranks:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("gather_across_ranks=True needs an initialised torch.distributed process group")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world > 1:
            _check_equal_shards([queries.shape[0], 0 if negatives is None else negatives.shape[0]], queries.device)
            positives = _GatherWithGrad.apply(positives)
            if negatives is not None:
                negatives = _GatherWithGrad.apply(negatives)
            label_offset, total_rows = rank * queries.shape[0], world * queries.shape[0]
    docs = positives if negatives is None or negatives.shape[0] == 0 else torch.cat([positives, negatives], dim=0)
    want_grad = torch.is_grad_enabled() and (queries.requires_grad or docs.requires_grad)
    loss = InfoNCEFunction.apply(queries.contiguous(), docs.contiguous(), float(scale), label_offset, total_rows,
                                 triton_path, want_grad)
    if total_rows != queries.shape[0]:
        import torch.distributed as dist

        # This rank's share of the global loss carries the gradient; the value becomes the global loss.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        loss = loss + (global_loss - loss.detach())
    return loss


def info_nce_loss_reference(queries, positives, negatives=None, *, scale=20.0):
    """The plain formula (sentence-transformers' cos_sim + cross_entropy), holding the whole ``(B, B + N)``
    matrix; computed in the inputs' dtype, or in float64 for float64 inputs."""
    docs = positives if negatives is None else torch.cat([positives, negatives], dim=0)
    scores = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(docs, dim=1).T * scale
    labels = torch.arange(queries.shape[0], device=queries.device)
    return torch.nn.functional.cross_entropy(scores.float() if scores.dtype != torch.float64 else scores, labels)
