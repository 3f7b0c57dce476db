"""Encoding with the model compiled (``LLM2Vec.compile_model``, inductor) vs eager, ours, SmolLM2-135M, CPU fp32,
and llm2vec 0.2.3 beside them.

The texts are ``benchmarks/test_encode.py``'s mix (Wikipedia sentences and SciFact abstracts), encoded with the
CPU default (length-sorted padded batches). Rounds of the providers are interleaved so that a shared machine's load
hits all alike; each compiled encoder first encodes every text once (that call compiles, and its time is recorded
as the ``first encode (compiles)`` row, with the number of graphs dynamo built), so the timed rounds measure steady
state. Beside each time: GFLOP/s of useful work, 2 x the non-embedding parameters x tokens, plus attention
4 x layers x hidden x sum(length^2) (no padding counted; the padded tokens' share is in the notes), and the load
average before and after.

- ``ours compiled``: ``compile=True`` (inductor, frozen weights: ``compile_model(freeze=True)``, the default);
- ``ours compiled, not frozen``: ``compile_model(freeze=False)``, with ``ENCODE_COMPILE_BENCH_UNFROZEN=1``;
- ``ours compiled, options``: frozen, with inductor settings ``compile_model(options=...)`` given as JSON in
  ``ENCODE_COMPILE_BENCH_OPTIONS`` (e.g. ``'{"cpp.enable_concat_linear": true}'``);
- ``llm2vec-0.2.3``: with ``LLM2VEC_VENV_PYTHON`` (as in ``benchmarks/test_encode.py``).

    LLM2VEC_VENV_PYTHON=.venv-llm2vec/bin/python \
        python -m pytest benchmarks/test_encode_compile.py -s --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch
from conftest import record
from test_encode import BATCH_SIZE, _Llm2vecWorker, _texts, smollm2_dir, texts  # noqa: F401  (fixtures)

ROUNDS = int(os.environ.get("ENCODE_COMPILE_BENCH_ROUNDS", "3"))
SUITE = "encode compiled (SmolLM2-135M, CPU fp32)"


def _useful_flops(encoder, texts: list[str]) -> tuple[int, float]:
    """(tokens, useful FLOPs) of one encode of ``texts``."""
    lengths = [len(e.input_ids) for e in encoder.text_tokenizer([("", t) for t in texts])]
    config = encoder.model.config
    embedding = encoder.model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in encoder.model.parameters()) - embedding
    tokens = sum(lengths)
    attention = 4 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths)
    return tokens, 2.0 * params * tokens + attention


def _padded_tokens(encoder, texts: list[str]) -> int:
    """Tokens the padded batches of one encode compute, padding included."""
    from llm2vec_fast.batching import length_sorted_batches

    lengths = [len(e.input_ids) for e in encoder.text_tokenizer([("", t) for t in texts])]
    batches = length_sorted_batches(lengths, batch_size=BATCH_SIZE, max_batch_tokens=BATCH_SIZE * encoder.max_length,
                                    max_padding=encoder.max_padding)
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def _load() -> str:
    return "load " + "/".join(f"{x:.1f}" for x in os.getloadavg())


def test_encode_compiled_vs_eager_cpu(benchmark, texts, smollm2_dir):  # noqa: F811
    import torch._dynamo.utils

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.compilation import compiler_unavailable_reason

    reason = compiler_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"inductor cannot compile here: {reason}")
    load_before = _load()
    encoders = {"ours eager": LLM2Vec.from_pretrained(smollm2_dir, pooling_mode="mean"),
                "ours compiled": LLM2Vec.from_pretrained(smollm2_dir, pooling_mode="mean", compile=True)}
    if os.environ.get("ENCODE_COMPILE_BENCH_UNFROZEN") == "1":
        encoders["ours compiled, not frozen"] = LLM2Vec.from_pretrained(
            smollm2_dir, pooling_mode="mean").compile_model(freeze=False)
    if os.environ.get("ENCODE_COMPILE_BENCH_OPTIONS"):
        encoders["ours compiled, options"] = LLM2Vec.from_pretrained(smollm2_dir, pooling_mode="mean").compile_model(
            options=json.loads(os.environ["ENCODE_COMPILE_BENCH_OPTIONS"]))
    eager = encoders["ours eager"]
    tokens, flops = _useful_flops(eager, texts)
    padded = _padded_tokens(eager, texts)
    eager.encode(texts[:8], batch_size=BATCH_SIZE, device="cpu")  # warm-up
    first: dict[str, tuple[float, int]] = {}
    for provider, encoder in encoders.items():
        if provider != "ours eager":
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            encoder.encode(texts, batch_size=BATCH_SIZE, device="cpu")  # compiles (every batch shape of the rounds)
            first[provider] = (time.perf_counter() - start,
                               torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs)
    python = os.environ.get("LLM2VEC_VENV_PYTHON")
    worker = _Llm2vecWorker(python, smollm2_dir, texts) if python else None
    times: dict[str, list[float]] = {provider: [] for provider in encoders}
    try:
        for _ in range(ROUNDS):
            for provider, encoder in encoders.items():
                start = time.perf_counter()
                encoder.encode(texts, batch_size=BATCH_SIZE, device="cpu")
                times[provider].append(time.perf_counter() - start)
            if worker is not None:
                times.setdefault("llm2vec-0.2.3", []).append(worker.time_once())
    finally:
        if worker is not None:
            worker.close()
    load_after = _load()
    reference = torch.as_tensor(eager.encode(texts[:16], batch_size=BATCH_SIZE, device="cpu"))
    max_diff = {p: float((torch.as_tensor(e.encode(texts[:16], batch_size=BATCH_SIZE, device="cpu")) - reference)
                         .abs().max()) for p, e in encoders.items() if p != "ours eager"}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # times are taken above, interleaved
    case = f"{len(texts)} texts {tokens} tok"
    medians = {p: statistics.median(v) for p, v in times.items()}
    for provider, seconds in medians.items():
        record(benchmark, suite=SUITE, case=case, mode="encode", provider=provider, seconds=seconds,
               gflops_per_s=flops / seconds / 1e9, tokens_per_s=tokens / seconds,
               note=f"{flops / seconds / 1e9:.1f} GFLOP/s useful, {tokens / seconds:.0f} tokens/s, "
                    f"{medians['ours eager'] / seconds:.2f}x eager, rounds {len(times[provider])} "
                    f"{[round(t, 2) for t in times[provider]]}, {load_before} -> {load_after}, "
                    f"padded batches compute {padded} tokens ({padded / tokens - 1:.1%} padding)")
    for provider, (seconds, graphs) in first.items():
        record(benchmark, suite=SUITE, case=case, mode="first encode (compiles)", provider=provider,
               seconds=seconds, note=f"{graphs} graph(s) compiled; max |eager - compiled| {max_diff[provider]:.2e}")
    for provider, diff in max_diff.items():
        assert diff < 1e-3, f"{provider} embeddings differ from eager by {diff}"


def _random_encoder_dir(folder, config, vocab_words: int) -> str:
    """A model of ``config``'s shapes with random weights and a word-level tokenizer over ``w0 .. w{n-1}``, saved
    as a Hugging Face directory: the GPU machine has neither the GGUF package nor ../shared/data, and an encode's
    time depends on the token counts, not on the weights or the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModel, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i + 4 for i in range(vocab_words)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _random_texts(n_sentences: int, n_paragraphs: int, vocab_words: int, seed: int = 0) -> list[str]:
    """Sentences of 12-40 words and paragraphs of 150-400, as the CPU benchmark's mix is."""
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(12, 40) for _ in range(n_sentences)] + [rng.randint(150, 400) for _ in range(n_paragraphs)]
    return [" ".join(f"w{rng.randrange(vocab_words)}" for _ in range(n)) for n in lengths]


