"""LLM2Vec.encode's sentence-transformers options: prompts, encode_query/encode_document, truncate_dim, precision,
and encoding in several processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.prompts import default_prompts
from llm2vec_fast.quantization import PRECISIONS

TEXTS = [
    "Rotary position embeddings rotate query and key vectors.",
    "A short one.",
    "LLM2Vec turns a decoder-only language model into a text encoder in three simple steps.",
    "Contrastive learning pulls paraphrases together and pushes unrelated sentences apart.",
    "The cat sat on the mat.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Encoders map text to vectors; similar texts get similar vectors.",
    "x",
    "Masked next-token prediction adapts a causal model to bidirectional attention.",
    "Binary quantization keeps one bit per dimension.",
    "Matryoshka embeddings keep most of their quality when truncated.",
]


@pytest.fixture(scope="module")
def encoder(tiny_smol):
    return LLM2Vec.from_pretrained(tiny_smol, pooling_mode="mean")


def test_prompt_and_prompt_name_are_the_instruction(encoder):
    instruction = default_prompts()["SciFact"]
    pairs = encoder.encode([[instruction, t] for t in TEXTS])
    np.testing.assert_allclose(encoder.encode(TEXTS, prompt_name="SciFact"), pairs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoder.encode(TEXTS, prompt=instruction), pairs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(pairs, encoder.encode(TEXTS), atol=1e-4)
    # A pair keeps its own instruction; the prompt goes to the plain strings only.
    mixed = encoder.encode([["Retrieve a paraphrase:", TEXTS[0]], TEXTS[1]], prompt=instruction)
    np.testing.assert_allclose(mixed[0], encoder.encode([["Retrieve a paraphrase:", TEXTS[0]]])[0], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(mixed[1], pairs[1], rtol=1e-5, atol=1e-6)
    single = encoder.encode(TEXTS[0], prompt_name="SciFact")
    assert single.shape == (encoder.config.hidden_size,)
    np.testing.assert_allclose(single, pairs[0], rtol=1e-5, atol=1e-6)


def test_encode_query_and_document(encoder):
    query = encoder.encode([[default_prompts()["query"], t] for t in TEXTS[:3]])
    np.testing.assert_allclose(encoder.encode_query(TEXTS[:3]), query, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoder.encode_document(TEXTS[:3]), encoder.encode(TEXTS[:3]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoder.encode_query(TEXTS[:3], prompt_name="SciFact"),
                               encoder.encode(TEXTS[:3], prompt_name="SciFact"), rtol=1e-5, atol=1e-6)


def test_truncate_dim_truncates_before_normalizing(encoder):
    full = encoder.encode(TEXTS, convert_to_tensor=True)
    cut = encoder.encode(TEXTS, truncate_dim=7, normalize_embeddings=True, convert_to_tensor=True)
    assert cut.shape == (len(TEXTS), 7)
    torch.testing.assert_close(cut, torch.nn.functional.normalize(full[:, :7], dim=-1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(cut.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    np.testing.assert_allclose(encoder.encode(TEXTS[0], truncate_dim=5), full[0, :5].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_matches_sentence_transformers(encoder, precision):
    quantization = pytest.importorskip("sentence_transformers.util.quantization")

    floats = encoder.encode(TEXTS, normalize_embeddings=True, truncate_dim=20)
    ours = encoder.encode(TEXTS, normalize_embeddings=True, truncate_dim=20, precision=precision)
    theirs = quantization.quantize_embeddings(floats, precision=precision)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if precision == "float32":
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    else:
        # Bucket edges: a value within float rounding of an edge may land one bucket over; nothing else may differ.
        assert (np.abs(ours.astype(np.int16) - theirs.astype(np.int16)) <= (0 if "binary" in precision else 1)).all()
        assert (ours == theirs).mean() > 0.97
    if precision.endswith("binary"):
        assert ours.shape == (len(TEXTS), 20 // 8 + 1)  # 20 bits packed into 3 bytes, the last one padded
    as_tensor = encoder.encode(TEXTS, normalize_embeddings=True, truncate_dim=20, precision=precision,
                               convert_to_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and np.array_equal(as_tensor.numpy(), ours)


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_int8_calibration_is_shared_by_several_calls(encoder, precision):
    """One calibration quantizes every call alike, as sentence-transformers' ranges / calibration_embeddings do:
    the halves of a list quantized apart equal the whole list quantized at once."""
    quantization = pytest.importorskip("sentence_transformers.util.quantization")

    calibration = encoder.encode(TEXTS, normalize_embeddings=True, truncate_dim=20)
    ranges = np.stack([calibration.min(axis=0), calibration.max(axis=0)])
    whole = encoder.encode(TEXTS, normalize_embeddings=True, truncate_dim=20, precision=precision, ranges=ranges)
    halves = np.concatenate([encoder.encode(part, normalize_embeddings=True, truncate_dim=20, precision=precision,
                                            ranges=ranges) for part in (TEXTS[:4], TEXTS[4:])])
    # Batches of other texts round the floats differently: a value at a bucket edge may land one bucket over.
    assert (np.abs(halves.astype(np.int16) - whole.astype(np.int16)) <= 1).all() and (halves == whole).mean() > 0.97
    single = encoder.encode(TEXTS[2], normalize_embeddings=True, truncate_dim=20, precision=precision,
                            calibration_embeddings=calibration)
    assert single.shape == (20,) and (np.abs(single.astype(np.int16) - whole[2].astype(np.int16)) <= 1).all()
    theirs = quantization.quantize_embeddings(encoder.encode(TEXTS[:4], normalize_embeddings=True, truncate_dim=20),
                                              precision=precision, calibration_embeddings=calibration)
    assert (np.abs(whole[:4].astype(np.int16) - theirs.astype(np.int16)) <= 1).all()
    # Calibrated on their own, four texts get other buckets than with the shared calibration.
    alone = encoder.encode(TEXTS[:4], normalize_embeddings=True, truncate_dim=20, precision=precision)
    assert (np.abs(alone.astype(np.int16) - whole[:4].astype(np.int16)) > 1).mean() > 0.5
    with pytest.raises(ValueError, match=r"ranges must be \(2, 20\)"):
        encoder.encode(TEXTS, truncate_dim=20, precision=precision, ranges=ranges[:, :10])
    with pytest.raises(ValueError, match="not both"):
        encoder.encode(TEXTS, truncate_dim=20, precision=precision, ranges=ranges, calibration_embeddings=calibration)
    with pytest.raises(ValueError, match="precision='binary' uses none"):
        encoder.encode(TEXTS, truncate_dim=20, precision="binary", ranges=ranges)


def test_bad_options_are_refused_before_encoding(encoder):
    with pytest.raises(ValueError, match="unknown prompt_name 'SciFakt'"):
        encoder.encode(TEXTS, prompt_name="SciFakt")
    dimension = encoder.config.hidden_size
    for bad in (dimension + 1, 0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"truncate_dim must be an integer in \[1, {dimension}\]"):
            encoder.encode(TEXTS, truncate_dim=bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        encoder.encode(TEXTS, precision="int4")
    with pytest.raises(ValueError, match="apply to sentence embeddings"):
        encoder.encode(TEXTS, output_value="token_embeddings", precision="int8")
    with pytest.raises(ValueError, match="at least 2 calibration embeddings"):
        encoder.encode(TEXTS[0], precision="int8")
    with pytest.raises(TypeError, match="prompt must be a string"):
        encoder.encode(TEXTS, prompt=["not", "a string"])


@pytest.mark.slow  # spawns two processes that import torch and transformers
def test_two_cpu_processes_give_the_one_process_embeddings(encoder):
    """A pool started once serves several calls; device=[...] starts and stops one around a call (one process
    here, to keep the test short). Slow on a shared 2-core machine (~30 s quiet, ~90 s at load 13): every
    spawned Python imports torch and transformers."""
    texts = TEXTS * 3
    expected = encoder.encode(texts, prompt_name="SciFact", batch_size=4)
    pool = encoder.start_multi_process_pool(["cpu", "cpu"])
    try:
        assert len(pool["processes"]) == 2
        got = encoder.encode(texts, prompt_name="SciFact", batch_size=4, pool=pool, chunk_size=5)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        tokens = encoder.encode(texts[:4], output_value="token_embeddings", pool=pool, chunk_size=1)
        for ours, single in zip(tokens, encoder.encode(texts[:4], output_value="token_embeddings")):
            np.testing.assert_allclose(ours, single, rtol=1e-5, atol=1e-6)
        binary = encoder.encode(texts, precision="ubinary", pool=pool)
        np.testing.assert_array_equal(binary, encoder.encode(texts, precision="ubinary"))
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            encoder.encode(texts, pool=pool, chunk_size=0)
    finally:
        encoder.stop_multi_process_pool(pool)
    assert not any(p.is_alive() for p in pool["processes"])
    from llm2vec_fast import is_patched

    assert is_patched(encoder.model)  # sent unpatched to the processes, patched again here
    np.testing.assert_allclose(encoder.encode(texts[:5], device=["cpu"]), encoder.encode(texts[:5]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one device"):
        encoder.encode(texts, device=[])
