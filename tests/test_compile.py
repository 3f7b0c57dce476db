"""torch.compile of patched models: our attention as ``llm2vec_fast::`` custom ops, no graph break, eager's results.

* ``opcheck`` of both attention ops (forward and backward) in every mode the adapter uses, PyTorch path, fp32;
* ``torch._dynamo.explain`` finds one graph and no break on the patched families of the support matrix, padded and
  packed (cu_seq_lens kwargs, as ``PackedBatch.model_inputs()`` sends them);
* compiled (``aot_eager``, one ``inductor`` case) gives eager's outputs and gradients; three sequence lengths
  compile once (``dynamic=True``);
* ``compilation.compile_model`` / ``LLM2Vec.from_pretrained(compile=...)``: a missing backend is a clear error or a
  logged fallback, and the first batch's compile time is logged.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import matrix_config, padded_batch, slow_except

import llm2vec_fast
from llm2vec_fast import compilation
from llm2vec_fast.batching import pack_batch
from llm2vec_fast.kernels import attention as _attention  # noqa: F401  (registers the llm2vec_fast:: ops)

ATOL, RTOL = 2e-5, 1e-4  # fp32: summation order only
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------------------------------------


def _qkv(shape_q, shape_kv, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=generator).requires_grad_() for s in (shape_q, shape_kv, shape_kv))


def _op_cases():
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[0, :4] = False  # left padded
    mask[2, 9:] = False  # right padded
    cu = torch.tensor([0, 5, 6, 17, 20], dtype=torch.int32)
    seed = torch.tensor([1234], dtype=torch.int64)
    padded, packed = ((3, 13, 4, 16), (3, 13, 2, 16)), ((20, 4, 16), (20, 2, 16))
    # (name, shapes, mask, cu_seqlens, seed, max_seqlen, dropout_p, softcap, window, causal)
    return [
        ("padded_gqa", padded, mask, None, None, 0, 0.0, 0.0, 0, False),
        ("padded_softcap_window", padded, mask, None, None, 0, 0.0, 4.0, 5, False),
        ("padded_dropout", padded, mask, None, seed, 0, 0.25, 0.0, 0, False),
        ("padded_causal", padded, None, None, None, 0, 0.0, 0.0, 0, True),
        ("packed", packed, None, cu, None, 11, 0.0, 0.0, 0, False),
        ("packed_window_causal", packed, None, cu, None, 11, 0.0, 0.0, 3, True),
        ("packed_dropout_softcap", packed, None, cu, seed, 11, 0.1, 3.0, 0, False),
    ]


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_opcheck_attention_ops(case):
    _, (shape_q, shape_kv), mask, cu, seed, max_seqlen, dropout_p, softcap, window, causal = case
    q, k, v = _qkv(shape_q, shape_kv)
    flags = (max_seqlen, 16**-0.5, dropout_p, softcap, window, causal)
    forward = torch.ops.llm2vec_fast.attention_forward.default
    torch.library.opcheck(forward, (q, k, v, mask, cu, seed, *flags, False, True))
    out, lse = forward(q, k, v, mask, cu, seed, *flags, False, True)
    do = torch.randn_like(out)
    backward = torch.ops.llm2vec_fast.attention_backward.default
    detached = [t.detach() for t in (q, k, v, out, lse)]
    torch.library.opcheck(backward, (do, *detached, mask, cu, seed, *flags, False))
    # The op's gradient is that of the reference with the same dropout (redrawn from the seed).
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in (dq, dk, dv))


def test_triton_path_through_the_op_matches_the_reference():
    """The op's Triton branch (the interpreter here), forward and backward, against the PyTorch reference."""
    from llm2vec_fast.kernels.attention import bidirectional_attention, bidirectional_attention_reference

    q, k, v = _qkv((2, 11, 4, 16), (2, 11, 2, 16), seed=3)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False
    out = bidirectional_attention(q, k, v, key_padding_mask=mask, window=4, impl="triton")
    ref = bidirectional_attention_reference(q, k, v, key_padding_mask=mask, window=4)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------------
# Patched models under torch.compile
# ---------------------------------------------------------------------------------------------------------------------


def _patched(family, impl="torch"):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(matrix_config(family), dtype=torch.float32, attn_implementation="eager").eval()
    return llm2vec_fast.patch(model, attention_impl=impl)


def _padded_inputs(lengths=(11, 4, 7), seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids, mask = padded_batch([torch.randint(3, 123, (n,), generator=generator) for n in lengths], side="left")
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)


def _packed_inputs(lengths=(11, 4, 7), seed=1):
    generator = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 123, (n,), generator=generator).tolist() for n in lengths]
    return dict(**pack_batch(seqs, [[1] * n for n in lengths]).model_inputs(), use_cache=False)


