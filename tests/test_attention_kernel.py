"""The bidirectional attention kernel against its PyTorch reference.

On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16 there
(the interpreter's bf16 ``tl.dot`` is not trustworthy); bf16 tests are marked ``gpu``.

Tolerance in the flash-attention way: the kernel's error against an fp64 reference is at most twice the
error of the same reference computed in the low dtype, plus a small floor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import slow_except

from llm2vec_fast.kernels import attention as attn_module
from llm2vec_fast.kernels.attention import (
    attention_dropout_keep_mask,
    attention_variants,
    bidirectional_attention,
    bidirectional_attention_reference,
    draw_dropout_seed,
    forced_configs,
)

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape_q, shape_kv, dtype, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    k = torch.randn(shape_kv, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    v = torch.randn(shape_kv, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return q, k, v


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _check(name, got, ref_hi, ref_lo, dtype):
    """``got`` vs the fp64 reference, bounded by twice the low-precision reference's own error plus a floor."""
    err = (got.double() - ref_hi.double()).abs().max().item()
    ref_err = (ref_lo.double() - ref_hi.double()).abs().max().item()
    floor = FLOOR[dtype] * (1.0 + ref_hi.double().abs().max().item())
    assert math.isfinite(err), f"{name}: non-finite values"
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 * reference error {ref_err:.3g} + {floor:.3g}"


