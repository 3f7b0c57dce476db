"""The text -> embedding pipeline (llm2vec_fast.pipeline) on a tiny random model with the SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import build_tiny_model


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def model():
    from llm2vec_fast import patch

    return patch(build_tiny_model("llama", vocab_size=49152), attention_impl="torch").eval()


PAIRS = [("Retrieve relevant passages", "A man with a hard hat is dancing."), ("", "x"),
         ("Query", "The quick brown fox jumps over the lazy dog."), ("", "")]


def test_instruction_separator_joins_as_llm2vec_does_in_encoding_and_in_training(tokenizer):
    from llm2vec_fast.pipeline import TextTokenizer

    instruction, text = "Retrieve relevant passages", "Buddhism (religion/philosophy)"
    for separator in (" ", "; "):
        (encoded,) = TextTokenizer(tokenizer, max_length=64, instruction_separator=separator)([(instruction, text)])
        first = encoded.embed_mask.index(1)
        assert not any(encoded.embed_mask[:first]) and all(encoded.embed_mask[first:])
        assert tokenizer.decode(encoded.input_ids) == instruction + separator + text
        assert tokenizer.decode(encoded.input_ids[first:]).strip() == text
    (plain,) = TextTokenizer(tokenizer, max_length=64, instruction_separator="; ")([("", text)])
    assert tokenizer.decode(plain.input_ids) == text and all(plain.embed_mask)  # no instruction: no separator


def test_truncation_and_whole_input_pooling_are_flagged(tokenizer):
    from llm2vec_fast.pipeline import TextTokenizer

    text = "one two three four five six seven eight nine ten"
    cut, whole, fits = TextTokenizer(tokenizer, max_length=6)([("", text), ("an instruction longer than six tokens", text),
                                                               ("", "one two")])
    assert cut.truncated and len(cut.input_ids) == 6 and not cut.pooled_whole
    assert whole.truncated and whole.pooled_whole and all(whole.embed_mask)  # the text was cut away entirely
    assert not fits.truncated and not fits.pooled_whole
    (trimmed,) = TextTokenizer(tokenizer, max_length=64, doc_max_length=4)([("", text)])
    assert trimmed.truncated and tokenizer.decode(trimmed.input_ids) == "one two three four"
    with pytest.raises(ValueError, match="fast"):
        TextTokenizer(type("Slow", (), {"is_fast": False})(), max_length=8)
    with pytest.raises(ValueError, match="positive"):
        TextTokenizer(tokenizer, max_length=0)


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token", "bos_token"])
def test_embed_is_the_same_for_both_layouts_for_dicts_and_for_each_text_alone(tokenizer, model, mode):
    from llm2vec_fast.pipeline import TextTokenizer, collate, embed

    encoded = TextTokenizer(tokenizer, max_length=64)(PAIRS)
    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        packed = embed(model, collate(encoded, packed=True, pad_id=pad_id), mode)
        padded = collate(encoded, packed=False, pad_id=pad_id)
        from_dict = embed(model, dataclasses.asdict(padded), mode)  # the form the Trainer moves to the device
        alone = torch.cat([embed(model, collate([e], packed=False, pad_id=pad_id), mode) for e in encoded])
    assert packed.dtype == torch.float32 and packed.shape == (len(PAIRS), 64)
    torch.testing.assert_close(from_dict, embed(model, padded, mode), rtol=0, atol=0)
    torch.testing.assert_close(packed, from_dict, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, from_dict, rtol=1e-4, atol=1e-5)


def test_embed_keeps_the_graph_for_training(tokenizer, model):
    from llm2vec_fast.pipeline import TextTokenizer, collate, embed

    batch = collate(TextTokenizer(tokenizer, max_length=64)(PAIRS[:3]), packed=True, pad_id=0)
    out = embed(model, batch, "mean")
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    model.zero_grad(set_to_none=True)


def test_last_hidden_state_reads_model_outputs_and_tuples():
    from transformers.modeling_outputs import BaseModelOutput

    from llm2vec_fast.pipeline import last_hidden_state

    hidden = torch.randn(2, 3, 4)
    assert last_hidden_state(BaseModelOutput(last_hidden_state=hidden)) is hidden
    assert last_hidden_state((hidden, None)) is hidden
