"""Compiled training: the loss modules under ``torch.compile(fullgraph=True)`` (CPU, fp32: eager's loss and
gradients, no graph break), GradCache with a compiled per-chunk model forward, and the stages' ``torch_compile``
setting (the Trainer's own): a clear error where no compiler works, the first steps' times in the log, and the
same losses as eager.

Patched models compile without graph breaks only with the attention adapter's host checks moved out of the
graph (tests/test_compile.py); here the models whose whole graph is asserted are unpatched (SDPA), so that what
is tested is the loss side.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from llm2vec_fast.training.losses import CachedInfoNCELoss, InfoNCELoss, MNTPLoss, MNTPModel

from conftest import build_tiny_model

VOCAB = 123


def _graph_breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_count, explanation.graph_break_count, [str(r.reason)[:300] for r in explanation.break_reasons]


def _lora(model):
    from llm2vec_fast.training.modeling import add_lora

    model = add_lora(model, r=4, alpha=8, dropout=0.0)
    for name, parameter in model.named_parameters():  # LoRA's B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model.train()


def _mntp_batch(seed=0, batch=2, seq=19):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=gen) >= 0.3] = -100
    return ids, torch.ones_like(ids), labels


def _grads(module):
    return [p.grad.clone() for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_mntp_loss_module_compiles_fullgraph(impl):
    causal_lm = build_tiny_model("llama", causal_lm=True, vocab_size=VOCAB, tie_word_embeddings=False)
    loss = MNTPLoss(causal_lm.get_output_embeddings(), logit_softcap=8.0, impl=impl)  # Gemma-2's soft-capping
    ids, _, labels = _mntp_batch()
    hidden = torch.randn(*ids.shape, causal_lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    graphs, breaks, reasons = _graph_breaks(loss, hidden, labels)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss):
        leaf = hidden.clone().requires_grad_()
        value = fn(leaf, labels)
        value.backward()
        results.append((value.detach(), leaf.grad))
    (got, got_grad), (want, want_grad) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
    assert loss.head.weight.grad is None, "the head stays frozen"


@pytest.mark.parametrize("patched", [pytest.param(False, id="sdpa", marks=pytest.mark.slow), pytest.param(True, id="patched")])
def test_mntp_model_compiles_fullgraph_and_matches_eager(patched):
    """The module the Trainer compiles for MNTP (LoRA body + our loss op): one graph, eager's loss and LoRA
    gradients; patched, as the MNTP stage trains it (our attention op, bidirectional), and with transformers' SDPA."""
    from llm2vec_fast import patch

    causal_lm = build_tiny_model("llama", causal_lm=True, vocab_size=VOCAB, tie_word_embeddings=False)
    if patched:
        patch(causal_lm, attention_impl="torch")
    model = MNTPModel(_lora(causal_lm.get_decoder()), MNTPLoss.from_causal_lm(causal_lm, impl="torch"))
    ids, mask, labels = _mntp_batch()

    def step(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels)["loss"]
    graphs, breaks, reasons = _graph_breaks(step, ids, mask, labels)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        model.zero_grad(set_to_none=True)
        value = fn(ids, mask, labels)
        value.backward()
        results.append((value.detach(), _grads(model)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_info_nce_loss_score_compiles_fullgraph():
    loss = InfoNCELoss("mean", scale=20.0, impl="torch")
    gen = torch.Generator().manual_seed(0)
    reps = [torch.randn(rows, 24, generator=gen) for rows in (5, 5, 3)]
    graphs, breaks, reasons = _graph_breaks(loss.score, *reps)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()
    compiled = torch.compile(loss.score, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss.score):
        leaves = [r.clone().requires_grad_() for r in reps]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach()] + [leaf.grad for leaf in leaves])
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def _contrastive_inputs():
    def chunk(rows, seq, seed):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding in each chunk
        return {"input_ids": ids, "attention_mask": mask, "embed_mask": mask.clone()}
    # One chunk shape: one graph per grad mode (a new shape would recompile once, then run dynamic).
    return {group: [chunk(2, 9, 2 * g + 1), chunk(2, 9, 2 * g + 2)]
            for g, group in enumerate(("query", "positive", "negative"))}