def _compare(q, k, v, dtype, keep=None, dropout_p=0.0, seed=None, **kwargs):
    """Kernel vs fp64 reference vs low-precision reference, outputs and dq/dk/dv."""
    if seed is not None:
        torch.manual_seed(seed)
    out = bidirectional_attention(q, k, v, dropout_p=dropout_p, impl="triton", **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad_out = torch.randn_like(out)
    got = (out,) + _grads(out, (q, k, v), grad_out)

    hi_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_hi = bidirectional_attention_reference(*hi_inputs, dropout_keep_mask=keep, dropout_p=dropout_p, **kwargs)
    hi = (ref_hi,) + _grads(ref_hi, hi_inputs, grad_out.double())
    lo_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_lo = bidirectional_attention_reference(
        *lo_inputs, dropout_keep_mask=keep, dropout_p=dropout_p, upcast=False, **kwargs
    )
    lo = (ref_lo,) + _grads(ref_lo, lo_inputs, grad_out)
    for name, g, h, low in zip(("out", "dq", "dk", "dv"), got, hi, lo):
        _check(name, g, h, low, dtype)
    return got


# ---------------------------------------------------------------------------------------------------------
# Padded batches
# ---------------------------------------------------------------------------------------------------------

#: the fast loop (-m "not slow") runs fp32; fp16 of the same cases runs in the full suite
FP16_SLOW = slow_except([pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")], "fp32")

SHAPES = [
    # batch, seq, heads, kv_heads, head_dim
    pytest.param(2, 37, 6, 2, 64, id="s37-d64-gqa2"),
    pytest.param(2, 1, 6, 1, 64, id="s1-d64-mqa"),
    pytest.param(1, 130, 6, 2, 64, id="s130-d64-gqa2", marks=pytest.mark.slow),
    pytest.param(2, 37, 6, 1, 128, id="s37-d128-mqa"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim", SHAPES)
def test_kernel_matches_reference(batch, seq, heads, kv_heads, head_dim, dtype):
    q, k, v = _inputs((batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim), dtype)
    _compare(q, k, v, dtype)


def _padding_mask(batch, seq):
    """Row 0 unpadded, row 1 left- and right-padded, row 2 fully padded (when there is one)."""
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, seq - 5 :] = False
    if batch > 2:
        mask[2] = False
    return mask.to(DEVICE)


@pytest.mark.parametrize(
    "seq,head_dim,dtype",
    [pytest.param(37, 64, torch.float32, id="s37-d64-fp32"), pytest.param(37, 64, torch.float16, id="s37-d64-fp16", marks=pytest.mark.slow),
     pytest.param(130, 128, torch.float32, id="s130-d128-fp32", marks=pytest.mark.slow)],
)
def test_kernel_with_padding_mask(seq, head_dim, dtype):
    batch = 3 if seq < 100 else 2
    q, k, v = _inputs((batch, seq, 6, head_dim), (batch, seq, 2, head_dim), dtype)
    mask = _padding_mask(batch, seq)
    out, dq, dk, dv = _compare(q, k, v, dtype, key_padding_mask=mask)
    padded = ~mask
    assert torch.all(out[padded] == 0), "padded query rows must be exactly zero"
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.all(grad[padded] == 0), f"{name} of padded tokens must be zero"


@pytest.mark.parametrize("head_dim", [16, 32, 96, 256])
def test_forward_other_head_dims(head_dim):
    q, k, v = _inputs((2, 21, 2, head_dim), (2, 21, 1, head_dim), torch.float32)
    mask = torch.ones(2, 21, dtype=torch.bool, device=DEVICE)
    mask[0, 17:] = False
    with torch.no_grad():
        out = bidirectional_attention(q, k, v, key_padding_mask=mask, impl="triton")
        ref = bidirectional_attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_softmax_scale_is_used():
    q, k, v = _inputs((1, 19, 2, 64), (1, 19, 2, 64), torch.float32)
    with torch.no_grad():
        out = bidirectional_attention(q, k, v, softmax_scale=0.3, impl="triton")
        ref = bidirectional_attention_reference(q, k, v, softmax_scale=0.3)
        default = bidirectional_attention_reference(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert (out - default).abs().max() > 1e-2


def test_non_contiguous_inputs():
    """The transformers integration hands (B, H, S, D) tensors transposed to (B, S, H, D): strided views."""
    gen = torch.Generator().manual_seed(3)
    qh = torch.randn(2, 6, 37, 64, generator=gen).to(DEVICE)
    kvh = torch.randn(2, 2, 2, 37, 64, generator=gen).to(DEVICE)  # k and v interleaved in one buffer
    q = qh.transpose(1, 2).requires_grad_()
    k = kvh[0].transpose(1, 2).requires_grad_()
    v = kvh[1].transpose(1, 2).requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    out = bidirectional_attention(q, k, v, impl="triton")
    ref = bidirectional_attention_reference(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    got = _grads(out, (q, k, v), grad_out)
    want = _grads(ref, (q, k, v), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4)


def test_other_tile_shapes():
    """The loops and masks do not depend on the tile shape: swap the interpreter's M and N tiles."""
    import triton

    q, k, v = _inputs((2, 37, 4, 64), (2, 37, 2, 64), torch.float32)
    configs = dict(
        fwd=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
        dq=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        dkdv=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    )
    with forced_configs(**configs):
        _compare(q, k, v, torch.float32, key_padding_mask=_padding_mask(2, 37))


# ---------------------------------------------------------------------------------------------------------
# Packed (varlen) batches
# ---------------------------------------------------------------------------------------------------------


def _cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", FP16_SLOW)
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa2", "mqa"])
def test_varlen_matches_reference(kv_heads, dtype):
    lengths = [1, 37, 20, 1, 33]
    cu = _cu_seqlens(lengths)
    total = sum(lengths)
    q, k, v = _inputs((total, 6, 64), (total, kv_heads, 64), dtype)
    _compare(q, k, v, dtype, cu_seqlens=cu, max_seqlen=max(lengths))


def test_varlen_equals_padded_batch():
    """A packed batch gives, token for token, what the same sequences give padded on the right."""
    lengths = [5, 37, 1]
    cu = _cu_seqlens(lengths)
    q, k, v = _inputs((sum(lengths), 4, 64), (sum(lengths), 2, 64), torch.float32)
    with torch.no_grad():
        packed = bidirectional_attention(q, k, v, cu_seqlens=cu, max_seqlen=37, impl="triton")
        qp, kp, vp = (torch.zeros(3, 37, t.shape[1], 64, device=DEVICE) for t in (q, k, v))
        mask = torch.zeros(3, 37, dtype=torch.bool, device=DEVICE)
        for i, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            qp[i, : hi - lo], kp[i, : hi - lo], vp[i, : hi - lo] = q[lo:hi], k[lo:hi], v[lo:hi]
            mask[i, : hi - lo] = True
        padded = bidirectional_attention(qp, kp, vp, key_padding_mask=mask, impl="triton")
    torch.testing.assert_close(packed, padded[mask], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------


def test_dropout_same_seed_same_output_and_grads_match_reference():
    p = 0.3
    q, k, v = _inputs((2, 37, 2, 64), (2, 37, 1, 64), torch.float32)
    mask = _padding_mask(2, 37)
    with torch.no_grad():
        torch.manual_seed(11)
        first = bidirectional_attention(q, k, v, key_padding_mask=mask, dropout_p=p, impl="triton")
        torch.manual_seed(11)
        again = bidirectional_attention(q, k, v, key_padding_mask=mask, dropout_p=p, impl="triton")
        other = bidirectional_attention(q, k, v, key_padding_mask=mask, dropout_p=p, impl="triton")
        no_dropout = bidirectional_attention(q, k, v, key_padding_mask=mask, impl="triton")
    assert torch.equal(first, again), "the same torch seed must give the same dropout"
    assert not torch.equal(first, other), "a new draw must give another dropout"
    assert (first - no_dropout).abs().max() > 1e-2

    # The kernel's own keep-mask for that seed: gradients must match the reference under it.
    torch.manual_seed(11)
    keep = attention_dropout_keep_mask(draw_dropout_seed(q.device), 2, 2, 37, p)
    out, *_ = _compare(q, k, v, torch.float32, keep=keep, dropout_p=p, seed=11, key_padding_mask=mask)
    assert torch.equal(out.detach(), first)


def test_dropout_replays_under_restored_rng_state():
    """GradCache saves torch's RNG state before the no-grad pass and restores it for the grad pass."""
    q, k, v = _inputs((1, 19, 2, 32), (1, 19, 2, 32), torch.float32)
    state = torch.get_rng_state() if DEVICE == "cpu" else torch.cuda.get_rng_state()
    with torch.no_grad():
        first = bidirectional_attention(q, k, v, dropout_p=0.5, impl="triton")
    if DEVICE == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state)
    second = bidirectional_attention(q, k, v, dropout_p=0.5, impl="triton")
    assert second.grad_fn is not None
    assert torch.equal(first, second.detach())


def test_dropout_varlen_grads_match_reference():
    p = 0.25
    lengths = [1, 23, 9]
    cu = _cu_seqlens(lengths)
    q, k, v = _inputs((sum(lengths), 2, 32), (sum(lengths), 1, 32), torch.float32)
    torch.manual_seed(5)
    keep = attention_dropout_keep_mask(draw_dropout_seed(q.device), len(lengths), 2, max(lengths), p)
    _compare(q, k, v, torch.float32, keep=keep, dropout_p=p, seed=5, cu_seqlens=cu, max_seqlen=max(lengths))


def test_dropout_kept_fraction():
    p = 0.3
    torch.manual_seed(0)
    seed = draw_dropout_seed(torch.device(DEVICE))
    keep = attention_dropout_keep_mask(seed, 2, 2, 67, p)
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 6 * sigma, f"kept fraction {frac:.4f}, expected {1 - p} +- {6 * sigma:.4f}"
    # no visible structure: rows and heads are not copies of each other
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0], keep[0, 1])


def test_dropout_output_mean_is_unbiased():
    """E[dropout(P) V] = P V: averaged over many seeds, the output approaches the no-dropout one."""
    q, k, v = _inputs((1, 8, 1, 16), (1, 8, 1, 16), torch.float32)
    with torch.no_grad():
        exact = bidirectional_attention(q, k, v, impl="triton")
        torch.manual_seed(0)
        mean = torch.stack([bidirectional_attention(q, k, v, dropout_p=0.5, impl="triton") for _ in range(64)]).mean(0)
    assert (mean - exact).abs().mean() < 0.1 * exact.abs().mean() + 0.02


# ---------------------------------------------------------------------------------------------------------
# Autograd bookkeeping, dispatch, CPU path
# ---------------------------------------------------------------------------------------------------------


def _count_saved(fn):
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, count[0]


def test_nothing_saved_without_grad():
    q, k, v = _inputs((1, 9, 2, 32), (1, 9, 1, 32), torch.float32)
    with torch.no_grad():
        out, saved = _count_saved(lambda: bidirectional_attention(q, k, v, impl="triton"))
    assert saved == 0 and out.grad_fn is None
    detached = [t.detach() for t in (q, k, v)]
    out, saved = _count_saved(lambda: bidirectional_attention(*detached, impl="triton"))
    assert saved == 0 and out.grad_fn is None
    out, saved = _count_saved(lambda: bidirectional_attention(q, k, v, impl="triton"))
    assert saved > 0 and out.grad_fn is not None  # the same hook sees the grad-enabled call save


def test_auto_uses_triton_under_interpreter(monkeypatch):
    calls = []
    real = attn_module._attention_forward
    monkeypatch.setattr(attn_module, "_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _inputs((1, 9, 2, 32), (1, 9, 1, 32), torch.float32)
    with torch.no_grad():
        bidirectional_attention(q, k, v)
        assert len(calls) == (1 if attn_module.use_triton("auto", q) else 0)
        bidirectional_attention(q, k, v, impl="torch")
    assert len(calls) == (1 if attn_module.use_triton("auto", q) else 0)


def test_torch_impl_equals_sdpa_non_causal():
    q, k, v = _inputs((2, 37, 6, 64), (2, 37, 2, 64), torch.float32)
    with torch.no_grad():
        ours = bidirectional_attention(q, k, v, impl="torch")
        sdpa = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(3, 1), v.transpose(1, 2).repeat_interleave(3, 1),
            is_causal=False,
        ).transpose(1, 2)
        torch.testing.assert_close(ours, sdpa, atol=1e-6, rtol=1e-6)
        mask = _padding_mask(2, 37)
        ours = bidirectional_attention(q, k, v, key_padding_mask=mask, impl="torch")
        sdpa = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(3, 1), v.transpose(1, 2).repeat_interleave(3, 1),
            attn_mask=mask[:, None, None, :], is_causal=False,
        ).transpose(1, 2)
    torch.testing.assert_close(ours[mask], sdpa[mask], atol=1e-6, rtol=1e-6)
    assert torch.all(ours[~mask] == 0)


def test_torch_impl_fully_padded_rows_and_varlen():
    q, k, v = _inputs((3, 37, 6, 64), (3, 37, 2, 64), torch.float32)
    mask = _padding_mask(3, 37)  # row 2 fully padded
    out = bidirectional_attention(q, k, v, key_padding_mask=mask, impl="torch")
    assert torch.isfinite(out).all() and torch.all(out[2] == 0)
    grads = _grads(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    ref = bidirectional_attention_reference(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    lengths = [1, 37, 20]
    cu = _cu_seqlens(lengths)
    q, k, v = _inputs((58, 6, 64), (58, 2, 64), torch.float32)
    out = bidirectional_attention(q, k, v, cu_seqlens=cu, max_seqlen=37, impl="torch")
    ref = bidirectional_attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=37)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Soft-capping, sliding window, causal mode
# ---------------------------------------------------------------------------------------------------------

# small windows leave whole key tiles outside (the interpreter's tiles are 16 and 32 wide), 20 spans tiles; the
# soft-caps are small enough that tanh bends the scores of random inputs
FLAGS = [
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window=5), id="window5"),
    pytest.param(dict(logit_softcap=1.5), id="softcap"),
    pytest.param(dict(causal=True, window=20), id="causal-window20"),
    pytest.param(dict(window=20, logit_softcap=2.0), id="window20-softcap"),
    pytest.param(dict(causal=True, window=5, logit_softcap=1.5), id="causal-window5-softcap"),
]


@pytest.mark.parametrize("dtype", FP16_SLOW)
@pytest.mark.parametrize("flags", slow_except(FLAGS, "causal-window20", "causal-window5-softcap"))
def test_flags_padded_matches_reference(flags, dtype):
    """Rows unpadded, left+right padded and fully padded, GQA, seq 37, forward and dq/dk/dv."""
    q, k, v = _inputs((3, 37, 6, 64), (3, 37, 2, 64), dtype)
    mask = _padding_mask(3, 37)
    out, dq, dk, dv = _compare(q, k, v, dtype, key_padding_mask=mask, **flags)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.all(t[~mask] == 0), f"{name} of padded tokens must be zero"


@pytest.mark.parametrize("dtype", FP16_SLOW)
@pytest.mark.parametrize("flags", slow_except(FLAGS, "causal-window20", "window20-softcap"))
def test_flags_varlen_matches_reference(flags, dtype):
    lengths = [1, 37, 20, 2, 33]
    cu = _cu_seqlens(lengths)
    q, k, v = _inputs((sum(lengths), 4, 64), (sum(lengths), 1, 64), dtype)
    _compare(q, k, v, dtype, cu_seqlens=cu, max_seqlen=max(lengths), **flags)


@pytest.mark.parametrize("flags", slow_except([FLAGS[3], FLAGS[4]], "causal-window20"))
def test_flags_odd_head_dim_and_other_tiles(flags):
    """head_dim 40 (padded to 64 in registers) and the interpreter's M/N tiles swapped: the band's tile bounds
    must not assume square tiles."""
    import triton

    q, k, v = _inputs((2, 37, 4, 40), (2, 37, 2, 40), torch.float32)
    configs = dict(
        fwd=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
        dq=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        dkdv=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    )
    _compare(q, k, v, torch.float32, key_padding_mask=_padding_mask(2, 37), **flags)
    with forced_configs(**configs):
        _compare(q, k, v, torch.float32, key_padding_mask=_padding_mask(2, 37), **flags)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("flags", [FLAGS[1], FLAGS[3]])
def test_flags_padded_row_equals_unpadded_sequence(flags, side, impl):
    """The window and causal distances are row indices: a left- or right-padded sequence gives what it gives
    alone, unpadded."""
    seq, real = 37, 26
    q, k, v = _inputs((1, real, 4, 64), (1, real, 2, 64), torch.float32)
    lo = seq - real if side == "left" else 0
    padded = [torch.randn(1, seq, t.shape[2], 64, device=DEVICE) for t in (q, k, v)]
    for p, t in zip(padded, (q, k, v)):
        p[:, lo : lo + real] = t.detach()
    mask = torch.zeros(1, seq, dtype=torch.bool, device=DEVICE)
    mask[:, lo : lo + real] = True
    with torch.no_grad():
        alone = bidirectional_attention(q, k, v, impl=impl, **flags)
        out = bidirectional_attention(*padded, key_padding_mask=mask, impl=impl, **flags)
    torch.testing.assert_close(out[:, lo : lo + real], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("flags", FLAGS)
def test_torch_impl_flags_match_reference(flags):
    """The CPU path (SDPA with a band mask; the explicit computation for soft-capping), padded with a fully
    padded row (finite gradients) and packed."""
    q, k, v = _inputs((3, 37, 6, 64), (3, 37, 2, 64), torch.float32, device="cpu")
    mask = _padding_mask(3, 37).cpu()
    out = bidirectional_attention(q, k, v, key_padding_mask=mask, impl="torch", **flags)
    ref = bidirectional_attention_reference(q, k, v, key_padding_mask=mask, **flags)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    for got, want in zip(_grads(out, (q, k, v), grad_out), _grads(ref, (q, k, v), grad_out)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    lengths = [1, 37, 20]
    cu = _cu_seqlens(lengths).cpu()
    q, k, v = _inputs((58, 6, 64), (58, 2, 64), torch.float32, device="cpu")
    with torch.no_grad():
        out = bidirectional_attention(q, k, v, cu_seqlens=cu, max_seqlen=37, impl="torch", **flags)
        ref = bidirectional_attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=37, **flags)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reference_softcap_matches_gemma2_order():
    """Gemma-2's eager attention: scores * scaling, then softcap * tanh(scores / softcap), then the mask."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * 0.25
    scores = torch.tanh(scores / 3.0) * 3.0
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    want = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    got = bidirectional_attention_reference(q, k, v, softmax_scale=0.25, logit_softcap=3.0, causal=True)
    torch.testing.assert_close(got, want)


def _poisoned(tensors, rows):
    """Copies with NaN at ``rows`` of the token dimension."""
    out = []
    for t in tensors:
        t = t.detach().clone()
        t[:, rows] = float("nan")
        out.append(t.requires_grad_())
    return out


@pytest.mark.parametrize("flags", slow_except([pytest.param(dict(window=5), id="window5"),
                                                pytest.param(dict(causal=True), id="causal"),
                                                pytest.param(dict(causal=True, window=5), id="causal-window5")],
                                               "causal-window5"))
def test_tiles_outside_the_band_are_not_visited(flags):
    """NaN in q, k, v and dO at tokens that no output row below depends on: a kernel that visited their tiles
    and only masked them would turn those rows into NaN (0 * NaN), one that skips them gives exactly the clean
    result. 16 x 16 tiles, seq 64: with window 5 (or causal) query rows 0-31 never reach tokens 48-63, nor
    (window 5) keys 0-15 queries 32-63; in causal mode keys 48-63 never see queries 0-15."""
    import triton

    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    q, k, v = _inputs((1, 64, 2, 64), (1, 64, 1, 64), torch.float32)
    do = torch.randn(1, 64, 2, 64, device=DEVICE)
    with forced_configs(fwd=config, dq=config, dkdv=config):
        clean_out = bidirectional_attention(q, k, v, impl="triton", **flags)
        clean = (clean_out,) + _grads(clean_out, (q, k, v), do)
        *pq, pdo = _poisoned((q, k, v, do), slice(48, 64))
        out = bidirectional_attention(*pq, impl="triton", **flags)
        got = (out,) + _grads(out, pq, pdo)
        for i in range(2):  # out, dq
            torch.testing.assert_close(got[i][:, :32], clean[i][:, :32], atol=0, rtol=0)
        if flags.get("window"):  # dk, dv; (without a window keys 0-15 are seen by queries 48-63)
            for i in (2, 3):
                torch.testing.assert_close(got[i][:, :16], clean[i][:, :16], atol=0, rtol=0)
        if flags.get("causal"):  # key tiles 48-63 never visit query tile 0-15; K/V stay clean so O rows 16+ do
            pq, pdo = _poisoned((q, do), slice(0, 16))
            inputs = (pq, k, v)
            out = bidirectional_attention(*inputs, impl="triton", **flags)
            got = (out,) + _grads(out, inputs, pdo)
            for i in (2, 3):
                torch.testing.assert_close(got[i][:, 48:], clean[i][:, 48:], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Kernel variants (#10): each against the reference, selectable by name
# ---------------------------------------------------------------------------------------------------------


def _ragged_padding_mask(seq):
    """Unpadded; left+right padded; fully padded; padding inside (holes); mostly left padding."""
    mask = torch.ones(5, seq, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, seq - 5 :] = False
    mask[2] = False
    mask[3, 10:20] = False
    mask[3, :2] = False
    mask[4, : seq - 4] = False
    return mask.to(DEVICE)


@pytest.mark.parametrize("dtype", FP16_SLOW)
@pytest.mark.parametrize("flags", [pytest.param({}, id="plain"), FLAGS[5]])
def test_padding_skip_variant_matches_reference(flags, dtype):
    q, k, v = _inputs((5, 37, 4, 64), (5, 37, 2, 64), dtype)
    mask = _ragged_padding_mask(37)
    with attention_variants(padding="skip"):
        out, dq, dk, dv = _compare(q, k, v, dtype, key_padding_mask=mask, **flags)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.all(t[~mask] == 0), f"{name} of padded tokens must be zero"


def test_padding_skip_variant_does_not_visit_padding_tiles():
    """NaN in every input at padding tokens 0-31 of a row whose real tokens are 40-63 (16 x 16 tiles): only
    tiles 32-47 on hold both, so a kernel that read the all-padding tiles would give NaN (0 * NaN). The default
    variant does read them (and does give NaN); the skip variant gives exactly the clean result."""
    import triton

    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    q, k, v = _inputs((1, 64, 2, 64), (1, 64, 1, 64), torch.float32)
    do = torch.randn(1, 64, 2, 64, device=DEVICE)
    mask = torch.zeros(1, 64, dtype=torch.bool, device=DEVICE)
    mask[:, 40:] = True
    with forced_configs(fwd=config, dq=config, dkdv=config), attention_variants(padding="skip"):
        clean_out = bidirectional_attention(q, k, v, key_padding_mask=mask, impl="triton")
        clean = (clean_out,) + _grads(clean_out, (q, k, v), do)
        *pq, pdo = _poisoned((q, k, v, do), slice(0, 32))
        out = bidirectional_attention(*pq, key_padding_mask=mask, impl="triton")
        got = (out,) + _grads(out, pq, pdo)
        for g, c in zip(got, clean):
            torch.testing.assert_close(g, c, atol=0, rtol=0)
    with forced_configs(fwd=config), torch.no_grad():
        assert torch.isnan(bidirectional_attention(*pq, key_padding_mask=mask, impl="triton")[:, 40:]).any()


# causal forbids trailing tokens
@pytest.mark.parametrize("flags", slow_except([pytest.param({}, id="plain"), FLAGS[4]], "plain"))
def test_padding_skip_variant_varlen_zeroes_only_the_tail(flags):
    """Packed outputs are allocated empty: tokens past cu_seqlens[-1] must still come out exactly zero."""
    lengths = [1, 37, 20, 2]
    total = sum(lengths) + 5
    cu = _cu_seqlens(lengths)
    q, k, v = _inputs((total, 4, 64), (total, 2, 64), torch.float32)
    with attention_variants(padding="skip"):
        out, dq, dk, dv = _compare(q, k, v, torch.float32, cu_seqlens=cu, max_seqlen=37, **flags)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.all(t[sum(lengths):] == 0), f"{name} past cu_seqlens[-1] must be zero"


def test_variant_names_are_checked_and_restored():
    from llm2vec_fast.kernels.attention import _VARIANT

    with pytest.raises(ValueError, match="unknown attention variant"):
        with attention_variants(pading="skip"):
            pass
    # (setting, a choice it does not have, one it has, its default)
    for name, wrong, choice, default in (("padding", "fast", "skip", "mask"), ("forward", "tma", "tma_ws", "default"),
                                         ("dkdv", "wg128", "wg64", "default")):
        with pytest.raises(ValueError, match="choose from"):
            with attention_variants(**{name: wrong}):
                pass
        with attention_variants(**{name: choice}):
            assert _VARIANT[name] == choice
        assert _VARIANT[name] == default


# ---------------------------------------------------------------------------------------------------------
# The Hopper forward variant (forward="tma_ws": tensor descriptors, a warp-specialized key loop)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def tma_calls(monkeypatch):
    """Counts the launches of the tma_ws forward, so that a test knows it ran (and not the fallback)."""
    calls = []
    original = attn_module._attention_forward_tma
    monkeypatch.setattr(attn_module, "_attention_forward_tma", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["s37-d64-gqa2", "padding-s37-d64", "varlen-d64-mqa", "s37-d128-mqa"])
def test_tma_forward_matches_reference(case, dtype, tma_calls):
    """Forward against the fp64 reference, and the backward (the default backward kernels, fed the variant's
    log-sum-exp) too: odd lengths, GQA/MQA, padding and packed batches."""
    kwargs = {}
    if case == "varlen-d64-mqa":
        lengths = [1, 37, 20, 16]
        q, k, v = _inputs((sum(lengths) + 3, 4, 64), (sum(lengths) + 3, 1, 64), dtype)  # 3 tokens past the end
        kwargs = dict(cu_seqlens=_cu_seqlens(lengths), max_seqlen=37)
    else:
        head_dim, kv_heads = (128, 1) if case == "s37-d128-mqa" else (64, 2)
        batch = 3 if case.startswith("padding") else 2
        q, k, v = _inputs((batch, 37, 4, head_dim), (batch, 37, kv_heads, head_dim), dtype)
        if case.startswith("padding"):
            kwargs = dict(key_padding_mask=_padding_mask(batch, 37))
    with attention_variants(forward="tma_ws"):
        out, dq, dk, dv = _compare(q, k, v, dtype, **kwargs)
    assert tma_calls, "the tma_ws forward did not run"
    if "key_padding_mask" in kwargs:
        assert torch.all(out[~kwargs["key_padding_mask"]] == 0), "padded query rows must be exactly zero"
    if "cu_seqlens" in kwargs:
        assert torch.all(out[-3:] == 0), "tokens past cu_seqlens[-1] must be zero"


def test_tma_forward_writes_the_default_log_sum_exp(tma_calls):
    """The backward kernels read the forward's log-sum-exp: the variant must write the default's (base 2,
    +inf on padded rows), and the same output."""
    from llm2vec_fast.kernels.attention import _attention_forward, _Problem

    q, k, v = _inputs((3, 37, 4, 64), (3, 37, 2, 64), torch.float32)
    mask = _padding_mask(3, 37)
    seed = torch.empty(1, dtype=torch.int64)
    with torch.no_grad():
        ref_out, ref_lse = _attention_forward(q, k, v, _Problem(q, k, v, mask, None, None, None, 0.0), seed, True)
        with attention_variants(forward="tma_ws"):
            out, lse = _attention_forward(q, k, v, _Problem(q, k, v, mask, None, None, None, 0.0), seed, True)
    assert tma_calls
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), ~mask[:, None, :].expand_as(lse)), "+inf exactly on padded rows"
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["heads-major", "sliced", "offset"])
def test_tma_forward_layouts(layout, tma_calls):
    """transformers' (batch, heads, seq, head_dim) memory seen as (batch, seq, heads, head_dim) is read in place;
    a view a descriptor cannot take (heads cut from a wider tensor, a base off 16 bytes) is copied first."""
    q, k, v = _inputs((2, 37, 4, 64), (2, 37, 2, 64), torch.float32)
    with torch.no_grad():
        ref = bidirectional_attention(q, k, v, impl="triton")
        if layout == "heads-major":
            views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
        elif layout == "sliced":  # (2, 37, 4 of 6 heads, 64): rows of 6 heads, of which 4 are read
            views = [torch.cat([t, t[:, :, :2]], 2)[:, :, : t.shape[2]] for t in (q, k, v)]
        else:  # a contiguous tensor that starts 4 bytes into its storage
            views = [torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) for t in (q, k, v)]
        with attention_variants(forward="tma_ws"):
            out = bidirectional_attention(*views, impl="triton")
    assert tma_calls
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_tma_forward_never_reads_past_its_sequence():
    """NaN in the tokens past cu_seqlens[-1] (the last tile's descriptor rows reach them): no output may see it."""
    lengths = [5, 21]
    q, k, v = _inputs((sum(lengths) + 11, 2, 64), (sum(lengths) + 11, 1, 64), torch.float32)
    q, k, v = (t.detach().clone() for t in (q, k, v))
    for t in (q, k, v):
        t[sum(lengths):] = float("nan")
    cu = _cu_seqlens(lengths)
    with torch.no_grad(), attention_variants(forward="tma_ws"):
        out = bidirectional_attention(q, k, v, cu_seqlens=cu, max_seqlen=21, impl="triton")
    assert not torch.isnan(out[: sum(lengths)]).any()
    ref = bidirectional_attention_reference(q[: sum(lengths)], k[: sum(lengths)], v[: sum(lengths)],
                                            cu_seqlens=cu, max_seqlen=21)
    torch.testing.assert_close(out[: sum(lengths)], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(dropout_p=0.1), "dropout"), (dict(causal=True), "causal"), (dict(window=5), "window"),
    (dict(logit_softcap=2.0), "logit_softcap"), (dict(head_dim=96), "head_dim 96"),
])
def test_tma_forward_falls_back_with_a_warning(kwargs, reason, tma_calls, caplog):
    """Modes the variant does not have run the default forward, and say so (once per reason)."""
    kwargs = dict(kwargs)
    head_dim = kwargs.pop("head_dim", 64)
    q, k, v = _inputs((1, 20, 2, head_dim), (1, 20, 2, head_dim), torch.float32)
    attn_module._warned_tma.clear()
    with torch.no_grad(), caplog.at_level("WARNING", logger=attn_module.__name__):
        torch.manual_seed(0)
        ref = bidirectional_attention(q, k, v, impl="triton", **kwargs)
        with attention_variants(forward="tma_ws"):
            torch.manual_seed(0)
            out = bidirectional_attention(q, k, v, impl="triton", **kwargs)
    assert not tma_calls
    assert torch.equal(out, ref)
    assert any(reason in r.getMessage() and "tma_ws" in r.getMessage() for r in caplog.records), caplog.text


# ---------------------------------------------------------------------------------------------------------
# The dropout variant with 16 keep-decisions per Philox call (dropout="philox4x")
# ---------------------------------------------------------------------------------------------------------

_U32 = 0xFFFFFFFF


def _philox4x32_10(seed: int, counters):
    """Philox-4x32-10 (Salmon et al. 2011, as ``tl.philox``: key = the seed's low and high words) in numpy,
    elementwise over four uint64 arrays of 32-bit counters: the four output words."""
    import numpy as np

    c = [np.asarray(x, dtype=np.uint64) & np.uint64(_U32) for x in counters]
    k0, k1 = np.uint64(seed & _U32), np.uint64((seed >> 32) & _U32)
    mul_a, mul_b, m32, s32 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), np.uint64(_U32), np.uint64(32)
    for _ in range(10):
        p0, p2 = mul_a * c[0], mul_b * c[2]  # 32 x 32 -> 64-bit products: no overflow in uint64
        c = [((p2 >> s32) ^ c[1] ^ k0) & m32, p2 & m32, ((p0 >> s32) ^ c[3] ^ k1) & m32, p0 & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return c


def test_philox4x_keep_mask_is_the_16_bytes_of_one_philox_call():
    """Every element of the variant's keep-mask, against Philox computed here: key j of query i (head bh) is
    byte j % 4 of word (j % 16) // 4 of Philox(seed; j // 16, i, bh, 1), kept iff >= round(256 p)."""
    import numpy as np

    seed_value, batch, heads, seq, p = 2**40 + 12345, 2, 3, 37, 0.1
    with attention_variants(dropout="philox4x"):
        keep = attention_dropout_keep_mask(torch.tensor([seed_value], device=DEVICE), batch, heads, seq, p)
    bh, i, j = np.meshgrid(np.arange(batch * heads), np.arange(seq), np.arange(seq), indexing="ij")
    words = np.stack(_philox4x32_10(seed_value, (j // 16, i, bh, np.ones_like(i))), -1)
    word = np.take_along_axis(words, ((j % 16) // 4)[..., None], -1)[..., 0]
    byte = (word >> (8 * (j % 4)).astype(np.uint64)) & np.uint64(0xFF)
    expected = torch.from_numpy(byte >= round(256 * p)).reshape(batch, heads, seq, seq)
    assert torch.equal(keep.cpu(), expected)


def test_philox4x_kept_fraction_and_independence():
    """Over a large mask the kept fraction is 1 - effective p within 6 standard errors, in every one of the 16
    byte positions too (a wrong shift or word would bias some); the same seed gives the same mask, and the mask
    is not the default variant's (another use of the RNG)."""
    p = 0.3
    p_eff = attn_module.effective_dropout_p(p, "philox4x")
    assert p_eff == 77 / 256
    torch.manual_seed(0)
    seed = draw_dropout_seed(torch.device(DEVICE))
    with attention_variants(dropout="philox4x"):
        keep = attention_dropout_keep_mask(seed, 2, 2, 128, p)
        again = attention_dropout_keep_mask(seed, 2, 2, 128, p)
    assert torch.equal(keep, again)
    sigma = math.sqrt(p_eff * (1 - p_eff) / keep.numel())
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p_eff)) < 6 * sigma, f"kept fraction {frac:.4f}, expected {1 - p_eff:.4f}"
    per_byte = keep.float().reshape(2, 2, 128, 8, 16).mean(dim=(0, 1, 2, 3))
    assert torch.all((per_byte - (1 - p_eff)).abs() < 6 * 4 * sigma), per_byte  # 16 groups: 4x the error
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0, :, :16], keep[0, 0, :, 16:32]), "key groups must not repeat"
    default = attention_dropout_keep_mask(seed, 2, 2, 128, p)
    assert (default != keep).float().mean() > 0.2, "philox4x must not reuse the default variant's numbers"


PHILOX4X_CASES = slow_except([
    pytest.param("padding-s37-d64-gqa2", torch.float32, id="padding-s37-d64-gqa2-fp32"),
    pytest.param("padding-s37-d64-gqa2", torch.float16, id="padding-s37-d64-gqa2-fp16"),
    pytest.param("varlen-d64-gqa2", torch.float32, id="varlen-d64-gqa2-fp32"),
    pytest.param("varlen-d64-gqa2", torch.float16, id="varlen-d64-gqa2-fp16"),
    pytest.param("s37-d128-mqa", torch.float32, id="s37-d128-mqa-fp32"),
], "padding-s37-d64-gqa2-fp32")


@pytest.mark.parametrize("case,dtype", PHILOX4X_CASES)
def test_philox4x_dropout_matches_reference(case, dtype):
    """Forward and dq/dk/dv against the fp64 reference under the variant's keep-mask and effective p: seq 37,
    padded (left+right padded and fully padded rows), packed and GQA/MQA."""
    p = 0.1
    kwargs = {}
    if case.startswith("varlen"):
        lengths = [1, 37, 20, 16]
        q, k, v = _inputs((sum(lengths), 4, 64), (sum(lengths), 2, 64), dtype)
        kwargs = dict(cu_seqlens=_cu_seqlens(lengths), max_seqlen=37)
        batch, heads, seq = len(lengths), 4, 37
    else:
        head_dim, kv_heads = (128, 1) if case == "s37-d128-mqa" else (64, 2)
        batch = 3 if case.startswith("padding") else 2
        q, k, v = _inputs((batch, 37, 4, head_dim), (batch, 37, kv_heads, head_dim), dtype)
        heads, seq = 4, 37
        if case.startswith("padding"):
            kwargs = dict(key_padding_mask=_padding_mask(batch, 37))
    with attention_variants(dropout="philox4x"):
        torch.manual_seed(3)
        keep = attention_dropout_keep_mask(draw_dropout_seed(torch.device(DEVICE)), batch, heads, seq, p)
        out, *_ = _compare(q, k, v, dtype, keep=keep, dropout_p=attn_module.effective_dropout_p(p), seed=3,
                           **kwargs)
    with torch.no_grad():
        torch.manual_seed(3)
        assert not torch.equal(out, bidirectional_attention(q, k, v, dropout_p=p, impl="triton", **kwargs)), \
            "the default variant draws another mask"
    if "key_padding_mask" in kwargs:
        assert torch.all(out[~kwargs["key_padding_mask"]] == 0), "padded query rows must be exactly zero"


def test_philox4x_backward_uses_its_forwards_variant():
    """The variant travels with the call: a backward run after the ``attention_variants`` block has closed
    regenerates the forward's mask (the same gradients as one run inside it), not the default variant's."""
    q, k, v = _inputs((1, 37, 2, 32), (1, 37, 1, 32), torch.float32)
    do = torch.randn(1, 37, 2, 32, device=DEVICE)
    with attention_variants(dropout="philox4x"):
        torch.manual_seed(5)
        inside = _grads(bidirectional_attention(q, k, v, dropout_p=0.25, impl="triton"), (q, k, v), do)
        torch.manual_seed(5)
        out = bidirectional_attention(q, k, v, dropout_p=0.25, impl="triton")
    after = _grads(out, (q, k, v), do)
    for a, b in zip(after, inside):
        assert torch.equal(a, b)


def test_philox4x_effective_dropout_p_and_its_errors():
    """p is applied as round(256 p) / 256 (the default variant applies p itself); a p that this moves by more
    than 10% of itself (or to 0 or 1) is refused with an error naming it, before anything runs."""
    effective = attn_module.effective_dropout_p
    assert effective(0.1, "philox4x") == 26 / 256 and effective(0.5, "philox4x") == 0.5
    assert effective(0.0, "philox4x") == 0.0 and effective(0.1, "philox") == 0.1
    assert effective(0.1) == 0.1  # the default variant, outside any block
    with attention_variants(dropout="philox4x"):
        assert effective(0.05) == 13 / 256
    for bad in (0.01, 0.001, 0.999):
        with pytest.raises(ValueError, match=f"dropout_p={bad}"):
            effective(bad, "philox4x")
    with pytest.raises(ValueError, match="unknown dropout variant"):
        effective(0.1, "philox8x")
    q, k, v = _inputs((1, 5, 2, 32), (1, 5, 2, 32), torch.float32)
    with attention_variants(dropout="philox4x"), pytest.raises(ValueError, match="dropout_p=0.01"):
        bidirectional_attention(q, k, v, dropout_p=0.01, impl="triton")
    with pytest.raises(ValueError, match="choose from"):
        with attention_variants(dropout="philox8x"):
            pass
    with attention_variants(dropout="philox4x"):
        assert attn_module._VARIANT["dropout"] == "philox4x"
    assert attn_module._VARIANT["dropout"] == "philox"


def test_philox4x_key_tiles_are_multiples_of_16():
    """Each Philox call covers 16 keys of one tile: every key tile a config may have (BLOCK_N: keys in all
    three kernels) is a multiple of 16, in every candidate list and the interpreter's configs."""
    lists = [attn_module._FWD_CANDIDATES, attn_module._DQ_CANDIDATES, attn_module._DKDV_CANDIDATES,
             *attn_module._FP32_CANDIDATES.values(), *attn_module._WIDE_HEAD_CANDIDATES.values(),
             *attn_module._WIDE_HEAD_DROPOUT_CANDIDATES.values(), list(attn_module._INTERPRETER_CONFIG.values())]
    bad = [config for configs in lists for config in configs if config[1] % 16]
    assert not bad, f"configs whose key tile is not a multiple of 16: {bad}"


def test_pruning_reads_philox4x():
    """The PHILOX4X constexpr reaches candidate_configs (it has its own spill lines)."""
    named = dict(GROUP=1, HAS_DROPOUT=True, HAS_PADDING=False, IS_VARLEN=False, BLOCK_D=64, DOT_PRECISION="tf32",
                 PHILOX4X=True)
    for kind, kernel in (("fwd", attn_module._attn_fwd_kernel), ("dq", attn_module._attn_bwd_dq_kernel),
                         ("dkdv", attn_module._attn_bwd_dkdv_kernel)):
        assert "PHILOX4X" in kernel.keys, "philox4x configs are tuned apart from the default RNG's"
        seen = []
        original = attn_module.candidate_configs
        try:
            attn_module.candidate_configs = lambda *a, **kw: seen.append(kw) or original(*a, **kw)
            attn_module._INTERPRET, interpret = False, attn_module._INTERPRET
            attn_module._prune(kind)(kernel.configs, named)
        finally:
            attn_module.candidate_configs, attn_module._INTERPRET = original, interpret
        assert seen and seen[0]["philox4x"] is True, kind
# The dK/dV variant dkdv="wg64": each warpgroup owns 64 keys and streams 64 queries
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def wg64_calls(monkeypatch):
    """Counts the dK/dV launches with ``WG64`` on, so that a test knows the variant ran (and not the fallback)."""
    calls = []
    original = attn_module._launch

    def launch(kernel, kind, grid, *args, **kwargs):
        if kind == "dkdv" and kwargs.get("WG64"):
            calls.append(1)
        return original(kernel, kind, grid, *args, **kwargs)

    monkeypatch.setattr(attn_module, "_launch", launch)
    return calls


@pytest.fixture
def wg64_everywhere(monkeypatch):
    """The variant's kernel path in every mode, also where the sm_90 compiles make it fall back today (dropout,
    GQA at head_dim 96): the kernel must be right wherever a later gate lets it run."""
    monkeypatch.setattr(attn_module, "_dkdv_wg64_unsupported", lambda problem, q: None)


WG64_CASES = slow_except(["s37-d64-gqa2", "padding-s37-d64-gqa2", "varlen-d64-mqa", "dropout-s37-d64",
                          "s37-d96-gqa2"], "s37-d64-gqa2")


def _wg64_case(case, dtype):
    kwargs = {}
    if case == "varlen-d64-mqa":
        lengths = [1, 37, 20, 16]
        q, k, v = _inputs((sum(lengths) + 3, 4, 64), (sum(lengths) + 3, 1, 64), dtype)  # 3 tokens past the end
        return (q, k, v), dict(cu_seqlens=_cu_seqlens(lengths), max_seqlen=37)
    head_dim = 96 if "d96" in case else 64
    batch = 3 if case.startswith("padding") else 2
    q, k, v = _inputs((batch, 37, 4, head_dim), (batch, 37, 2, head_dim), dtype)
    if case.startswith("padding"):
        kwargs = dict(key_padding_mask=_padding_mask(batch, 37))
    if case.startswith("dropout"):
        torch.manual_seed(3)
        kwargs = dict(keep=attention_dropout_keep_mask(draw_dropout_seed(q.device), batch, 4, 37, 0.25),
                      dropout_p=0.25, seed=3)
    return (q, k, v), kwargs


@pytest.mark.parametrize("dtype", FP16_SLOW)
@pytest.mark.parametrize("case", WG64_CASES)
def test_dkdv_wg64_matches_reference(case, dtype, wg64_calls, wg64_everywhere):
    """dq/dk/dv against the fp64 reference with the variant's dK/dV (interpreter tile 32 queries x 16 keys): odd
    lengths, GQA/MQA, padding, packed batches, dropout, head_dim 96 (padded to 128 in registers)."""
    (q, k, v), kwargs = _wg64_case(case, dtype)
    with attention_variants(dkdv="wg64"):
        out, dq, dk, dv = _compare(q, k, v, dtype, **kwargs)
    assert wg64_calls, "the wg64 dK/dV did not run"
    if "key_padding_mask" in kwargs:
        mask = kwargs["key_padding_mask"]
        assert torch.all(dk[~mask] == 0) and torch.all(dv[~mask] == 0), "padded keys must get zero gradients"
    if "cu_seqlens" in kwargs:
        assert torch.all(dk[-3:] == 0) and torch.all(dv[-3:] == 0), "tokens past cu_seqlens[-1] must be zero"


@pytest.mark.parametrize("config", slow_except([pytest.param((64, 128, 8, 2), id="64x128w8"),
                                              pytest.param((64, 64, 4, 2), id="64x64w4")], "64x128w8"))
def test_dkdv_wg64_real_tiles(config, wg64_calls):
    """The variant's sm_90 tile shapes (64 queries over 64 or 128 keys), forced in the interpreter: 70 tokens give
    a full query tile and a masked tail, and with 64 keys two key tiles; GQA and padding (key 69 padded)."""
    import triton

    block_m, block_n, warps, stages = config
    forced = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    q, k, v = _inputs((2, 70, 4, 64), (2, 70, 2, 64), torch.float32)
    mask = torch.ones(2, 70, dtype=torch.bool, device=DEVICE)
    mask[1, 60:] = False
    with forced_configs(dkdv=forced), attention_variants(dkdv="wg64"):
        _compare(q, k, v, torch.float32, key_padding_mask=mask)
    assert wg64_calls


@pytest.mark.parametrize("kwargs,reason", [
    (dict(head_dim=256), "head_dim 256"),
    (dict(head_dim=128, kv_heads=1), "head_dim 128"),  # GQA at head_dim 128: every tile spilled
    (dict(dropout_p=0.1), "with dropout"),
])
def test_dkdv_wg64_falls_back_with_a_warning(kwargs, reason, wg64_calls, caplog):
    """Where no 64-key warpgroup tile fits registers on sm_90 the default dK/dV runs, bit for bit, and says so once."""
    kwargs = dict(kwargs)
    head_dim, kv_heads = kwargs.pop("head_dim", 64), kwargs.pop("kv_heads", 2)
    q, k, v = _inputs((1, 20, 2, head_dim), (1, 20, kv_heads, head_dim), torch.float32)
    do = torch.randn(1, 20, 2, head_dim, device=DEVICE)
    attn_module._warned_wg64.clear()
    with caplog.at_level("WARNING", logger=attn_module.__name__):
        torch.manual_seed(0)
        ref = _grads(bidirectional_attention(q, k, v, impl="triton", **kwargs), (q, k, v), do)
        with attention_variants(dkdv="wg64"):
            torch.manual_seed(0)
            got = _grads(bidirectional_attention(q, k, v, impl="triton", **kwargs), (q, k, v), do)
    assert not wg64_calls
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    messages = [r.getMessage() for r in caplog.records if "wg64" in r.getMessage()]
    assert len(messages) == 1 and reason in messages[0], caplog.text


def test_dkdv_wg64_pruning_reads_the_flag(monkeypatch):
    """``WG64`` picks the variant's configs (and only those), by the gate's table; the default's are untouched."""
    import triton

    # the GPU's config list (under the interpreter the kernel holds the interpreter's configs only)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for m, n, w, st in attn_module._DKDV_CANDIDATES + attn_module._DKDV_WG64_CANDIDATES]
    named = dict(GROUP=2, HAS_DROPOUT=False, HAS_PADDING=True, IS_VARLEN=False, BLOCK_D=64, DOT_PRECISION="tf32")
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    monkeypatch.setattr(attn_module, "_INTERPRET", False)
    monkeypatch.setattr(attn_module, "_AUTOTUNE", True)
    wg64 = [shape(c) for c in attn_module._prune("dkdv")(configs, {**named, "WG64": True})]
    default = [shape(c) for c in attn_module._prune("dkdv")(configs, {**named, "WG64": False})]
    assert wg64 == list(attn_module._DKDV_WG64_FITS[(64, False, False, False)])
    assert default == attn_module.candidate_configs("dkdv", 64, "tf32", group=2, has_padding=True)
    assert not set(wg64) & set(default)
    assert all(block_m == 64 and block_n // (warps // 4) == 64 for block_m, block_n, warps, _ in wg64), \
        "every warpgroup owns 64 keys and streams 64 queries"
    assert attn_module.candidate_configs("dkdv_wg64", 64, "ieee") == []


def test_pruning_reads_every_flag_of_every_kernel():
    """The spill-aware pruning picks configs per flag combination, so every constexpr flag of an autotuned
    kernel must reach it (``_launch`` passes them by keyword), or be on record as not changing which configs
    fit: a new flag cannot be added without its spill line."""
    kernels = [attn_module._attn_fwd_kernel, attn_module._attn_bwd_dq_kernel, attn_module._attn_bwd_dkdv_kernel,
               attn_module._attn_fwd_tma_kernel]
    import inspect

    unread = {}
    for kernel in kernels:
        raw = kernel.fn.fn  # the Python function under the JIT (or interpreter) wrapper
        flags = {name for name, p in inspect.signature(raw).parameters.items()
                 if "constexpr" in str(p.annotation)} - {"BLOCK_M", "BLOCK_N"}
        assert {"HEAD_DIM", "BLOCK_D", "GROUP"} <= flags
        missing = flags - set(attn_module.PRUNE_READS) - set(attn_module.PRUNE_IGNORES)
        if missing:
            unread[raw.__name__] = sorted(missing)
        assert set(kernel.keys) <= flags | {"SEQ_BUCKET"}, "autotuning keys must be flags the kernel has"
    assert not unread, f"constexprs the pruning does not read: {unread}"
    named = dict(GROUP=4, HAS_DROPOUT=True, HAS_PADDING=True, IS_VARLEN=False, BLOCK_D=128, DOT_PRECISION="tf32")
    configs = attn_module._attn_bwd_dkdv_kernel.configs
    for flag in attn_module.BANDED_FLAGS:  # each banded flag alone reaches candidate_configs
        seen = []
        original = attn_module.candidate_configs
        try:
            attn_module.candidate_configs = lambda *a, **kw: seen.append(kw) or original(*a, **kw)
            attn_module._INTERPRET, interpret = False, attn_module._INTERPRET
            attn_module._prune("dkdv")(configs, {**named, flag: True})
        finally:
            attn_module.candidate_configs, attn_module._INTERPRET = original, interpret
        assert seen and seen[0]["banded"] is True, flag


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------


def _bad_cases():
    q = torch.randn(2, 5, 6, 32)
    k = torch.randn(2, 5, 2, 32)
    qp = torch.randn(7, 6, 32)
    kp = torch.randn(7, 2, 32)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    return [
        ("3-D q without", dict(q=q[0], k=k[0], v=k[0]), r"\(batch, seq, heads, head_dim\)"),
        ("heads", dict(q=q, k=torch.randn(2, 5, 4, 32), v=torch.randn(2, 5, 4, 32)), r"multiple of kv_heads"),
        ("head_dim", dict(q=q, k=torch.randn(2, 5, 2, 16), v=torch.randn(2, 5, 2, 16)), r"head_dim"),
        ("k/v shape", dict(q=q, k=k, v=torch.randn(2, 5, 3, 32)), r"same shape"),
        ("seq", dict(q=q, k=torch.randn(2, 4, 2, 32), v=torch.randn(2, 4, 2, 32)), r"share batch and seq"),
        ("dtype", dict(q=q.double(), k=k.double(), v=k.double()), r"dtype"),
        ("mixed dtype", dict(q=q.half(), k=k, v=k), r"share one dtype"),
        ("mask dtype", dict(q=q, k=k, v=k, key_padding_mask=mask.float()), r"bool"),
        ("mask shape", dict(q=q, k=k, v=k, key_padding_mask=mask[:, :4]), r"\(batch, seq\)"),
        ("dropout", dict(q=q, k=k, v=k, dropout_p=1.0), r"dropout_p"),
        ("dropout<0", dict(q=q, k=k, v=k, dropout_p=-0.1), r"dropout_p"),
        ("scale", dict(q=q, k=k, v=k, softmax_scale=-1.0), r"softmax_scale"),
        ("max_seqlen alone", dict(q=q, k=k, v=k, max_seqlen=5), r"only meaningful with cu_seqlens"),
        ("cu dtype", dict(q=qp, k=kp, v=kp, cu_seqlens=cu.long(), max_seqlen=4), r"int32"),
        ("cu + mask", dict(q=qp, k=kp, v=kp, cu_seqlens=cu, max_seqlen=4, key_padding_mask=mask), r"not both"),
        ("cu no max", dict(q=qp, k=kp, v=kp, cu_seqlens=cu), r"needs max_seqlen"),
        ("cu values", dict(q=qp, k=kp, v=kp, cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32), max_seqlen=6),
         r"end at most"),
        ("max too small", dict(q=qp, k=kp, v=kp, cu_seqlens=cu, max_seqlen=3), r"below the longest"),
        ("cu length", dict(q=qp, k=kp, v=kp, cu_seqlens=cu[:1], max_seqlen=3), r"batch \+ 1"),
        ("packed 4-D", dict(q=q, k=k, v=k, cu_seqlens=cu, max_seqlen=4), r"total_tokens, heads, head_dim"),
        ("impl", dict(q=q, k=k, v=k, impl="cuda"), r"impl must be one of"),
        ("window 0", dict(q=q, k=k, v=k, window=0), r"window must be an int >= 1"),
        ("window float", dict(q=q, k=k, v=k, window=2.5), r"window must be an int >= 1"),
        ("window bool", dict(q=q, k=k, v=k, window=True), r"window must be an int >= 1"),
        ("softcap 0", dict(q=q, k=k, v=k, logit_softcap=0.0), r"logit_softcap must be a positive"),
        ("softcap<0", dict(q=q, k=k, v=k, logit_softcap=-30.0), r"logit_softcap must be a positive"),
        ("softcap inf", dict(q=q, k=k, v=k, logit_softcap=float("inf")), r"logit_softcap must be a positive"),
        ("causal str", dict(q=q, k=k, v=k, causal="yes"), r"causal must be a bool"),
        ("causal empty seq", dict(q=qp, k=kp, v=kp, cu_seqlens=torch.tensor([0, 3, 3, 7], dtype=torch.int32),
                                  max_seqlen=4, causal=True), r"strictly increasing"),
        ("causal short cu", dict(q=qp, k=kp, v=kp, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32),
                                 max_seqlen=4, causal=True), r"ending at total_tokens"),
    ]


@pytest.mark.parametrize("name,kwargs,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_clear_errors(name, kwargs, match):
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises((ValueError, TypeError)) as info:
        bidirectional_attention(q, k, v, **kwargs)
    assert info.match(match)


def test_triton_rejects_unsupported_head_dim():
    q = torch.randn(1, 4, 2, 20)
    with pytest.raises(ValueError, match="head_dim in 16..256"):
        bidirectional_attention(q, q, q, impl="triton")


# ---------------------------------------------------------------------------------------------------------
# GPU: bf16 (the interpreter's bf16 tl.dot is not trustworthy) and larger shapes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim,dtype",
    [(64, torch.bfloat16), (96, torch.bfloat16), (128, torch.bfloat16), (256, torch.bfloat16), (128, torch.float16)],
    ids=["d64-bf16", "d96-bf16", "d128-bf16", "d256-bf16", "d128-fp16"],
)
@pytest.mark.parametrize("seq,kv_heads", [(1, 1), (37, 2), (1000, 2), (2049, 1)])
def test_gpu_kernel_matches_reference(seq, kv_heads, head_dim, dtype):
    q, k, v = _inputs((2, seq, 6, head_dim), (2, seq, kv_heads, head_dim), dtype)
    mask = torch.ones(2, seq, dtype=torch.bool, device=DEVICE)
    mask[1, seq // 2 :] = False
    _compare(q, k, v, dtype, key_padding_mask=mask)
    _compare(q, k, v, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
def test_gpu_tma_forward_matches_reference(head_dim, tma_calls):
    """forward="tma_ws" on the GPU, bf16: padded with a mask (odd length), packed, transformers' heads-major
    layout; forward and backward."""
    q, k, v = _inputs((2, 1000, 8, head_dim), (2, 1000, 2, head_dim), torch.bfloat16)
    mask = torch.ones(2, 1000, dtype=torch.bool, device=DEVICE)
    mask[1, 700:] = False
    lengths = [1, 300, 17, 1024]
    qp, kp, vp = _inputs((sum(lengths), 8, head_dim), (sum(lengths), 2, head_dim), torch.bfloat16)
    with attention_variants(forward="tma_ws"):
        _compare(q, k, v, torch.bfloat16, key_padding_mask=mask)
        _compare(qp, kp, vp, torch.bfloat16, cu_seqlens=_cu_seqlens(lengths), max_seqlen=1024)
        views = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
        _compare(*views, torch.bfloat16)
    assert len(tma_calls) == 3


@pytest.mark.gpu
def test_gpu_dkdv_wg64_matches_reference(wg64_calls):
    """dkdv="wg64" on the GPU, bf16, where its pruning lets it run: head_dim 64 padded with GQA and packed, head_dim
    128 plain (MHA, no mask; Triton >= 3.9 only, else it falls back); forward and backward against fp64."""
    q, k, v = _inputs((2, 1000, 8, 64), (2, 1000, 2, 64), torch.bfloat16)
    mask = torch.ones(2, 1000, dtype=torch.bool, device=DEVICE)
    mask[1, 700:] = False
    lengths = [1, 300, 17, 1024]
    qp, kp, vp = _inputs((sum(lengths), 8, 64), (sum(lengths), 2, 64), torch.bfloat16)
    q8, k8, v8 = _inputs((2, 1000, 8, 128), (2, 1000, 8, 128), torch.bfloat16)
    with attention_variants(dkdv="wg64"):
        _compare(q, k, v, torch.bfloat16, key_padding_mask=mask)
        _compare(qp, kp, vp, torch.bfloat16, cu_seqlens=_cu_seqlens(lengths), max_seqlen=1024)
        _compare(q8, k8, v8, torch.bfloat16)
    assert len(wg64_calls) == 2 + bool(attn_module.candidate_configs("dkdv_wg64", 128, "tf32"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_varlen_and_dropout(dtype):
    lengths = [1, 300, 17, 1024, 2]
    cu = _cu_seqlens(lengths)
    q, k, v = _inputs((sum(lengths), 8, 128), (sum(lengths), 2, 128), dtype)
    _compare(q, k, v, dtype, cu_seqlens=cu, max_seqlen=max(lengths))
    torch.manual_seed(7)
    keep = attention_dropout_keep_mask(draw_dropout_seed(q.device), len(lengths), 8, max(lengths), 0.3)
    _compare(q, k, v, dtype, keep=keep, dropout_p=0.3, seed=7, cu_seqlens=cu, max_seqlen=max(lengths))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_every_candidate_config(head_dim):
    """Every config the autotuner may pick is correct (not only the one it picks on this machine)."""
    q, k, v = _inputs((2, 300, 4, head_dim), (2, 300, 2, head_dim), torch.bfloat16)
    mask = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    mask[0, 250:] = False
    fitting = {
        kind: attn_module._fitting_configs(kind, attn_module._make_configs(kind, candidates), head_dim, "tf32")
        for kind, candidates in (
            ("fwd", attn_module._FWD_CANDIDATES),
            ("dq", attn_module._DQ_CANDIDATES),
            ("dkdv", attn_module._DKDV_CANDIDATES),
        )
    }
    rounds = max(len(configs) for configs in fitting.values())
    for i in range(rounds):  # every fitting config of every kernel runs at least once
        with forced_configs(**{kind: configs[i % len(configs)] for kind, configs in fitting.items()}):
            _compare(q, k, v, torch.bfloat16, key_padding_mask=mask)


@pytest.mark.gpu
def test_gpu_philox4x_dropout():
    """dropout="philox4x" compiled: bf16, padded, GQA, head_dim 128, against the reference under its keep-mask;
    and its kept fraction over 8M decisions."""
    p = 0.1
    q, k, v = _inputs((2, 300, 8, 128), (2, 300, 2, 128), torch.bfloat16)
    mask = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    mask[1, :7] = False
    mask[1, 250:] = False
    with attention_variants(dropout="philox4x"):
        p_eff = attn_module.effective_dropout_p(p)
        torch.manual_seed(7)
        keep = attention_dropout_keep_mask(draw_dropout_seed(q.device), 2, 8, 300, p)
        _compare(q, k, v, torch.bfloat16, keep=keep, dropout_p=p_eff, seed=7, key_padding_mask=mask)
        large = attention_dropout_keep_mask(draw_dropout_seed(q.device), 4, 8, 512, p)
    assert abs(large.float().mean().item() - (1 - p_eff)) < 6 * math.sqrt(p_eff * (1 - p_eff) / large.numel())


@pytest.mark.gpu
def test_gpu_dropout_kept_fraction_large():
    torch.manual_seed(0)
    keep = attention_dropout_keep_mask(draw_dropout_seed(torch.device("cuda")), 4, 8, 512, 0.1)
    n = keep.numel()
    assert abs(keep.float().mean().item() - 0.9) < 6 * math.sqrt(0.09 / n)
