"""The fused InfoNCE against a float64 reference (Triton through the interpreter here, the PyTorch slab path too).

Tolerance in the flash-attention way: the kernel's error against float64 is at most twice the error of the
plain PyTorch formula computed in the same low dtype, plus a small floor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import slow_except

from llm2vec_fast.kernels import info_nce_loss, text_hashes
from llm2vec_fast.kernels import infonce as infonce_module
from llm2vec_fast.kernels.infonce import info_nce_loss_reference

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from kernel_ir import int32_index_products  # noqa: E402

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


def _check_against_float64(tensors, impl, scale, variant="auto", ids=None):
    dtype = tensors[0].dtype
    id_kwargs = {} if ids is None else dict(positive_ids=ids[0], negative_ids=ids[1])
    ref_loss, ref_grads = _loss_and_grads(info_nce_loss_reference, tensors, dtype=torch.float64, scale=scale,
                                          **id_kwargs)
    low_loss, low_grads = _loss_and_grads(info_nce_loss_reference, tensors, scale=scale, **id_kwargs)
    our_loss, our_grads = _loss_and_grads(info_nce_loss, tensors, scale=scale, impl=impl, variant=variant,
                                          **id_kwargs)
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


@pytest.mark.parametrize("dtype", slow_except([pytest.param(torch.float32, id="fp32"),
                                               pytest.param(torch.float16, id="fp16")], "fp32"))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,dim,n_neg", [(1, 64, 0), (7, 100, 3), (33, 64, 33)])
def test_gemm_variant_matches_float64(batch, dim, n_neg, dtype):
    # On CPU the GEMMs are torch.matmul in fp32; the row softmax is the Triton kernel, in the interpreter.
    _check_against_float64(_inputs(batch, dim, n_neg, dtype, seed=batch + 7), "triton", 50.0, variant="gemm")


@pytest.mark.parametrize("variant", ["fused", "gemm"])
def test_triton_with_several_slabs(monkeypatch, variant):
    monkeypatch.setattr(infonce_module, "ROWS_PER_SLAB", 32)
    _check_against_float64(_inputs(70, 64, 37, torch.float32, seed=5), "triton", 50.0, variant=variant)


# --------------------------------------------------------------------------------------------------------------------
# False negatives: documents that are the same text as the query's own positive leave its softmax
# --------------------------------------------------------------------------------------------------------------------
PATHS = [("triton", "fused"), ("triton", "gemm"), ("torch", "auto")]


def _duplicated_ids(batch, n_neg, distinct, seed):
    """Ids drawn from few values, so that many columns repeat some row's positive."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, distinct, (batch,), generator=generator),
            torch.randint(0, distinct, (n_neg,), generator=generator) if n_neg else None)


def test_masked_reference_drops_exactly_the_duplicate_columns():
    """The masked reference against a row-by-row cross-entropy over the columns kept (float64)."""
    q, p, n = (t.double() for t in _inputs(9, 32, 6, torch.float32, seed=11))
    pos_ids, neg_ids = _duplicated_ids(9, 6, 4, seed=2)
    doc_ids = torch.cat([pos_ids, neg_ids])
    docs = torch.nn.functional.normalize(torch.cat([p, n]), dim=1)
    scores = torch.nn.functional.normalize(q, dim=1) @ docs.T * 20.0
    per_row = []
    for i in range(9):
        keep = (doc_ids != pos_ids[i]) | (torch.arange(15) == i)
        per_row.append(torch.logsumexp(scores[i, keep], dim=0) - scores[i, i])
    expected = torch.stack(per_row).mean()
    got = info_nce_loss_reference(q, p, n, scale=20.0, positive_ids=pos_ids, negative_ids=neg_ids)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got < info_nce_loss_reference(q, p, n, scale=20.0)  # masking removes terms from every duplicated row


@pytest.mark.parametrize("dtype", slow_except([pytest.param(torch.float32, id="fp32"),
                                               pytest.param(torch.float16, id="fp16")], "fp32"))