@pytest.mark.parametrize("loss_class", [pytest.param(InfoNCELoss, marks=pytest.mark.slow), CachedInfoNCELoss])
def test_contrastive_losses_with_a_compiled_model_match_eager(loss_class):
    """What the Trainer's torch_compile does for the contrastive stages: the model (its per-chunk forward) is
    compiled, the loss module calls it; GradCache's loop and backward hook stay eager and call the compiled
    forward twice per chunk (without, then with a graph). Same loss and LoRA gradients as eager. (Unpatched, so
    that the model is one graph per grad mode and the test stays small.)"""
    model = _lora(build_tiny_model("llama", vocab_size=VOCAB))
    inputs = _contrastive_inputs()
    loss = loss_class("mean", scale=20.0, impl="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    results = []
    for encoder in (compiled, model):
        model.zero_grad(set_to_none=True)
        value = loss(encoder, inputs)
        (value / 2).backward()
        results.append((value.detach(), _grads(model)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# The stages' torch_compile setting
# ---------------------------------------------------------------------------------------------------------------


def _mntp_config(tmp_path, **extra):
    from test_mntp_training import tiny_llama_dir, tiny_run_config

    words = [f"w{i}" for i in range(110)]
    model_dir = tiny_llama_dir(tmp_path, words)
    gen = torch.Generator().manual_seed(0)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(words[(int(torch.randint(0, 110, (1,), generator=gen)) + 3 * j) % 110]
                                        for j in range(12)) for _ in range(100)), encoding="utf-8")
    return tiny_run_config(tmp_path, model_dir, text, loss_impl="torch", activation_checkpointing=False, **extra)


def test_torch_compile_without_a_working_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from llm2vec_fast.compilation import CompilerUnavailableError
    from llm2vec_fast.training import trainer

    from test_mntp_training import train

    monkeypatch.setattr(trainer, "compiler_unavailable_reason",
                        lambda device, backend: "no C++ compiler here (simulated)")
    config = _mntp_config(tmp_path, torch_compile=True)
    with pytest.raises(CompilerUnavailableError, match=r"torch_compile.*'inductor'.*no C\+\+ compiler here "
                                                       r"\(simulated\).*torch_compile false"):
        train(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torch_compile_mntp_run_logs_compile_time_and_matches_eager(tmp_path, caplog):
    """A short MNTP run with the Trainer's torch_compile (aot_eager: the compile path without C++ code
    generation, so that the test stays small) gives eager's losses, and the first steps' times are logged."""
    from test_mntp_training import losses, train

    runs = {}
    for compiled in (False, True):
        extra = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
        config = _mntp_config(tmp_path / str(compiled), max_steps=3, **extra)
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger="llm2vec_fast.training.trainer"):
            runs[compiled] = losses(train(config))
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-5, atol=1e-6)
    timing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch_compile: step")]
    assert len(timing) == 3 and "compilation included" in timing[0], timing


class _StopBeforeTraining(Exception):
    pass


def test_an_mntp_run_checks_the_compiler_once(tmp_path, monkeypatch):
    """The stage checks torch_compile's backend before anything is loaded; the Trainer it builds then does not
    probe the compiler a second time for the same arguments."""
    from llm2vec_fast.training import mntp, trainer

    from test_mntp_training import train

    calls = []
    monkeypatch.setattr(trainer, "compiler_unavailable_reason", lambda device, backend: calls.append(backend))

    def stop(built, *args):
        assert isinstance(built, trainer.LLM2VecTrainer)
        raise _StopBeforeTraining
    monkeypatch.setattr(mntp, "run_training", stop)
    with pytest.raises(_StopBeforeTraining):
        train(_mntp_config(tmp_path, torch_compile=True))
    assert calls == ["inductor"]


