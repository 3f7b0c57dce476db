"""The fused masked next-token loss against a float64 full-logits reference (Triton through the interpreter here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import slow_except

from llm2vec_fast.kernels import masked_next_token_loss
from llm2vec_fast.kernels.mntp_loss import masked_next_token_loss_reference

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from kernel_ir import int32_index_products  # noqa: E402

BATCH, SEQ, HIDDEN, VOCAB = 2, 37, 64, 123
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# (impl, variant): both Triton variants (in the interpreter here) and the chunked PyTorch path.
PATHS = [("triton", "fused"), ("triton", "gemm"), ("torch", "auto")]
PATH_IDS = ["fused", "gemm", "torch"]


def make_inputs(dtype, *, seed=0, label_fraction=0.3, bias=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(BATCH, SEQ, HIDDEN, generator=gen) * 0.5).to(dtype).to(device)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3).to(dtype).to(device)
    b = (torch.randn(VOCAB, generator=gen) * 0.2).to(dtype).to(device) if bias else None
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[torch.rand(BATCH, SEQ, generator=gen) >= label_fraction] = -100
    return hidden, weight, b, labels.to(device)


def run(fn, tensors, labels, upstream, cast=None, **kwargs):
    """Loss and gradients of ``(loss * upstream).sum()`` on fresh leaf copies (optionally cast)."""
    leaves = [None if t is None else t.detach().clone().to(cast or t.dtype).requires_grad_() for t in tensors]
    hidden, weight, bias = leaves
    loss = fn(hidden, weight, labels, bias=bias, **kwargs)
    (loss.double() * upstream).sum().backward()
    return [loss.detach().double()] + [None if t is None else t.grad.double() for t in leaves]


def assert_close_to_reference(outputs, reference, low_reference, dtype, names=("loss", "d_hidden", "d_weight", "d_bias")):
    """flash-attention's rule: error vs float64 at most twice the low-dtype reference's own error, plus a floor."""
    for name, out, ref, low in zip(names, outputs, reference, low_reference):
        if ref is None:
            assert out is None
            continue
        assert torch.isfinite(out).all(), name
        err = (out - ref).abs().max().item()
        own = (low - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        assert err <= 2 * own + FLOOR[dtype] * scale, f"{name}: error {err:.3e}, reference's own error {own:.3e}"


def upstream_for(reduction, seed=1):
    if reduction == "none":
        return torch.randn(BATCH, SEQ, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.tensor(1.7, dtype=torch.float64)


@pytest.mark.parametrize("impl,variant", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", slow_except([pytest.param(torch.float32, id="fp32"),
                                               pytest.param(torch.float16, id="fp16")], "fp32"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("softcap,bias", [(None, False), (2.0, True)], ids=["plain", "softcap+bias"])
def test_matches_float64_reference(impl, variant, dtype, reduction, shift, softcap, bias):
    hidden, weight, b, labels = make_inputs(dtype, seed=shift + 2 * (softcap is not None), bias=bias)
    upstream = upstream_for(reduction)
    kwargs = dict(shift=shift, reduction=reduction, logit_softcap=softcap)
    extra = {"chunk_rows": 7} if variant != "fused" else {}  # several chunks on the PyTorch path and the GEMM variant
    out = run(masked_next_token_loss, (hidden, weight, b), labels, upstream, impl=impl, variant=variant, **kwargs,
              **extra)
    ref = run(masked_next_token_loss_reference, (hidden, weight, b), labels, upstream, cast=torch.float64, **kwargs)
    # The reference's own error in the low dtype: fp32 computation for fp32, fp32-from-fp16 inputs for fp16
    # (this CPU has no fast fp16 matmul; rounding the outputs to fp16 is then the low-dtype error).
    low = run(masked_next_token_loss_reference, (hidden, weight, b), labels, upstream, cast=torch.float32, **kwargs)
    if dtype != torch.float32:
        low = [None if t is None else t.to(dtype).double() for t in low]
    assert_close_to_reference(out, ref, low, dtype)
    if reduction == "none":
        loss = out[0]
        ignored = torch.ones_like(labels, dtype=torch.bool)
        ignored[:, shift:] = labels[:, shift:] == -100
        assert loss.shape == labels.shape
        assert (loss[ignored] == 0).all() and (loss[~ignored] > 0).all()


@pytest.mark.parametrize("impl,variant", PATHS, ids=PATH_IDS)
def test_tied_weights_gradient_reaches_both_uses(impl, variant):
    """The LM head tied to the input embedding: the weight's gradient sums the head's and the embedding's."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[torch.rand(BATCH, SEQ, generator=gen) < 0.6] = -100
    emb0 = torch.randn(VOCAB, HIDDEN, generator=gen).mul_(0.3)
    proj0 = torch.randn(HIDDEN, HIDDEN, generator=gen).div_(HIDDEN**0.5)

    def grads(fn, dtype, **kwargs):
        emb = emb0.detach().clone().to(dtype).requires_grad_()
        proj = proj0.detach().clone().to(dtype).requires_grad_()
        hidden = torch.tanh(torch.nn.functional.embedding(ids, emb) @ proj)
        loss = fn(hidden, emb, labels, **kwargs)
        loss.backward()
        return loss.double(), emb.grad.double(), proj.grad.double()

    out = grads(masked_next_token_loss, torch.float32, impl=impl, variant=variant)
    ref = grads(masked_next_token_loss_reference, torch.float64)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl,variant", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(impl, variant, reduction):
    hidden, weight, b, labels = make_inputs(torch.float32, bias=True)
    labels = torch.full_like(labels, -100)
    labels[:, 0] = 3  # position 0 is never predicted with shift=1: still no valid row
    out = run(masked_next_token_loss, (hidden, weight, b), labels, upstream_for(reduction), impl=impl,
              variant=variant, reduction=reduction)
    for t in out:
        assert torch.isfinite(t).all()
        assert (t == 0).all()


