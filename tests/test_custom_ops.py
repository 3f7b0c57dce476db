"""The MNTP loss and InfoNCE as torch custom ops: ``torch.library.opcheck`` on every op and mode (CPU, fp32, odd
small shapes, backward included; the Triton paths through the interpreter), and ``torch.compile(fullgraph=True)``
of the public functions: no graph break, the same loss and gradients as eager, no recompile per length.

Training-level compilation (the loss modules, the Trainer's ``torch_compile``) is in test_training_compile.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import slow_except

from llm2vec_fast.kernels import info_nce_loss, masked_next_token_loss
from llm2vec_fast.kernels.infonce import text_hashes

BATCH, SEQ, HIDDEN, VOCAB = 2, 11, 16, 37
PATHS = ("torch", "gemm", "fused")  # the ops' ``path``: chunked PyTorch, and the Triton variants
IMPL_VARIANT = {"torch": ("torch", "auto"), "gemm": ("triton", "gemm"), "fused": ("triton", "fused")}


def mntp_inputs(*, seed=0, ignore_index=-100, fraction=0.4, trained_head=True, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=gen).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3).requires_grad_(trained_head)
    b = (torch.randn(VOCAB, generator=gen) * 0.2).requires_grad_(trained_head) if bias else None
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[torch.rand(BATCH, SEQ, generator=gen) >= fraction] = ignore_index
    return hidden, weight, b, labels


# Every mode of the op, each case on each path: (reduction, shift, softcap, head, ignore_index, labelled fraction).
MNTP_MODES = {
    "mean-trained-head-bias": dict(reduction="mean", shift=1, softcap=None, trained_head=True, bias=True),
    "sum-frozen-head": dict(reduction="sum", shift=1, softcap=None, trained_head=False, bias=False),
    "none-shift0-softcap": dict(reduction="none", shift=0, softcap=3.0, trained_head=True, bias=True),
    "mean-all-ignored-other-index": dict(reduction="mean", shift=1, softcap=None, trained_head=True, bias=False,
                                         ignore_index=7, fraction=0.0),
}


def mntp_op_args(path, mode, chunk_rows=5):
    mode = dict(mode)
    reduction, shift, softcap = mode.pop("reduction"), mode.pop("shift"), mode.pop("softcap")
    ignore_index = mode.get("ignore_index", -100)
    hidden, weight, bias, labels = mntp_inputs(**mode)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return (hidden, weight, bias, labels, shift, ignore_index, reduction, softcap, path, chunk_rows, *needs)


def paths_and_modes(modes, *fast):
    """``(path, mode)`` for every path and mode (ids ``gemm-in-batch``), all but ``fast`` marked slow. The fast loop
    opchecks each path and each mode at least once; every path's outputs in every mode are checked against the
    float64 references (test_mntp_loss.py, test_infonce.py) and, for MNTP, its fake shapes (below) in the fast loop."""
    return slow_except([pytest.param(path, mode, id=f"{path}-{mode}") for mode in modes for path in PATHS], *fast)


@pytest.mark.parametrize("path,mode", paths_and_modes(MNTP_MODES, "torch-mean-trained-head-bias",
                                                      "gemm-sum-frozen-head", "fused-none-shift0-softcap",
                                                      "gemm-mean-all-ignored-other-index"))
def test_mntp_loss_op_passes_opcheck(path, mode):
    """Schema, fake (meta) tensors, autograd registration and AOT dispatch with dynamic shapes: forward and
    backward through torch.compile's machinery, compared with eager."""
    torch.library.opcheck(torch.ops.llm2vec_fast.masked_next_token_loss, mntp_op_args(path, MNTP_MODES[mode]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mntp_loss_backward_op_passes_opcheck(path, reduction):
    args = mntp_op_args(path, dict(MNTP_MODES["mean-trained-head-bias"], reduction=reduction))
    outputs = torch.ops.llm2vec_fast.masked_next_token_loss(*args)
    hidden, weight, bias, _, shift, _, reduction, softcap, path, chunk_rows, *needs = args
    grad = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(5))
    residuals = [t.detach() for t in outputs[1:]]
    torch.library.opcheck(torch.ops.llm2vec_fast.masked_next_token_loss_backward,
                          (grad, hidden.detach(), weight.detach(), bias.detach(), *residuals, shift, reduction,
                           softcap, path, chunk_rows, *needs))


def test_mntp_fake_shapes_match_the_real_outputs():
    """The fake implementation's shapes and dtypes are the real ones, for every path (opcheck checks this too,
    this says which output differs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for path in PATHS:
        for mode in MNTP_MODES.values():
            args = mntp_op_args(path, mode)
            real = torch.ops.llm2vec_fast.masked_next_token_loss(*args)
            with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
                fake_args = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                fake = torch.ops.llm2vec_fast.masked_next_token_loss(*fake_args)
            for index, (r, f) in enumerate(zip(real, fake)):
                assert (tuple(r.shape), r.dtype) == (tuple(f.shape), f.dtype), (path, mode, index)


def infonce_inputs(*, rows=5, negatives=3, dim=12, seed=0, ids=False, ranks=1):
    """Queries of this rank, documents of all ``ranks`` ([positives; negatives], as gathered), optional ids with
    duplicates (false negatives), and the label offset / total rows of rank ``ranks - 1``."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(rows, dim, generator=gen).requires_grad_()
    docs = torch.randn(rows * ranks + negatives, dim, generator=gen).requires_grad_()
    doc_ids = None
    if ids:
        texts = [f"t{i % 4}" for i in range(docs.shape[0])]  # repeats: masked columns
        doc_ids = text_hashes(texts)
    return queries, docs, doc_ids, (ranks - 1) * rows, ranks * rows


INFONCE_MODES = {
    "in-batch": dict(negatives=0),
    "hard-negatives-ids": dict(ids=True),
    "rank1-of-2-gathered": dict(ranks=2, ids=True),
}


@pytest.mark.parametrize("path,mode", paths_and_modes(INFONCE_MODES, "gemm-in-batch", "fused-hard-negatives-ids",
                                                      "torch-rank1-of-2-gathered"))
def test_info_nce_op_passes_opcheck(path, mode):
    queries, docs, doc_ids, offset, total = infonce_inputs(**INFONCE_MODES[mode])
    torch.library.opcheck(torch.ops.llm2vec_fast.info_nce_loss,
                          (queries, docs, doc_ids, 20.0, offset, total, path, True))


@pytest.mark.parametrize("path", PATHS)
def test_info_nce_backward_op_passes_opcheck(path):
    queries, docs, doc_ids, offset, total = infonce_inputs(ids=True, ranks=2)
    outputs = torch.ops.llm2vec_fast.info_nce_loss(queries, docs, doc_ids, 20.0, offset, total, path, True)
    torch.library.opcheck(torch.ops.llm2vec_fast.info_nce_loss_backward,
                          (torch.tensor(1.3), queries.detach(), docs.detach(), doc_ids,
                           *[t.detach() for t in outputs[1:]], 20.0, offset, total, path))


# ---------------------------------------------------------------------------------------------------------------
# torch.compile of the public functions
# ---------------------------------------------------------------------------------------------------------------


def _graph_breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_count, explanation.graph_break_count, [str(r.reason) for r in explanation.break_reasons]


def _mntp_call(path, **kwargs):
    impl, variant = IMPL_VARIANT[path]

    def call(hidden, weight, bias, labels):
        return masked_next_token_loss(hidden, weight, labels, bias=bias, impl=impl, variant=variant, **kwargs)
    return call


def _loss_and_grads(fn, tensors, *rest):
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    loss = fn(*leaves, *rest)
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves if t is not None and t.requires_grad]