@pytest.mark.parametrize("seconds", [True, float("nan"), "600", 0, -5.0])
def test_max_wall_seconds_is_checked_in_one_place_for_every_stage_and_the_guard(seconds):
    """One check for the MNTP and contrastive settings (as code builds them; a config file goes through the typed
    parser first) and the WallClockGuard: a bool (True would be a one-second limit), NaN, a string or a
    non-positive number is refused with the same message."""
    from llm2vec_fast.training.arguments import ContrastiveArguments, MNTPArguments
    from llm2vec_fast.training.trainer import WallClockGuard

    message = r"max_wall_seconds must be a positive number of seconds or null, got"
    for build in (MNTPArguments, ContrastiveArguments, WallClockGuard):
        with pytest.raises(ValueError, match=message):
            build(max_wall_seconds=seconds)


def test_packed_batches_send_a_bucketed_max_length_computed_once_per_batch():
    """``PackedBatch.model_inputs`` gives max_length_q/k as the longest length rounded up to a power of two (>= 16),
    so that a compiled model, which specializes on that int, sees one value per bucket; the adapter's in-graph
    bound is the same function, so a bucketed value passes through unchanged."""
    from llm2vec_fast.batching import max_length_bucket, pack_batch

    for lengths, bound in (((3, 5), 16), ((17, 2), 32), ((32,), 32), ((33, 1), 64), ((100, 7), 128)):
        inputs = pack_batch([[5] * n for n in lengths], [[1] * n for n in lengths]).model_inputs()
        assert inputs["max_length_q"] == inputs["max_length_k"] == bound, (lengths, inputs["max_length_q"])
        assert max_length_bucket(bound) == bound


# --- LoRA linears fused for the compiled step (llm2vec_fast.training.lora_graph) ---

def _within_twice_eager_error(got, want, reference, what, floor=1e-6):
    """flash-attention's rule: the fused result's error against an fp64 reference is at most twice eager fp32's
    own error, plus a small floor."""
    got_error = (got.double() - reference).abs().max().item()
    eager_error = (want.double() - reference).abs().max().item()
    assert got_error <= 2 * eager_error + floor, f"{what}: error {got_error:.3g}, eager's {eager_error:.3g}"


def _peft_linear(x, x_lora, weight, bias, lora_a, lora_b, scale):
    linear = torch.nn.functional.linear
    return linear(x, weight, bias) + linear(linear(x if x_lora is None else x_lora, lora_a), lora_b) * scale


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mm"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("dropout", [False, True], ids=["x", "dropout"])
def test_lora_linear_op_matches_peft_s_linear_forward_and_backward(with_bias, input_grad, dropout, onednn,
                                                                   monkeypatch):
    """The fused op against peft's composition (fp32 eager and an fp64 reference) on odd shapes: output and the
    gradients of x (where it needs one), A and B; the frozen base weight and bias get none. The adapter's input
    is x itself or LoRA dropout of x (a tensor of its own, with its own gradient). Both products of the frozen
    weight: oneDNN's (where built in) and torch.mm."""
    from llm2vec_fast.training import lora_graph
    from llm2vec_fast.training.lora_graph import lora_linear

    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(lora_graph, "_ONEDNN", onednn)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 37, generator=gen)
    weight, bias = torch.randn(29, 37, generator=gen) / 6, (torch.randn(29, generator=gen) if with_bias else None)
    lora_a, lora_b = torch.randn(5, 37, generator=gen) / 6, torch.randn(29, 5, generator=gen) / 2
    grad = torch.randn(3, 7, 29, generator=gen)
    keep = (torch.rand(3, 7, 37, generator=gen) > 0.3) / 0.7
    results = {}
    for name, fn, dtype in (("fused", lora_linear, torch.float32), ("eager", _peft_linear, torch.float32),
                            ("reference", _peft_linear, torch.float64)):
        leaves = [t.to(dtype, copy=True).requires_grad_(need)
                  for t, need in ((x, input_grad), (lora_a, True), (lora_b, True))]
        x_lora = leaves[0] * keep.to(dtype) if dropout else None
        frozen = [weight.to(dtype), None if bias is None else bias.to(dtype)]
        args = (leaves[0], frozen[0], leaves[1], leaves[2], 1.7, frozen[1], x_lora) if fn is lora_linear else \
            (leaves[0], x_lora, frozen[0], frozen[1], leaves[1], leaves[2], 1.7)
        out = fn(*args)
        out.backward(grad.to(dtype))
        results[name] = [out.detach()] + [leaf.grad for leaf in leaves]
    assert (results["fused"][1] is None) == (not input_grad)
    for index, what in enumerate(("output", "dx", "dA", "dB")):
        if results["fused"][index] is not None:
            _within_twice_eager_error(results["fused"][index], results["eager"][index], results["reference"][index],
                                      what)