@pytest.mark.parametrize("impl,variant", PATHS, ids=PATH_IDS)
def test_one_valid_row(impl, variant):
    hidden, weight, b, labels = make_inputs(torch.float32, bias=True)
    labels = torch.full_like(labels, -100)
    labels[1, SEQ - 1] = VOCAB - 1  # the last vocabulary entry, in the last vocabulary tile
    upstream = upstream_for("mean")
    out = run(masked_next_token_loss, (hidden, weight, b), labels, upstream, impl=impl, variant=variant)
    ref = run(masked_next_token_loss_reference, (hidden, weight, b), labels, upstream, cast=torch.float64)
    low = run(masked_next_token_loss_reference, (hidden, weight, b), labels, upstream, cast=torch.float32)
    assert_close_to_reference(out, ref, low, torch.float32)
    d_hidden = out[1]
    assert d_hidden[1, SEQ - 2].abs().sum() > 0
    d_hidden[1, SEQ - 2] = 0
    assert (d_hidden == 0).all(), "only the row that predicts the one label gets a gradient"


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bad", [VOCAB, -1, 10**6])
def test_labels_outside_vocabulary_raise(impl, bad):
    hidden, weight, _, labels = make_inputs(torch.float32)
    labels[0, 5] = bad
    with pytest.raises(ValueError, match="outside the vocabulary"):
        masked_next_token_loss(hidden, weight, labels, impl=impl)


@pytest.mark.parametrize("impl,variant", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_head(impl, variant, reduction):
    """The LoRA MNTP case: the LM head needs no gradient; d hidden alone, and no d weight is computed."""
    hidden, weight, b, labels = make_inputs(torch.float32, seed=7, bias=True)
    upstream = upstream_for(reduction)
    leaf = hidden.clone().requires_grad_()
    loss = masked_next_token_loss(leaf, weight, labels, bias=b, impl=impl, variant=variant, reduction=reduction,
                                  chunk_rows=5)
    (loss.double() * upstream).sum().backward()
    ref_leaf = hidden.double().requires_grad_()
    ref = masked_next_token_loss_reference(ref_leaf, weight.double(), labels, bias=b.double(), reduction=reduction)
    (ref * upstream).sum().backward()
    assert weight.grad is None and b.grad is None
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar-scale", "per-row-scale"])
def test_gemm_chunks_with_16bit_operands(per_row):
    """The GEMM variant's CUDA arithmetic on CPU: fp16 operands and ``d logits`` (the interpreter writes them),
    d weight into its fp32 buffer (the fp16 head's branch), against the float64 reference."""
    from llm2vec_fast.kernels.mntp_loss import _gemm_chunks

    hidden, weight, b, labels = make_inputs(torch.float16, seed=12, bias=True)
    rows = hidden.reshape(-1, HIDDEN)[: 40]
    targets = labels.reshape(-1)[: 40].clamp(min=0)
    scale = torch.rand(40, generator=torch.Generator().manual_seed(3)) if per_row else 0.25
    lse, target_logit, dh, dw, db = _gemm_chunks(rows, weight, b, targets, 2.0, 7, {"hidden", "weight", "bias"},
                                                 scale, torch.float16)
    assert dw.dtype == torch.float32
    h64, w64, b64 = (t.double().requires_grad_() for t in (rows, weight, b))
    logits = 2.0 * torch.tanh((h64 @ w64.T + b64) / 2.0)
    per_row_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    weights = scale.double() if per_row else torch.full((40,), scale, dtype=torch.float64)
    (per_row_loss * weights).sum().backward()
    torch.testing.assert_close(lse.double() - target_logit.double(), per_row_loss.detach(), rtol=1e-3, atol=1e-3)
    for ours, ref in ((dh, h64.grad), (dw, w64.grad), (db, b64.grad)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-2, atol=2e-3 * ref.abs().max().item())


def test_gemm_variant_reads_the_count_once_and_fused_never(monkeypatch):
    """The fused path keeps no host sync (no ``.item()``); the GEMM variant reads the labelled-row count once
    per call (forward), none in the backward."""
    hidden, weight, _, labels = make_inputs(torch.float32)
    calls = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or original(self))
    for variant, expected in (("fused", 0), ("gemm", 1)):
        calls.clear()
        leaf = hidden.clone().requires_grad_()
        masked_next_token_loss(leaf, weight, labels, impl="triton", variant=variant).backward()
        assert len(calls) == expected, variant


