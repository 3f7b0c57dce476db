"""The fused InfoNCE against a float64 reference (Triton through the interpreter here, the PyTorch slab path too).

Tolerance in the flash-attention way: the kernel's error against float64 is at most twice the error of the
plain PyTorch formula computed in the same low dtype, plus a small floor.
"""

from __future__ import annotations

import pytest
import torch

from llm2vec_fast.kernels import info_nce_loss
from llm2vec_fast.kernels import infonce as infonce_module
from llm2vec_fast.kernels.infonce import info_nce_loss_reference

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(batch, dim, n_neg, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    make = lambda rows: (torch.randn(rows, dim, generator=generator) * 3).to(device=device, dtype=dtype)  # noqa: E731
    return make(batch), make(batch), (make(n_neg) if n_neg else None)


def _loss_and_grads(fn, tensors, dtype=None, **kwargs):
    leaves = [None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]
    loss = fn(*leaves, **kwargs)
    loss.backward()
    return loss.detach().double(), [None if t is None else t.grad.double() for t in leaves]


def _check_against_float64(tensors, impl, scale):
    dtype = tensors[0].dtype
    ref_loss, ref_grads = _loss_and_grads(info_nce_loss_reference, tensors, dtype=torch.float64, scale=scale)
    low_loss, low_grads = _loss_and_grads(info_nce_loss_reference, tensors, scale=scale)
    our_loss, our_grads = _loss_and_grads(info_nce_loss, tensors, scale=scale, impl=impl)
    floor = FLOOR[dtype]
    assert torch.isfinite(our_loss)
    assert (our_loss - ref_loss).abs() <= 2 * (low_loss - ref_loss).abs() + floor * max(1.0, ref_loss.abs().item())
    for name, ours, low, ref in zip(("queries", "positives", "negatives"), our_grads, low_grads, ref_grads):
        if ref is None:
            assert ours is None
            continue
        our_err = (ours - ref).abs().max()
        low_err = (low - ref).abs().max()
        assert our_err <= 2 * low_err + floor * max(1.0, ref.abs().max().item()), (name, our_err, low_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("scale", [20.0, 50.0])
@pytest.mark.parametrize("with_negatives", [False, True], ids=["in-batch", "hard-negatives"])
@pytest.mark.parametrize("dim", [64, 100])
@pytest.mark.parametrize("batch", [1, 7, 33])
def test_triton_matches_float64(batch, dim, with_negatives, scale, dtype):
    tensors = _inputs(batch, dim, batch if with_negatives else 0, dtype, seed=batch * 1000 + dim)
    _check_against_float64(tensors, "triton", scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,dim,n_neg", [(1, 64, 0), (7, 100, 3), (33, 64, 33), (70, 100, 45)])
def test_torch_fallback_matches_float64(batch, dim, n_neg, dtype, monkeypatch):
    # Slabs smaller than the batch, so the slab loop and its label offsets are exercised.
    monkeypatch.setattr(infonce_module, "ROWS_PER_SLAB", 16)
    _check_against_float64(_inputs(batch, dim, n_neg, dtype, seed=batch), "torch", 20.0)


def test_triton_with_several_slabs(monkeypatch):
    monkeypatch.setattr(infonce_module, "ROWS_PER_SLAB", 32)
    _check_against_float64(_inputs(70, 64, 37, torch.float32, seed=5), "triton", 50.0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_near_identical_embeddings_and_large_scale_stay_stable(impl):
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1, 64, generator=generator)
    # Every row is one direction plus tiny noise: all scores nearly equal and huge (scale 1000).
    queries = base + 1e-4 * torch.randn(9, 64, generator=generator)
    positives = base + 1e-4 * torch.randn(9, 64, generator=generator)
    negatives = base + 1e-4 * torch.randn(5, 64, generator=generator)
    for scale in (1000.0, 1e5):
        ref_loss, ref_grads = _loss_and_grads(info_nce_loss_reference, (queries, positives, negatives),
                                              dtype=torch.float64, scale=scale)
        loss, grads = _loss_and_grads(info_nce_loss, (queries, positives, negatives), scale=scale, impl=impl)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
        if scale == 1000.0:  # at 1e5 fp32 cosines themselves are rounding noise times the scale
            for ours, ref in zip(grads, ref_grads):
                torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_zero_vector_rows_follow_normalize(impl):
    queries, positives, negatives = _inputs(5, 64, 2, torch.float32, seed=9)
    queries[2] = 0.0
    ref_loss, ref_grads = _loss_and_grads(info_nce_loss_reference, (queries, positives, negatives),
                                          dtype=torch.float64)
    loss, grads = _loss_and_grads(info_nce_loss, (queries, positives, negatives), impl=impl)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_perfect_pairs_give_low_loss_and_impl_auto_works():
    queries = torch.eye(8, 16)
    assert info_nce_loss(queries, queries.clone(), scale=50.0).item() < 1e-10
    assert info_nce_loss(queries, queries.clone().flip(0), scale=50.0).item() > 40.0


def test_no_graph_under_no_grad():
    queries, positives, negatives = _inputs(4, 64, 4, torch.float32)
    with torch.no_grad():
        loss = info_nce_loss(queries, positives, negatives, impl="torch")
    assert loss.grad_fn is None


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, p, n: (q[:0], p[:0], None), "empty batch"),
        (lambda q, p, n: (q, p[:3], n), "positives must have"),
        (lambda q, p, n: (q, p, n[:, :10]), "negatives must have dimension"),
        (lambda q, p, n: (q[0], p[0], None), "must be 2-D"),
        (lambda q, p, n: (q, p.double(), n), "float32, float16 or bfloat16"),
        (lambda q, p, n: (q, p.half(), n), "share a dtype"),
    ],
)
def test_bad_inputs_are_named(change, message):
    q, p, n = change(*_inputs(4, 32, 2, torch.float32))
    with pytest.raises((ValueError, TypeError), match=message):
        info_nce_loss(q, p, n)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_scale_is_named(scale):
    q, p, _ = _inputs(4, 32, 0, torch.float32)
    with pytest.raises(ValueError, match="scale must be a finite positive"):
        info_nce_loss(q, p, scale=scale)


def test_gather_without_process_group_is_an_error():
    q, p, _ = _inputs(4, 32, 0, torch.float32)
    with pytest.raises(RuntimeError, match="process group"):
        info_nce_loss(q, p, gather_across_ranks=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch,dim,n_neg", [(1, 64, 0), (33, 100, 33), (300, 4096, 300), (1500, 576, 0)])
def test_cuda_matches_float64(batch, dim, n_neg, dtype):
    _check_against_float64(_inputs(batch, dim, n_neg, dtype, seed=batch, device="cuda"), "triton", 50.0)