# llama is left to the full suite with the other families: in the fast loop, test_new_sequence_lengths_do_not_recompile
# compiles the patched Llama with fullgraph=True (a graph break raises) on padded and packed batches, one frame each.
@pytest.mark.parametrize("family", slow_except(FAMILIES, "gemma2"))
def test_patched_family_is_one_graph(family):
    model = _patched(family)
    for inputs in (_padded_inputs(), _packed_inputs()):
        explained = torch._dynamo.explain(model)(**inputs)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        assert explained.graph_count == 1


# Every case is left to the full suite (7-14 s of CPU each, the fast loop's most expensive test). In the fast loop,
# a patched model's forward and backward through an aot_eager graph, against eager: test_training_compile.py's
# test_mntp_model_compiles_fullgraph_and_matches_eager[patched] (5 s); the ops' forward and backward under AOT
# dispatch with dynamic shapes, packed, soft-capped, windowed and with dropout: test_opcheck_attention_ops; packed
# and padded batches of a compiled model against eager: test_new_sequence_lengths_do_not_recompile; Gemma-2 (soft-cap,
# sliding window) as one graph: test_patched_family_is_one_graph[gemma2].
@pytest.mark.parametrize("family,impl,packed", slow_except(  # gemma2: soft-cap and sliding window
    [pytest.param(family, impl, packed, id=f"{'packed' if packed else 'padded'}-{name}")
     for packed in (False, True)
     for family, impl, name in (("llama", "torch", "llama"), ("gemma2", "torch", "gemma2"),
                                ("llama", "triton", "llama-triton"))]))