_MNTP = "llm2vec_fast.kernels.mntp_loss"
_TILES = {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 64, "DOT_PRECISION": "tf32", "HAS_BIAS": True, "HAS_SOFTCAP": True}
_MNTP_KERNELS = [
    [_MNTP, "_mntp_loss_fwd_kernel",
     {"H_ptr": "*bf16", "W_ptr": "*bf16", "B_ptr": "*bf16", "IDX_ptr": "*i64", "Y_ptr": "*i64", "COUNT_ptr": "*i32",
      "MAX_ptr": "*fp32", "SUMEXP_ptr": "*fp32", "TARGET_ptr": "*fp32"}, _TILES, ["softcap"]],
    [_MNTP, "_mntp_loss_bwd_kernel",
     {"H_ptr": "*bf16", "W_ptr": "*bf16", "B_ptr": "*bf16", "IDX_ptr": "*i64", "Y_ptr": "*i64", "COUNT_ptr": "*i32",
      "LSE_ptr": "*fp32", "GRAD_ptr": "*fp32", "DH_ptr": "*fp32", "DW_ptr": "*fp32", "DB_ptr": "*fp32"},
     dict(_TILES, COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True), ["softcap"]],
    [_MNTP, "_mntp_row_softmax_kernel",
     {"Z_ptr": "*fp32", "OUT_ptr": "*bf16", "B_ptr": "*bf16", "Y_ptr": "*i64", "LSE_ptr": "*fp32",
      "TARGET_ptr": "*fp32"}, {"HAS_BIAS": True, "HAS_SOFTCAP": True, "WRITE_GRAD": True, "BLOCK_V": 2048},
     ["softcap"]],
]


def test_kernels_compute_offsets_in_int64():
    """No kernel multiplies int32 index tensors (a 256K vocabulary at hidden 8192 is 2^31 weight elements), read
    from the sm_90 TTIR with every integer argument an i32 scalar; proves the IR's index arithmetic, runs nothing."""
    wrapping = int32_index_products(_MNTP_KERNELS)
    assert sorted(wrapping) == sorted(spec[1] for spec in _MNTP_KERNELS)
    assert not any(wrapping.values()), wrapping


