"""Encoding throughput through sentence-transformers vs LLM2Vec.encode, SmolLM2-135M, CPU fp32, side by side.

The encoder is exported (``llm2vec_fast.export``) and loaded three ways; the rounds are interleaved so that a
shared machine's load hits all alike. Same texts as ``test_encode.py`` (Wikipedia sentences and SciFact
abstracts from ../shared/data), batch size 32, mean pooling, plain texts:

- ``ours``: ``LLM2Vec.encode`` (token-budget batches over length-sorted texts, padded on CPU);
- ``st-llm2vec-modules``: ``SentenceTransformer(DIR, trust_remote_code=True).encode``, i.e. our modules
  (same attention, same tokenization) under sentence-transformers' batching (character-length sort, fixed
  batches of 32);
- ``st-native-modules``: sentence-transformers' own ``Transformer`` + ``Pooling("mean")`` on DIR's weights
  (transformers' SDPA, bidirectional through ``is_causal: false`` in config.json; instruction handling and
  llm2vec's tokenization are not reproduced, so it is a speed reference, not an equal).

    python -m pytest benchmarks/test_sentence_transformers.py -s --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from conftest import record
from test_encode import BATCH_SIZE, ROUNDS, _token_count, smollm2_dir, texts  # noqa: F401 (fixtures)


def test_sentence_transformers_vs_llm2vec_cpu(benchmark, texts, smollm2_dir, tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.export import export_sentence_transformers

    tokens = _token_count(smollm2_dir, texts)
    encoder = LLM2Vec.from_pretrained(smollm2_dir, pooling_mode="mean")
    path = str(export_sentence_transformers(encoder, tmp_path / "smollm2-st"))
    ours_st = SentenceTransformer(path, trust_remote_code=True, device="cpu")
    word = Transformer(path, model_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})
    native = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")], device="cpu")
    providers = {
        "ours": lambda: encoder.encode(texts, batch_size=BATCH_SIZE, device="cpu", show_progress_bar=False),
        "st-llm2vec-modules": lambda: ours_st.encode(texts, batch_size=BATCH_SIZE, show_progress_bar=False),
        "st-native-modules": lambda: native.encode(texts, batch_size=BATCH_SIZE, show_progress_bar=False),
    }
    warm_up = texts[:8]
    encoder.encode(warm_up, batch_size=BATCH_SIZE, device="cpu", show_progress_bar=False)
    ours_st.encode(warm_up, batch_size=BATCH_SIZE, show_progress_bar=False)
    native.encode(warm_up, batch_size=BATCH_SIZE, show_progress_bar=False)
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(ROUNDS):
        for name, run in providers.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # times are taken above, interleaved
    for name, values in times.items():
        seconds = statistics.median(values)
        record(benchmark, suite="encode via sentence-transformers (SmolLM2-135M, CPU fp32)",
               case=f"{len(texts)} texts {tokens} tok", mode="encode", provider=name, seconds=seconds,
               texts_per_s=len(texts) / seconds, tokens_per_s=tokens / seconds,
               note=f"{len(texts) / seconds:.2f} texts/s, {tokens / seconds:.0f} tokens/s, rounds {len(values)}")