def test_lora_linear_ops_pass_opcheck():
    from llm2vec_fast.training import lora_graph  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    weight, bias = torch.randn(13, 11, generator=gen), torch.randn(13, generator=gen)
    lora_a = torch.randn(3, 11, generator=gen, requires_grad=True)
    lora_b = torch.randn(13, 3, generator=gen, requires_grad=True)
    x_lora = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    for b in (None, bias):
        for second in (None, x_lora):
            torch.library.opcheck(torch.ops.llm2vec_fast.lora_linear.default,
                                  (x, second, weight, b, lora_a, lora_b, 0.5))
    xa = torch.randn(10, 3, generator=gen)
    for input_grad in (True, False):
        for lora_input_grad in (True, False):
            torch.library.opcheck(torch.ops.llm2vec_fast.lora_linear_backward.default,
                                  (torch.randn(2, 5, 13, generator=gen), x.detach(), weight, lora_a.detach(),
                                   lora_b.detach(), xa, 0.5, input_grad, lora_input_grad))


def test_lora_linear_refuses_a_trainable_base_weight_and_shapes_that_do_not_fit():
    from llm2vec_fast.training.lora_graph import lora_linear

    x, weight = torch.randn(4, 6), torch.randn(5, 6)
    lora_a, lora_b = torch.randn(2, 6), torch.randn(5, 2)
    with pytest.raises(ValueError, match="base weight and bias: they must be frozen"):
        lora_linear(x, weight.requires_grad_(), lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match=r"shapes do not fit.*lora_a \(2, 7\)"):
        lora_linear(x, weight.detach(), torch.randn(2, 7), lora_b, 1.0)
    with pytest.raises(ValueError, match=r"x_lora \(4, 5\) must have x's shape \(4, 6\)"):
        lora_linear(x, weight.detach(), lora_a, lora_b, 1.0, x_lora=torch.randn(4, 5))


def _fusing_backend(counts):
    from torch._dynamo.backends.debugging import aot_eager

    from llm2vec_fast.training.lora_graph import fuse_lora_linears

    def backend(gm, example_inputs):
        counts.append(fuse_lora_linears(gm.graph))
        gm.recompile()
        return aot_eager(gm, example_inputs)
    return backend


def _hidden_and_lora_grads(model, fn, ids):
    model.zero_grad(set_to_none=True)
    hidden = fn(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    weights = torch.linspace(-1, 1, hidden.shape[-1], dtype=hidden.dtype)
    (hidden * weights).sum().backward()
    return [hidden.detach()] + [p.grad for p in model.parameters() if p.requires_grad]


def test_the_graph_pass_fuses_every_lora_linear_with_eager_s_outputs_and_gradients():
    """fuse_lora_linears on the dynamo graph of a tiny LoRA Llama (all 7 projections, 2 layers; then autograd
    through aot_eager): 14 linears fused, the hidden states and every LoRA gradient within twice eager fp32's
    error against fp64."""
    import copy

    model = _lora(build_tiny_model("llama", num_hidden_layers=2))
    reference = copy.deepcopy(model).double()
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    want, expected = _hidden_and_lora_grads(model, model, ids), _hidden_and_lora_grads(reference, reference, ids)
    counts = []
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=True):
        got = _hidden_and_lora_grads(model, torch.compile(model, backend=_fusing_backend(counts)), ids)
    assert counts == [14]
    assert len(got) == len(want) == 1 + 2 * 14
    for index, (g, w, r) in enumerate(zip(got, want, expected)):
        _within_twice_eager_error(g, w, r, f"tensor {index}")


