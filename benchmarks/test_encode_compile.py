"""Encoding with the model compiled (``LLM2Vec.compile_model``, inductor) vs eager, ours, SmolLM2-135M, CPU fp32.

The texts are ``benchmarks/test_encode.py``'s mix (Wikipedia sentences and SciFact abstracts), encoded with the
CPU default (length-sorted padded batches). Rounds of the two are interleaved so that a shared machine's load hits
both alike; the compiled encoder first encodes every text once (that call compiles, and its time is recorded as
the ``compile`` row), so the timed rounds measure steady state. Beside each time: GFLOP/s of useful work, 2 x the
non-embedding parameters x tokens, plus attention 4 x layers x hidden x sum(length^2) (no padding counted).

    python -m pytest benchmarks/test_encode_compile.py -s --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from conftest import record
from test_encode import BATCH_SIZE, _texts, smollm2_dir, texts  # noqa: F401  (fixtures)

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


def test_encode_compiled_vs_eager_cpu(benchmark, texts, smollm2_dir):  # noqa: F811
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.compilation import compiler_unavailable_reason

    reason = compiler_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"inductor cannot compile here: {reason}")
    eager = LLM2Vec.from_pretrained(smollm2_dir, pooling_mode="mean")
    compiled = LLM2Vec.from_pretrained(smollm2_dir, pooling_mode="mean", compile=True)
    tokens, flops = _useful_flops(eager, texts)
    eager.encode(texts[:8], batch_size=BATCH_SIZE, device="cpu")  # warm-up
    start = time.perf_counter()
    compiled.encode(texts, batch_size=BATCH_SIZE, device="cpu")  # compiles (every batch shape of the timed runs)
    compile_seconds = time.perf_counter() - start
    times: dict[str, list[float]] = {"ours eager": [], "ours compiled": []}
    for _ in range(ROUNDS):
        for provider, encoder in (("ours eager", eager), ("ours compiled", compiled)):
            start = time.perf_counter()
            encoder.encode(texts, batch_size=BATCH_SIZE, device="cpu")
            times[provider].append(time.perf_counter() - start)
    a = torch.as_tensor(eager.encode(texts[:16], batch_size=BATCH_SIZE, device="cpu"))
    b = torch.as_tensor(compiled.encode(texts[:16], batch_size=BATCH_SIZE, device="cpu"))
    max_diff = float((a - b).abs().max())
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # times are taken above, interleaved
    case = f"{len(texts)} texts {tokens} tok"
    medians = {p: statistics.median(v) for p, v in times.items()}
    for provider, seconds in medians.items():
        record(benchmark, suite=SUITE, case=case, mode="encode", provider=provider, seconds=seconds,
               gflops_per_s=flops / seconds / 1e9, tokens_per_s=tokens / seconds,
               note=f"{flops / seconds / 1e9:.1f} GFLOP/s useful, {tokens / seconds:.0f} tokens/s, "
                    f"rounds {len(times[provider])} {[round(t, 2) for t in times[provider]]}")
    speedup = medians["ours eager"] / medians["ours compiled"]
    record(benchmark, suite=SUITE, case=case, mode="first encode (compiles)", provider="ours compiled",
           seconds=compile_seconds,
           note=f"compiled/eager speed-up {speedup:.2f}x; max |eager - compiled| {max_diff:.2e}")
    assert max_diff < 1e-3, f"compiled embeddings differ from eager by {max_diff}"