@pytest.mark.parametrize("impl,variant", PATHS)
@pytest.mark.parametrize("batch,dim,n_neg", [(7, 100, 5), (40, 64, 33)])
def test_masked_loss_matches_float64(batch, dim, n_neg, impl, variant, dtype, monkeypatch):
    monkeypatch.setattr(infonce_module, "ROWS_PER_SLAB", 16)  # several slabs: the ids' label offsets move
    tensors = _inputs(batch, dim, n_neg, dtype, seed=batch + dim)
    _check_against_float64(tensors, impl, 50.0, variant=variant, ids=_duplicated_ids(batch, n_neg, 5, seed=batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl,variant", PATHS)
def test_one_query_with_many_masked_documents(impl, variant, dtype):
    batch, n_neg = 6, 70  # 70 negatives: more than two column tiles of the interpreter's 32
    positive_ids = torch.arange(100, 100 + batch)
    negative_ids = torch.arange(1000, 1000 + n_neg)
    negative_ids[::2] = positive_ids[3]  # half the negatives are query 3's positive
    positive_ids[5] = positive_ids[3]  # and so is row 5's positive (rows 3 and 5 mask each other's)
    tensors = _inputs(batch, 64, n_neg, dtype, seed=21)
    _check_against_float64(tensors, impl, 20.0, variant=variant, ids=(positive_ids, negative_ids))


@pytest.mark.parametrize("impl,variant", PATHS)
def test_everything_masked_but_the_positive_gives_zero_loss(impl, variant):
    """Every document of every row is a duplicate of its positive: each row's softmax has the positive alone,
    its loss is 0 and so is every gradient; never NaN."""
    q, p, n = _inputs(5, 64, 40, torch.float32, seed=4)
    ids = (torch.full((5,), 7), torch.full((40,), 7))
    loss, grads = _loss_and_grads(info_nce_loss, (q, p, n), impl=impl, variant=variant, positive_ids=ids[0],
                                  negative_ids=ids[1])
    assert loss.item() == 0.0
    for grad in grads:
        assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("impl,variant", PATHS)
def test_one_row_fully_masked_among_others(impl, variant):
    q, p, n = _inputs(6, 64, 9, torch.float32, seed=8)
    positive_ids = torch.arange(6)
    negative_ids = torch.full((9,), 2)
    positive_ids[[0, 4]] = 2  # rows 0, 2, 4 share one text, and every negative is that text too
    loss, grads = _loss_and_grads(info_nce_loss, (q, p, n), impl=impl, variant=variant, positive_ids=positive_ids,
                                  negative_ids=negative_ids)
    ref_loss, ref_grads = _loss_and_grads(info_nce_loss_reference, (q, p, n), dtype=torch.float64,
                                          positive_ids=positive_ids, negative_ids=negative_ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_ids_without_duplicates_change_nothing():
    tensors = _inputs(9, 64, 4, torch.float32, seed=3)
    plain = info_nce_loss(*tensors, impl="triton")
    ids = info_nce_loss(*tensors, impl="triton", positive_ids=torch.arange(9), negative_ids=torch.arange(9, 13))
    torch.testing.assert_close(ids, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "positive_ids,negative_ids,error,message",
    [
        (torch.arange(3), torch.arange(2), ValueError, r"positive_ids must have shape \(4,\)"),
        (torch.arange(4).view(2, 2), torch.arange(2), ValueError, "positive_ids must have shape"),
        (torch.arange(4), torch.arange(3), ValueError, r"negative_ids must have shape \(2,\)"),
        (torch.arange(4, dtype=torch.int32), torch.arange(2), TypeError, "positive_ids must be int64"),
        (torch.arange(4), torch.arange(2).float(), TypeError, "negative_ids must be int64"),
        ([0, 1, 2, 3], torch.arange(2), TypeError, "positive_ids must be a torch.Tensor"),
        (torch.arange(4, device="meta"), torch.arange(2), ValueError, "positive_ids must be on the embeddings' device"),
        (torch.arange(4), None, ValueError, "negative_ids was not"),
        (None, torch.arange(2), ValueError, "negative_ids needs positive_ids"),
    ],
)
def test_bad_ids_are_named(positive_ids, negative_ids, error, message):
    q, p, n = _inputs(4, 32, 2, torch.float32)
    with pytest.raises(error, match=message):
        info_nce_loss(q, p, n, positive_ids=positive_ids, negative_ids=negative_ids)


HASHED_TEXTS = ["A man is playing a guitar.", "", "naïve café 東京", "A man is playing a guitar."]


def test_text_hashes_are_equal_for_equal_texts():
    ids = text_hashes(HASHED_TEXTS)
    assert ids.dtype == torch.int64 and ids.shape == (4,)
    assert ids[0] == ids[3] and len(set(ids[:3].tolist())) == 3


@pytest.mark.slow  # a new Python process
def test_text_hashes_are_stable_across_processes():
    texts, ids = HASHED_TEXTS, text_hashes(HASHED_TEXTS)
    script = ("import json, sys; from llm2vec_fast.kernels import text_hashes; "
              "print(json.dumps(text_hashes(json.loads(sys.argv[1])).tolist()))")
    # Another process with another str-hash salt (this one's is random): Python's hash would differ there.
    env = dict(os.environ, PYTHONHASHSEED="12345", TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == ids.tolist()


@pytest.mark.parametrize("texts,message", [("one text", "single str"), (["a", 3], "item 1 is int")])
def test_text_hashes_bad_input(texts, message):
    with pytest.raises(TypeError, match=message):
        text_hashes(texts)


def test_unknown_variant_is_named():
    q, p, _ = _inputs(4, 32, 0, torch.float32)
    with pytest.raises(ValueError, match="variant must be one of"):
        info_nce_loss(q, p, variant="cublas")


# --------------------------------------------------------------------------------------------------------------------
# 64-bit offsets
# --------------------------------------------------------------------------------------------------------------------
_INFONCE = "llm2vec_fast.kernels.infonce"
_INFONCE_KERNELS = [
    [_INFONCE, "_infonce_norm_kernel", {"X": "*fp16", "RN": "*fp32"}, {"EPS": 1e-12, "BLOCK_R": 16, "BLOCK_D": 256},
     []],
    [_INFONCE, "_infonce_fwd_kernel",
     {"Q": "*fp16", "DOCS": "*fp16", "RQ": "*fp32", "RD": "*fp32", "DOC_IDS": "*i64", "MAX_OUT": "*fp32",
      "SUM_OUT": "*fp32", "TARGET_OUT": "*fp32"},
     {"HAS_IDS": True, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "DOT_PRECISION": "tf32"}, ["scale"]],
    [_INFONCE, "_infonce_bwd_kernel",
     {"Q": "*fp16", "DOCS": "*fp16", "RQ": "*fp32", "RD": "*fp32", "DOC_IDS": "*i64", "LSE": "*fp32",
      "SLAB": "*fp16"},
     {"HAS_IDS": True, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "DOT_PRECISION": "tf32"}, ["scale"]],
    [_INFONCE, "_infonce_row_softmax_kernel",
     {"S": "*fp32", "OUT": "*fp16", "DOC_IDS": "*i64", "LSE": "*fp32", "TARGET": "*fp32"},
     {"HAS_IDS": True, "WRITE_GRAD": True, "BLOCK_N": 1024}, []],
]


def test_infonce_kernels_compute_offsets_in_int64():
    """No InfoNCE kernel multiplies int32 index tensors (``row * stride``, which wraps once (B + N) x D
    reaches 2^31: 8 ranks x 128K documents at D 4096). Read from the kernels' sm_90 TTIR as the code generator
    emits it, with every integer argument an i32 scalar (how Triton passes ints below 2^31). This proves the
    index arithmetic is 64-bit in the IR; it does not run a 2^31-element input (not allocatable here)."""
    wrapping = int32_index_products(_INFONCE_KERNELS)
    assert sorted(wrapping) == sorted(spec[1] for spec in _INFONCE_KERNELS)
    assert not any(wrapping.values()), wrapping


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
@pytest.mark.parametrize("variant", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch,dim,n_neg", [(1, 64, 0), (33, 100, 33), (300, 4096, 300), (1500, 576, 0)])
def test_cuda_matches_float64(batch, dim, n_neg, dtype, variant):
    _check_against_float64(_inputs(batch, dim, n_neg, dtype, seed=batch, device="cuda"), "triton", 50.0,
                           variant=variant)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_masked_matches_float64(dtype, variant):
    pos_ids, neg_ids = _duplicated_ids(300, 300, 40, seed=1)
    _check_against_float64(_inputs(300, 576, 300, dtype, seed=2, device="cuda"), "triton", 50.0, variant=variant,
                           ids=(pos_ids.cuda(), neg_ids.cuda()))