def test_other_ignore_index_is_respected():
    hidden, weight, _, labels = make_inputs(torch.float32)
    custom = labels.clone()
    custom[custom == -100] = -1
    a = masked_next_token_loss(hidden, weight, labels, impl="triton")
    b = masked_next_token_loss(hidden, weight, custom, ignore_index=-1, impl="triton")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(reduction="avg"), "reduction"),
        (dict(shift=-1), "shift"),
        (dict(logit_softcap=0.0), "logit_softcap"),
        (dict(impl="cuda"), "impl"),
        (dict(variant="cublas"), "variant"),
        (dict(chunk_rows=0), "chunk_rows"),
        (dict(weight_shape=(VOCAB, HIDDEN + 1)), "weight"),
        (dict(labels_shape=(BATCH, SEQ + 1)), "labels"),
        (dict(float_labels=True), "integer"),
        (dict(bias_shape=(VOCAB + 1,)), "bias"),
        (dict(bias_device="meta"), "bias and labels must be on one device"),  # e.g. a CPU bias, CUDA hidden
    ],
)
def test_bad_arguments_are_named(change, match):
    hidden, weight, _, labels = make_inputs(torch.float32)
    kwargs = {k: v for k, v in change.items()
              if k in ("reduction", "shift", "logit_softcap", "impl", "variant", "chunk_rows")}
    if "weight_shape" in change:
        weight = torch.randn(change["weight_shape"])
    if "labels_shape" in change:
        labels = torch.zeros(change["labels_shape"], dtype=torch.long)
    if "float_labels" in change:
        labels = labels.float()
    if "bias_shape" in change:
        kwargs["bias"] = torch.randn(change["bias_shape"])
    if "bias_device" in change:
        kwargs["bias"] = torch.randn(VOCAB, device=change["bias_device"])
    with pytest.raises(ValueError, match=match):
        masked_next_token_loss(hidden, weight, labels, **kwargs)


def test_sequence_shorter_than_shift_gives_zero():
    hidden, weight, _, labels = make_inputs(torch.float32)
    hidden = hidden[:, :1].clone().requires_grad_()
    loss = masked_next_token_loss(hidden, weight, labels[:, :1], impl="triton")
    loss.backward()
    assert loss.item() == 0 and (hidden.grad == 0).all()


def test_no_grad_forward_matches():
    hidden, weight, _, labels = make_inputs(torch.float32)
    with torch.no_grad():
        a = masked_next_token_loss(hidden, weight, labels, impl="triton")
    b = masked_next_token_loss_reference(hidden.double(), weight.double(), labels)
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cuda_matches_reference_low_precision(dtype, softcap, variant):
    hidden, weight, b, labels = make_inputs(dtype, bias=True, device="cuda")
    upstream = upstream_for("mean").cuda()
    out = run(masked_next_token_loss, (hidden, weight, b), labels, upstream, impl="triton", variant=variant,
              logit_softcap=softcap)
    ref = run(masked_next_token_loss_reference, (hidden, weight, b), labels, upstream, cast=torch.float64,
              logit_softcap=softcap)
    low = run(masked_next_token_loss_reference, (hidden, weight, b), labels, upstream, logit_softcap=softcap)
    assert_close_to_reference(out, ref, low, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fused", "gemm"])
def test_cuda_large_vocab_fp32(variant):
    """Many vocabulary splits and row blocks past the labelled ones, as in a real MNTP batch."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 301, 256, generator=gen).cuda()
    weight = (torch.randn(32003, 256, generator=gen) * 0.05).cuda()
    labels = torch.randint(0, 32003, (4, 301), generator=gen)
    labels[torch.rand(4, 301, generator=gen) > 0.2] = -100
    labels = labels.cuda()
    upstream = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    out = run(masked_next_token_loss, (hidden, weight, None), labels, upstream, impl="triton", variant=variant)
    ref = run(masked_next_token_loss_reference, (hidden, weight, None), labels, upstream, cast=torch.float64)
    low = run(masked_next_token_loss_reference, (hidden, weight, None), labels, upstream)
    assert_close_to_reference(out, ref, low, torch.float32)


@pytest.mark.parametrize("variant", ["fused", "gemm"])
def test_fp16_gradients_survive_a_tiny_upstream_gradient(variant):
    # The upstream gradient (1 / labelled rows for "mean") times a softmax entry can fall below fp16's smallest
    # subnormal; the kernel must apply it after the 16-bit cast, not before, or those entries vanish from d hidden.
    # Small hidden states and a large head keep the logits moderate while d hidden stays representable in fp16.
    hidden, weight, _, labels = make_inputs(torch.float32)
    hidden, weight = (hidden * 0.02).half(), (weight * 50).half()
    upstream = torch.tensor(2e-6, dtype=torch.float64)
    out = run(masked_next_token_loss, (hidden, weight, None), labels, upstream, impl="triton", variant=variant,
              reduction="sum")
    ref = run(masked_next_token_loss_reference, (hidden, weight, None), labels, upstream, cast=torch.float64,
              reduction="sum")
    relative = ((out[1] - ref[1]).norm() / ref[1].norm()).item()
    assert relative < 2e-2, f"d_hidden: relative error {relative:.3e}"