@pytest.mark.slow  # three aot_eager compiles
def test_the_graph_pass_fuses_lora_dropout_and_leaves_a_frozen_adapter():
    """With LoRA dropout in training (the adapter's own input) the linears are fused too, with the unfused
    compiled graph's results (the same dropout masks from the same seed); a frozen adapter is not fused."""
    from llm2vec_fast.training.modeling import add_lora

    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    counts = []

    dropout = add_lora(build_tiny_model("llama", num_hidden_layers=1), r=4, alpha=8, dropout=0.1).train()
    for name, parameter in dropout.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    runs = []
    for backend in (_fusing_backend(counts), "aot_eager"):
        counts.clear()
        torch._dynamo.reset()
        torch.manual_seed(5)
        with torch._dynamo.config.patch(specialize_float=True):
            runs.append(_hidden_and_lora_grads(dropout, torch.compile(dropout, backend=backend), ids))
        if backend != "aot_eager":
            assert counts == [7]
    for index, (g, w) in enumerate(zip(*runs)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"tensor {index}")

    frozen = _lora(build_tiny_model("llama", num_hidden_layers=1))
    for name, parameter in frozen.named_parameters():
        parameter.requires_grad_("lora_B" in name and "q_proj" in name)  # only q_proj's B trains: nothing fuses
    counts.clear()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=True):
        torch.compile(frozen, backend=_fusing_backend(counts))(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert counts == [0]


def test_torch_compile_training_steps_trace_with_the_compile_settings(tmp_path, monkeypatch):
    """The Trainer's torch_compile steps are traced with specialize_float (float attributes constants: one
    trace) and the LoRA fusion as inductor's pre-grad pass: what the backend sees when the model is traced."""
    from torch._dynamo.backends import registry

    from llm2vec_fast.training.lora_graph import _fuse_pass
    from torch._inductor import config as inductor_config

    from test_mntp_training import train

    aot_eager = registry.lookup_backend("aot_eager")
    seen = []

    def recording(gm, example_inputs):
        passes = inductor_config.pre_grad_custom_pass
        seen.append((torch._dynamo.config.specialize_float, passes is _fuse_pass() or _fuse_pass() in (passes or ())))
        return aot_eager(gm, example_inputs)
    monkeypatch.setitem(registry._COMPILER_FNS, "aot_eager", recording)
    torch._dynamo.reset()
    train(_mntp_config(tmp_path, max_steps=1, torch_compile=True, torch_compile_backend="aot_eager"))
    assert seen == [(True, True)], seen


@pytest.mark.slow  # one inductor compile of a tiny model's forward and backward
def test_an_inductor_compiled_lora_mntp_step_fuses_its_linears_and_matches_eager():
    """torch.compile (inductor) of the MNTP module under training_compile_settings: the pass fused all 7
    projections of each layer, and the loss and LoRA gradients are eager's."""
    from torch._dynamo.utils import counters

    from llm2vec_fast import patch
    from llm2vec_fast.compilation import compiler_unavailable_reason
    from llm2vec_fast.training.lora_graph import training_compile_settings

    reason = compiler_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(reason)
    causal_lm = build_tiny_model("llama", causal_lm=True, vocab_size=VOCAB, tie_word_embeddings=False)
    patch(causal_lm, attention_impl="torch")
    model = MNTPModel(_lora(causal_lm.get_decoder()), MNTPLoss.from_causal_lm(causal_lm, impl="torch"))
    ids, mask, labels = _mntp_batch()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    results = []
    # inductor's caches would serve a graph compiled before without running the pass (and its count) again
    fresh = torch._inductor.config.patch(force_disable_caches=True)
    for fn, settings in ((compiled, training_compile_settings), (model, contextlib.nullcontext)):
        model.zero_grad(set_to_none=True)
        with settings(), fresh:
            value = fn(input_ids=ids, attention_mask=mask, labels=labels)["loss"]
            value.backward()
        results.append((value.detach(), _grads(model)))
    layers = causal_lm.config.num_hidden_layers
    assert counters["inductor"]["lora_linears_fused"] == 7 * layers
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