def test_compiled_matches_eager_outputs_and_gradients(family, impl, packed):
    """Forward and backward through the graph (aot_eager); ``triton``: the kernels in the interpreter, the fake
    implementation's log-sum-exp saved for the backward."""
    model = _patched(family, impl).train()  # train mode: the graph includes the backward
    inputs = (_packed_inputs if packed else _padded_inputs)()
    expected = model(**inputs).last_hidden_state
    weight = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weight).sum(), list(model.parameters()))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    got = compiled(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    grads = torch.autograd.grad((got * weight).sum(), list(model.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)


def test_new_sequence_lengths_do_not_recompile():
    """dynamic=True marks lengths dynamic from the first call: three lengths, padded and packed, one graph each."""
    from torch._dynamo.testing import CompileCounter

    model = _patched("llama")
    for make in (_padded_inputs, _packed_inputs):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
        for lengths in ((11, 4, 7), (23, 9, 2), (5, 30, 17)):
            inputs = make(lengths)
            torch.testing.assert_close(compiled(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                       atol=ATOL, rtol=RTOL)
        assert counter.frame_count == 1, f"{make.__name__}: {counter.frame_count} compiles for 3 lengths"


def test_packed_position_ids_without_cu_seqlens_is_refused_under_compile():
    """Position ids restarting inside a row, without cu_seq_lens: eager finds the sequences, a compiled graph
    cannot (their number is data): an error naming the kwargs to pass, never attention across texts."""
    model = _patched("llama")
    inputs = _packed_inputs()
    for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        inputs.pop(name)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="cu_seq_lens_q"):
        compiled(**inputs)


@pytest.mark.slow
def test_inductor_compiled_patched_model_matches_eager():
    """The real CPU backend (C++/OpenMP code), forward only, a tiny Llama, padded and packed."""
    if compilation.compiler_unavailable_reason() is not None:
        pytest.skip(compilation.compiler_unavailable_reason())
    model = _patched("llama")
    compiled = compilation.compile_model(_patched("llama"), dynamic=True, fullgraph=True)
    with torch.no_grad():
        for inputs in (_padded_inputs(), _packed_inputs()):
            torch.testing.assert_close(compiled(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                       atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# compile_model and the encoder
# ---------------------------------------------------------------------------------------------------------------------


def test_compile_model_without_a_compiler_is_a_clear_error_or_a_logged_fallback(monkeypatch, caplog):
    monkeypatch.setattr(compilation, "_cpp_compiler_reason", lambda: "no C++ compiler (simulated)")
    assert compilation.compiler_unavailable_reason() == "no C++ compiler (simulated)"
    assert compilation.compiler_unavailable_reason(backend="aot_eager") is None
    model = _patched("llama")
    with pytest.raises(compilation.CompilerUnavailableError, match="no C.. compiler \\(simulated\\)"):
        compilation.compile_model(model)
    assert not compilation.is_compiled(model)
    with caplog.at_level(logging.WARNING, logger="llm2vec_fast.compilation"):
        assert compilation.compile_model(model, fallback=True) is model
    assert not compilation.is_compiled(model)
    assert "running eager: no C++ compiler (simulated)" in caplog.text
    with pytest.raises(TypeError, match="nn.Module"):
        compilation.compile_model(lambda x: x)


def test_a_missing_compiler_binary_is_found_before_inductor_runs(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", (None, "no-such-cxx-llm2vec"))
    monkeypatch.delenv("CXX", raising=False)
    reason = compilation.compiler_unavailable_reason()
    assert reason is not None and "no-such-cxx-llm2vec" in reason


@pytest.mark.slow  # two encoders and aot_eager graphs for padded and packed batches: ~6 s of the fast loop
def test_encoder_compile_gives_eager_embeddings_and_logs_the_compile_time(tiny_smol, caplog):
    texts = ["A short one.", ["Instruct: retrieve\nQuery:", "rotary embeddings"],
             "A longer paragraph about attention, padding and packing, long enough to differ in length. " * 2]
    eager = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    expected = eager.encode(texts, batch_size=2)
    compiled = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch", compile="aot_eager")
    assert compilation.is_compiled(compiled.model)
    with caplog.at_level(logging.INFO, logger="llm2vec_fast.encoder"):
        got = compiled.encode(texts, batch_size=2)
        packed = compiled.encode(texts, batch_size=2, packed=True)
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(expected), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(packed), torch.as_tensor(expected), atol=1e-5, rtol=1e-4)
    messages = [r.getMessage() for r in caplog.records if "compiling the model" in r.getMessage()]
    assert len(messages) == 1 and "backend=aot_eager" in messages[0] and " s, on the first batch" in messages[0]


@pytest.mark.slow  # encoders and aot_eager graphs: 65 s on the loaded 2-core machine
def test_compiled_encoder_compiles_once_for_every_batch_shape(tiny_smol):
    """Batches of 3, 2 and 1 texts, of many widths and of 1-token texts: one graph (a lone text is run as two rows
    and a 1-token batch gets a column of padding, as torch.compile specializes sizes of 1), eager embeddings."""
    from torch._dynamo.testing import CompileCounter

    texts = ["A longer paragraph about attention, padding and packing, long enough to differ in length. " * 2,
             "Rotary position embeddings rotate queries and keys.", "A short one.", "x", "y", "z",
             "Medium length sentence about encoders and batches."]
    eager = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    compiled = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    counter = CompileCounter()
    compiled.compile_model(backend=counter)
    for batch_size in (3, 2, 1):
        got = compiled.encode(texts, batch_size=batch_size, convert_to_tensor=True)
        torch.testing.assert_close(got, eager.encode(texts, batch_size=batch_size, convert_to_tensor=True),
                                   atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled.encode("x", convert_to_tensor=True), eager.encode("x", convert_to_tensor=True),
                               atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles"


def test_forward_of_a_compiled_encoder_runs_as_encode_does(tiny_smol):
    """LLM2Vec.forward on a model compiled with compile_model(freeze=True) traces with encode's settings (frozen,
    float attributes constant) whichever is called first, refuses changed weights
    without gradients as encode does, and gives eager's embeddings."""
    from torch._inductor import config as inductor_config

    from llm2vec_fast.pipeline import collate

    seen = []

    def backend(gm, example_inputs):
        seen.append((inductor_config.freezing, torch._dynamo.config.specialize_float))
        return gm.forward

    texts = ["Rotary position embeddings rotate queries and keys.", "A short one."]
    eager = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    compiled = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    compiled.compile_model(backend=backend, freeze=True)
    batch = collate(compiled.tokenize_texts([("", t) for t in texts]), packed=False,
                    pad_id=compiled.tokenizer.pad_token_id)
    features = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "embed_mask": batch.embed_mask}
    with torch.no_grad():
        got = compiled(features)
        torch.testing.assert_close(got, eager(features), atol=1e-5, rtol=1e-4)
    assert seen == [(True, True)], seen
    torch.testing.assert_close(compiled.encode(texts, convert_to_tensor=True), got, atol=1e-5, rtol=1e-4)
    assert len(seen) == 1, seen  # encode ran the graph forward compiled
    with torch.no_grad():
        compiled.model.layers[0].mlp.up_proj.weight.mul_(1.5)
        with pytest.raises(RuntimeError, match=r"weights changed .* call compile_model\(\) again"):
            compiled(features)


@pytest.mark.slow  # two inductor compiles of a tiny model: 25-80 s on the 2-core machine, by load
def test_inductor_frozen_encoder_matches_eager_and_computes_rotary_once(tiny_smol):
    """compile=True (inductor, frozen, with the rotary hook) gives eager's embeddings, for batches of several
    texts and of one; the graph computes cos/sin in one kernel, not in each layer's; compile_model's options reach
    inductor (cpp.enable_concat_linear: the k/v and gate/up linears concatenated, then split) and a misspelt one
    is refused before anything compiles."""
    from torch._inductor.utils import run_and_get_code

    texts = ["A longer paragraph about attention, padding and packing, long enough to differ in length. " * 2,
             "Rotary position embeddings rotate queries and keys.", "Padded batches hold texts of similar lengths.",
             "Medium length sentence about encoders and batches."]
    eager = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    compiled = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch", compile=True)
    got, codes = run_and_get_code(compiled.encode, texts, batch_size=2, convert_to_tensor=True)
    torch.testing.assert_close(got, eager.encode(texts, batch_size=2, convert_to_tensor=True), atol=2e-5, rtol=1e-4)
    code = "\n".join(codes)
    kernels = code.split("async_compile.cpp_pybinding(")[1:]
    assert "torch.ops.llm2vec_fast.materialize" in code
    assert sum(".cos()" in k or "std::cos" in k for k in kernels) == 1, "cos/sin evaluated in more than one kernel"
    assert "split_with_sizes" not in code
    with pytest.raises(ValueError, match=r"\['cpp.enable_concat_linears'\] are not torch._inductor.config"):
        compiled.compile_model(options={"cpp.enable_concat_linears": True})
    compiled.compile_model(options={"cpp.enable_concat_linear": True})
    again, codes = run_and_get_code(compiled.encode, texts, batch_size=2, convert_to_tensor=True)
    torch.testing.assert_close(again, got, atol=2e-5, rtol=1e-4)
    assert "split_with_sizes" in "\n".join(codes)  # the concatenated linears, split again


def test_compiled_encoder_traces_float_attributes_as_constants(tiny_smol):
    """Under dynamic=True, dynamo would make the model's float attributes (RMSNorm epsilons, attention scaling,
    nn.Embedding.norm_type) graph inputs, which inductor specializes by tracing the whole model again: the graph
    encode compiles takes no float inputs."""
    float_inputs = []

    def backend(gm, example_inputs):
        float_inputs.extend(node.name for node in gm.graph.nodes if node.op == "placeholder"
                            and node.name.endswith(("norm_type", "variance_epsilon", "scaling")))
        return gm.forward

    compiled = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    compiled.compile_model(backend=backend)
    compiled.encode(["Rotary position embeddings rotate queries and keys.", "A short one."])
    assert float_inputs == [], float_inputs


@pytest.mark.slow  # four encoders and three aot_eager compiles
def test_a_frozen_compiled_encoder_refuses_changed_weights_until_compiled_again(tiny_smol):
    """compile_model(freeze=True) makes the weights constants of the graph: encoding after they changed would use
    the old ones, so it is refused, and compiling again encodes with the new weights."""
    texts = ["Rotary position embeddings rotate queries and keys.", "A short one.", "x"]
    compiled = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    compiled.compile_model(backend="aot_eager", freeze=True)
    before = compiled.encode(texts, convert_to_tensor=True)
    eager = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch")
    torch.testing.assert_close(before, eager.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for model in (compiled.model, eager.model):
            model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match=r"weights changed .* call compile_model\(\) again"):
        compiled.encode(texts)
    compiled.compile_model(backend="aot_eager", freeze=True)
    after = compiled.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(after, eager.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(after, before, atol=1e-3)
    unfrozen = llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, attention_impl="torch").compile_model(
        backend="aot_eager", freeze=False)
    unfrozen.encode(texts)
    with torch.no_grad():
        unfrozen.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    torch.testing.assert_close(unfrozen.encode(texts, convert_to_tensor=True), after, atol=1e-5, rtol=1e-4)


def test_encoder_compile_without_a_compiler_says_why(tiny_smol, monkeypatch):
    monkeypatch.setattr(compilation, "_cpp_compiler_reason", lambda: "no C++ compiler (simulated)")
    with pytest.raises(compilation.CompilerUnavailableError, match="simulated"):
        llm2vec_fast.LLM2Vec.from_pretrained(tiny_smol, compile=True)


def test_encode_command_compile_flag_compiles_after_moving_to_the_device(tiny_smol, monkeypatch):
    import argparse

    from llm2vec_fast import corpus
    from llm2vec_fast.encoder import LLM2Vec

    parser = argparse.ArgumentParser()
    corpus.add_arguments(parser)
    base = ["--model", tiny_smol, "--input", "in.jsonl", "--output", "out"]
    assert parser.parse_args(base + ["--compile"]).compile is True
    assert parser.parse_args(base).compile is False
    calls = []
    monkeypatch.setattr(LLM2Vec, "compile_model", lambda self, backend="inductor": calls.append(
        (backend, next(self.model.parameters()).device.type)) or self)
    corpus.load_encoder(corpus.CorpusSettings(model=tiny_smol, compile=True), torch.device("cpu"))
    corpus.load_encoder(corpus.CorpusSettings(model=tiny_smol), torch.device("cpu"))
    assert calls == [("inductor", "cpu")]