def assert_compiled_matches_eager(call, tensors, *, backend="aot_eager", rtol=1e-6, atol=1e-6):
    """``torch.compile(call, fullgraph=True)`` gives eager's loss and gradients for ``tensors``."""
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend=backend)
    for got, want in zip(_loss_and_grads(compiled, tensors), _loss_and_grads(call, tensors)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", PATHS)
def test_mntp_loss_compiles_fullgraph_and_matches_eager(path, reduction):
    hidden, weight, bias, labels = mntp_inputs()
    call = _mntp_call(path, reduction=reduction, logit_softcap=4.0)
    graphs, breaks, reasons = _graph_breaks(call, hidden, weight, bias, labels)
    assert (graphs, breaks) == (1, 0), reasons
    assert_compiled_matches_eager(lambda h, w, b: call(h, w, b, labels), (hidden, weight, bias))


@pytest.mark.parametrize("path", PATHS)
def test_info_nce_compiles_fullgraph_and_matches_eager(path):
    impl, variant = IMPL_VARIANT[path]
    queries, docs, _, _, _ = infonce_inputs()
    positives, negatives = docs[:5].detach().requires_grad_(), docs[5:].detach().requires_grad_()
    ids = text_hashes([f"t{i % 3}" for i in range(8)])

    def call(q, p, n):
        return info_nce_loss(q, p, n, scale=20.0, impl=impl, variant=variant, positive_ids=ids[:5],
                             negative_ids=ids[5:])
    graphs, breaks, reasons = _graph_breaks(call, queries, positives, negatives)
    assert (graphs, breaks) == (1, 0), reasons
    assert_compiled_matches_eager(call, (queries, positives, negatives))


def test_new_lengths_do_not_recompile_with_dynamic_shapes():
    """``dynamic=True``: three sequence lengths and batch sizes (above 1), one graph (the fake implementations take
    symbolic shapes)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    call = torch.compile(_mntp_call("torch"), fullgraph=True, dynamic=True, backend=counter)
    for batch, seq in ((2, 11), (3, 17), (4, 29)):  # sizes of 1 are specialised by dynamo
        gen = torch.Generator().manual_seed(seq)
        hidden = torch.randn(batch, seq, HIDDEN, generator=gen, requires_grad=True)
        weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3
        labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        loss = call(hidden, weight, None, labels)
        loss.backward()
        want = masked_next_token_loss(hidden.detach(), weight, labels, impl="torch")
        torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.slow  # inductor generates and builds C++: about a minute on the loaded 2-core CI machine
def test_mntp_loss_compiles_with_inductor():
    """The real CPU backend (C++ code around our op) once, small: same loss and gradients as eager."""
    from llm2vec_fast.compilation import compiler_unavailable_reason

    reason = compiler_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(reason)
    hidden, weight, bias, labels = mntp_inputs()

    def call(h, w, b):  # the elementwise work around the op is what inductor generates code for
        return masked_next_token_loss(torch.nn.functional.silu(h) * 1.5, w, labels, bias=b, impl="torch")
    assert_compiled_matches_eager(call, (hidden, weight, bias), backend="inductor", rtol=1e-5)


def test_bad_labels_still_raise_under_compile():
    """The CPU label check runs inside the op (no host sync in the graph), so a compiled call still names it."""
    hidden, weight, bias, labels = mntp_inputs()
    labels[0, 3] = VOCAB + 5
    torch._dynamo.reset()
    compiled = torch.compile(_mntp_call("torch"), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=f"label {VOCAB + 5} is outside the vocabulary"):
        compiled(hidden, weight, bias, labels)


# ---------------------------------------------------------------------------------------------------------------
# The attention op's CPU path: ATen's flash attention forward with the log-sum-exps, its flash backward
# ---------------------------------------------------------------------------------------------------------------

ATTENTION_CPU_CASES = {
    "padded-gqa": dict(padded=True),
    "padded-causal-window": dict(padded=True, causal=True, window=5),
    "unpadded-causal": dict(causal=True),
    "packed-gqa": dict(packed=True),
    "packed-window": dict(packed=True, window=4),
}


@pytest.mark.parametrize("case", list(ATTENTION_CPU_CASES), ids=list(ATTENTION_CPU_CASES))
def test_attention_cpu_path_backward_is_flash_from_the_stored_lse_and_matches_the_reference(case, monkeypatch):
    """Outputs and dq/dk/dv against the fp64 reference (fp32, seq 23, GQA 6/2 heads, rows left- and right-padded
    and one fully padded; packed with an empty sequence and a tail past ``cu_seqlens[-1]``), and the backward is
    ATen's flash backward from the forward's log-sum-exps: the explicit (seq x seq) recomputation never runs."""
    from llm2vec_fast.kernels import attention as attn
    from llm2vec_fast.kernels.attention import bidirectional_attention, bidirectional_attention_reference

    flags = dict(ATTENTION_CPU_CASES[case])
    padded, packed = flags.pop("padded", False), flags.pop("packed", False)
    gen = torch.Generator().manual_seed(7)
    kwargs = {}
    if packed:
        cu = torch.tensor([0, 9, 9, 10, 23, 27], dtype=torch.int32)
        shape_q, shape_kv = (30, 6, 16), (30, 2, 16)
        kwargs = dict(cu_seqlens=cu, max_seqlen=13)
    else:
        shape_q, shape_kv = (4, 23, 6, 16), (4, 23, 2, 16)
        if padded:
            mask = torch.ones(4, 23, dtype=torch.bool)
            mask[0, :5], mask[1, 17:], mask[3] = False, False, False
            kwargs = dict(key_padding_mask=mask)
    q, k, v = (torch.randn(s, generator=gen).requires_grad_() for s in (shape_q, shape_kv, shape_kv))
    explicit = []
    monkeypatch.setattr(attn, "_explicit_backward", lambda *a: explicit.append(1))
    out = bidirectional_attention(q, k, v, impl="torch", **kwargs, **flags)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert not explicit
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = bidirectional_attention_reference(*wide, **kwargs, **flags)
    want = torch.autograd.grad(ref, wide, grad_out.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    if packed:
        assert all(torch.all(g[27:] == 0) for g in grads)  # tokens past cu_seqlens[-1]
    if padded:
        assert all(torch.all(g[~mask] == 0) for g in (out, grads[0]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mntp_torch_path_takes_the_gradients_in_the_forward(reduction, monkeypatch):
    """"mean"/"sum" on the PyTorch path: the gradients come from the forward's logits (the backward only scales
    them, no logits recomputed), the same as the float64 reference, the incoming gradient applied; nothing
    extra is kept for a forward without grad."""
    from llm2vec_fast.kernels import mntp_loss
    from llm2vec_fast.kernels.mntp_loss import masked_next_token_loss_reference

    hidden, weight, bias, labels = mntp_inputs(seed=3)
    monkeypatch.setattr(mntp_loss, "_chunked_backward", lambda *a: pytest.fail("the backward recomputed logits"))
    loss = masked_next_token_loss(hidden, weight, labels, bias=bias, reduction=reduction, logit_softcap=3.0,
                                  impl="torch", chunk_rows=4)
    grads = torch.autograd.grad(loss * 1.7, (hidden, weight, bias))
    wide = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref = masked_next_token_loss_reference(wide[0], wide[1], labels, bias=wide[2], reduction=reduction,
                                           logit_softcap=3.0)
    want = torch.autograd.grad(ref * 1.7, wide)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        outputs = torch.ops.llm2vec_fast.masked_next_token_loss(
            hidden, weight, bias, labels, 1, -100, reduction, 3.0, "torch", 4, False, False, False)
    assert all(t.numel() == 0 for t in outputs[6:]) and outputs[5].numel() == labels.numel() - labels.shape[0]


def test_attention_torch_path_dropout_mask_is_drawn_without_a_host_sync():
    """The PyTorch path's keep-mask comes from the seed tensor on its device: it traces into one graph (reading
    the seed to the host would break it, and on CUDA stall the stream), is the same for the same seed, keeps
    about 1 - p, and another seed draws another mask."""
    from llm2vec_fast.kernels.attention import _seeded_keep_mask

    seed, shape = torch.tensor([1234], dtype=torch.int64), (2, 3, 40, 40)
    mask = _seeded_keep_mask(seed, shape, 0.25, "cpu")
    traced = torch.compile(_seeded_keep_mask, fullgraph=True, backend="eager")(seed, shape, 0.25, "cpu")
    assert torch.equal(traced, mask) and torch.equal(_seeded_keep_mask(seed.clone(), shape, 0.25, "cpu"), mask)
    assert abs(mask.float().mean().item() - 0.75) < 0.02
    other = _seeded_keep_mask(torch.tensor([1235]), shape, 0.25, "cpu")
    assert abs((other == mask).float().mean().item() - (0.75**2 + 0.25**2)) < 0.02  # independent draws


def test_materialize_op_passes_opcheck_and_copies():
    import llm2vec_fast.compilation  # noqa: F401  (registers llm2vec_fast::materialize)

    x = torch.randn(3, 37, 64)
    torch.library.opcheck(torch.ops.llm2vec_fast.materialize, (x,))
    copy = torch.ops.llm2vec_fast.materialize(x)
    assert torch.equal(copy, x) and copy.data_ptr() != x.data_ptr()