def _encode_compiled_vs_eager(benchmark, model_dir: str, texts: list[str], *, device: str, dtype: torch.dtype,
                              batch_size: int, rounds: int, suite: str) -> None:
    import torch._dynamo.utils

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.compilation import compiler_unavailable_reason

    reason = compiler_unavailable_reason(device)
    if reason is not None:
        pytest.skip(f"inductor cannot compile here: {reason}")
    encoders = {provider: LLM2Vec.from_pretrained(model_dir, pooling_mode="mean", dtype=dtype)
                for provider in ("ours eager", "ours compiled")}
    for encoder in encoders.values():
        encoder.model.to(device)
    encoders["ours compiled"].compile_model()  # after the move: it checks the backend of the model's device
    tokens = sum(len(e.input_ids) for e in encoders["ours eager"].text_tokenizer([("", t) for t in texts]))

    def encode(encoder):
        out = encoder.encode(texts, batch_size=batch_size, device=device, convert_to_numpy=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    first = {}
    for provider, encoder in encoders.items():  # warm-up; the compiled side compiles here
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        encode(encoder)
        first[provider] = (time.perf_counter() - start, torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs)
    times = {provider: [] for provider in encoders}
    for _ in range(rounds):
        for provider, encoder in encoders.items():
            start = time.perf_counter()
            encode(encoder)
            times[provider].append(time.perf_counter() - start)
    diff = float((torch.as_tensor(encode(encoders["ours compiled"])).float()
                  - torch.as_tensor(encode(encoders["ours eager"])).float()).abs().max())
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # times are taken above, interleaved
    medians = {p: statistics.median(v) for p, v in times.items()}
    case = f"{len(texts)} texts {tokens} tok"
    for provider, seconds in medians.items():
        record(benchmark, suite=suite, case=case, mode="encode", provider=provider, seconds=seconds,
               tokens_per_s=tokens / seconds,
               note=f"{tokens / seconds:.0f} tokens/s, {medians['ours eager'] / seconds:.2f}x eager, rounds "
                    f"{[round(t, 3) for t in times[provider]]}; first encode {first[provider][0]:.1f} s, "
                    f"{first[provider][1]} graph(s); max |eager - compiled| {diff:.2e}")
    eager, compiled = medians["ours eager"], medians["ours compiled"]
    print(f"\n{suite} / {case}: eager {eager:.3f} s, compiled {compiled:.3f} s -> {eager / compiled:.2f}x; first "
          f"encode compiled {first['ours compiled'][0]:.1f} s ({first['ours compiled'][1]} graphs); "
          f"max |eager - compiled| {diff:.2e}")
    assert diff < 5e-2, f"compiled embeddings differ from eager by {diff}"


@pytest.mark.gpu
def test_encode_compiled_vs_eager_cuda(benchmark, tmp_path):
    """Issue #15's GPU row: compiled vs eager encode, bf16, a model of SmolLM2-135M's shapes (random weights, a
    word-level tokenizer, random texts in the CPU benchmark's mix of lengths); phase 4 of gpu_check.sh."""
    from test_training_compile import _smollm2_135m_config

    model_dir = _random_encoder_dir(tmp_path / "model", _smollm2_135m_config(), vocab_words=49_000)
    texts = _random_texts(768, 256, vocab_words=49_000)
    _encode_compiled_vs_eager(benchmark, model_dir, texts, device="cuda", dtype=torch.bfloat16, batch_size=64,
                              rounds=5, suite="encode compiled (SmolLM2-135M shapes, random weights, CUDA bf16)")
