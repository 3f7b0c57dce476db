"""The encoder on tiny random models with the real SmolLM2 tokenizer: invariances, layouts, inputs, loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import build_tiny_model

TEXTS = [
    "A man with a hard hat is dancing.",
    "x",
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "",
    "   ",
    "Buddhism (religion/philosophy)",
    "Café naïve — 東京 🍕",
    "short one",
    "Another sentence of medium length about encoders.",
]
PAIRS = [["Retrieve relevant passages", t] for t in TEXTS[:4]] + [["", "no instruction here"]]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def make_encoder(tokenizer, family="llama", pooling_mode="mean", impl="torch", **settings):
    from llm2vec_fast import LLM2Vec, patch

    overrides = {"vocab_size": 49152}
    if family == "gemma":
        overrides["head_dim"] = 16
    model = build_tiny_model(family, **overrides)
    patch(model, attention_impl=impl)
    return LLM2Vec(model, tokenizer, pooling_mode=pooling_mode, **settings)


def cosine_min(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return ((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min()


@pytest.mark.parametrize("mode, packed", [("mean", True), ("mean", False), ("last_token", False)])
def test_batch_size_and_composition_do_not_change_embeddings(tokenizer, mode, packed):
    encoder = make_encoder(tokenizer, pooling_mode=mode, packed=packed)
    alone = encoder.encode(TEXTS, batch_size=1)
    for batch_size in (3, 32):
        together = encoder.encode(TEXTS, batch_size=batch_size)
        np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    # The same text among other texts, in another position.
    mixed = encoder.encode(["padding " * 30, TEXTS[0], "y"], batch_size=3)
    np.testing.assert_allclose(mixed[1], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, mode", [("llama", "mean"), ("qwen2", "bos_token"), ("gemma", "weighted_mean")])
def test_packed_equals_padded(tokenizer, family, mode):
    # Every pooling mode's packed and padded versions are compared directly in test_pool_packed_equals_pool.
    encoder = make_encoder(tokenizer, family=family, pooling_mode=mode)
    inputs = TEXTS + PAIRS
    padded = encoder.encode(inputs, batch_size=4, packed=False)
    packed = encoder.encode(inputs, batch_size=4, packed=True)
    np.testing.assert_allclose(packed, padded, rtol=1e-4, atol=1e-5)
    tokens_padded = encoder.encode(inputs, packed=False, output_value="token_embeddings")
    tokens_packed = encoder.encode(inputs, packed=True, output_value="token_embeddings")
    for a, b in zip(tokens_padded, tokens_packed):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_packed_through_triton_interpreter_equals_padded(tokenizer):
    encoder = make_encoder(tokenizer, impl="auto")  # Triton kernel under TRITON_INTERPRET=1
    inputs = [TEXTS[0], TEXTS[2], ["Retrieve", TEXTS[5]]]
    padded = encoder.encode(inputs, packed=False)
    packed = encoder.encode(inputs, packed=True)
    np.testing.assert_allclose(packed, padded, rtol=1e-4, atol=1e-4)


def test_embeddings_follow_the_model_not_the_padding(tokenizer):
    # Against a plain unpadded forward of each text through the same patched model.
    encoder = make_encoder(tokenizer)
    ours = encoder.encode(TEXTS[:3] + [TEXTS[5]], batch_size=4)
    for row, text in enumerate(TEXTS[:3] + [TEXTS[5]]):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = encoder.model(input_ids=ids).last_hidden_state[0]
        np.testing.assert_allclose(ours[row], hidden.mean(0).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip_instruction", [True, False])
def test_forward_on_left_padded_features_equals_encode(tokenizer, skip_instruction):
    # llm2vec's forward(features): a left-padded batch without position ids; positions must still start at 0 on
    # each text's first token, as encode gives them, or the padded rows would embed differently.
    from llm2vec_fast.pipeline import collate

    encoder = make_encoder(tokenizer, skip_instruction=skip_instruction)
    inputs = [TEXTS[0], TEXTS[2], ["Retrieve relevant passages", TEXTS[5]], "x"]
    batch = collate(encoder.tokenize_texts([("", t) if isinstance(t, str) else tuple(t) for t in inputs]),
                    packed=False, pad_id=tokenizer.pad_token_id)
    assert not bool(batch.attention_mask.all())  # some rows are left padded
    features = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "embed_mask": batch.embed_mask}
    with torch.no_grad():
        ours = encoder(features)
    np.testing.assert_allclose(ours.numpy(), encoder.encode(inputs, batch_size=1), rtol=1e-4, atol=1e-5)


def test_instruction_tokens_are_left_out(tokenizer):
    encoder = make_encoder(tokenizer)
    instruction, text = "Retrieve relevant passages", "Buddhism (religion/philosophy)"
    encoded = encoder.tokenize_texts([(instruction, text)])[0]
    first = encoded.embed_mask.index(1)
    assert all(encoded.embed_mask[first:]) and not any(encoded.embed_mask[:first])
    assert tokenizer.decode(encoded.input_ids[:first]) == instruction
    assert tokenizer.decode(encoded.input_ids[first:]) == " " + text
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        hidden = encoder.model(input_ids=ids).last_hidden_state[0]
    np.testing.assert_allclose(encoder.encode([[instruction, text]])[0], hidden[first:].mean(0).numpy(),
                               rtol=1e-4, atol=1e-5)
    encoder.skip_instruction = False
    np.testing.assert_allclose(encoder.encode([[instruction, text]])[0], hidden.mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_output_shapes_order_and_conversions(tokenizer):
    encoder = make_encoder(tokenizer)
    single = encoder.encode("one text")
    assert isinstance(single, np.ndarray) and single.shape == (64,)
    many = encoder.encode(TEXTS)
    assert many.shape == (len(TEXTS), 64) and many.dtype == np.float32
    reversed_ = encoder.encode(TEXTS[::-1])
    np.testing.assert_allclose(reversed_[::-1], many, rtol=1e-4, atol=1e-5)
    tensor = encoder.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (len(TEXTS), 64)
    normalized = encoder.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, rtol=1e-5)
    tokens = encoder.encode(["Hello world", ["Retrieve", "Hello world again"]], output_value="token_embeddings")
    assert [t.shape for t in tokens] == [(2, 64), (3, 64)]  # "Hello", " world" / " Hello", " world", " again"
    np.testing.assert_allclose(tokens[0].mean(0), encoder.encode("Hello world"), rtol=1e-4, atol=1e-5)


def test_empty_and_whitespace_texts_have_defined_embeddings(tokenizer):
    encoder = make_encoder(tokenizer)
    out = encoder.encode(["", "   ", ["Retrieve", ""], "x"])
    assert np.isfinite(out).all() and (np.abs(out).sum(1) > 0).all()
    # An empty text is the EOS token alone; with only an instruction, all the input's tokens are pooled: the
    # instruction and the joining space that llm2vec puts after it.
    with torch.no_grad():
        eos = encoder.model(input_ids=torch.tensor([[tokenizer.eos_token_id]])).last_hidden_state[0, 0]
        instruction = encoder.model(input_ids=tokenizer("Retrieve ", return_tensors="pt")["input_ids"])
    np.testing.assert_allclose(out[0], eos.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[2], instruction.last_hidden_state[0].mean(0).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "bad, error, words",
    [
        ([], ValueError, "empty list"),
        (42, TypeError, "int"),
        (["ok", 3], TypeError, "input 1"),
        ([["a", "b", "c"]], TypeError, "input 0"),
        (("instruction", "text"), TypeError, "tuple of two strings"),
    ],
)
def test_bad_inputs_are_refused_clearly(tokenizer, bad, error, words):
    encoder = make_encoder(tokenizer)
    with pytest.raises(error, match=words):
        encoder.encode(bad)


def test_bad_settings_are_refused(tokenizer):
    encoder = make_encoder(tokenizer)
    with pytest.raises(ValueError, match="output_value"):
        encoder.encode(["a"], output_value="cls")
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="pooling_mode"):
        make_encoder(tokenizer, pooling_mode="max")


def test_max_length_truncates_and_doc_max_length_trims_words(tokenizer, caplog):
    import logging

    encoder = make_encoder(tokenizer, max_length=8, doc_max_length=5)
    long_text = "one two three four five six seven eight nine ten eleven twelve"
    encoded = encoder.tokenize_texts([("", long_text), ("an instruction that is long enough", long_text),
                                      ("", "short")])
    assert encoded[0].truncated and encoded[1].truncated and not encoded[2].truncated
    assert tokenizer.decode(encoded[0].input_ids) == "one two three four five"  # word trimming, llm2vec's rule
    assert len(encoded[1].input_ids) == 8  # instruction + trimmed text cut at max_length
    with caplog.at_level(logging.WARNING, logger="llm2vec_fast.encoder"):
        assert np.isfinite(encoder.encode([["an instruction that is long enough", long_text], "short"])).all()
    assert "1 of 2 texts were cut to fit max_length=8 tokens or doc_max_length=5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llm2vec_fast.encoder"):
        encoder.encode(["short"])
    assert "were cut" not in caplog.text


def test_save_and_from_pretrained_round_trip(tokenizer, tmp_path):
    from llm2vec_fast import LLM2Vec

    encoder = make_encoder(tokenizer, pooling_mode="weighted_mean", max_length=64)
    encoder.save(str(tmp_path / "saved"))
    stored = json.loads((tmp_path / "saved" / "llm2vec_config.json").read_text())
    assert stored == {"pooling_mode": "weighted_mean", "max_length": 64, "doc_max_length": 400,
                      "skip_instruction": True}
    # The plain model is written (not our patch's settings), and the encoder stays patched.
    assert json.loads((tmp_path / "saved" / "config.json").read_text()).get("is_causal") in (None, True)
    from llm2vec_fast import is_patched

    assert is_patched(encoder.model)
    loaded = LLM2Vec.from_pretrained(str(tmp_path / "saved"), attention_impl="torch")
    assert (loaded.pooling_mode, loaded.max_length) == ("weighted_mean", 64)
    np.testing.assert_allclose(loaded.encode(TEXTS), encoder.encode(TEXTS), rtol=1e-4, atol=1e-5)
    explicit = LLM2Vec.from_pretrained(str(tmp_path / "saved"), pooling_mode="mean", attention_impl="torch")
    assert explicit.pooling_mode == "mean" and explicit.max_length == 64


def test_adapters_load_as_llm2vec_loads_them(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast import LLM2Vec

    base = build_tiny_model("llama", vocab_size=49152)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = get_peft_model(build_tiny_model("llama", vocab_size=49152),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in lora.named_parameters():  # LoRA's B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    lora.save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "llm2vec_config.json", "w") as handle:
        json.dump({"pooling_mode": "weighted_mean"}, handle)
    merged = lora.merge_and_unload().eval()

    from llm2vec_fast import patch

    patch(merged, attention_impl="torch")
    expected = __import__("llm2vec_fast").LLM2Vec(merged, tokenizer, pooling_mode="weighted_mean").encode(TEXTS)
    plain = LLM2Vec.from_pretrained(str(tmp_path / "base"), attention_impl="torch").encode(TEXTS)
    assert cosine_min(plain, expected) < 0.999  # the adapter changes the embeddings
    for merge in (False, True):
        loaded = LLM2Vec.from_pretrained(str(tmp_path / "base"), peft_model_name_or_path=str(tmp_path / "adapter"),
                                         merge_peft=merge, attention_impl="torch")
        assert loaded.pooling_mode == "weighted_mean"  # llm2vec_config.json of the adapter
        np.testing.assert_allclose(loaded.encode(TEXTS), expected, rtol=1e-3, atol=1e-4)
    # An adapter stored beside a base config (llm2vec's special case) is merged.
    shutil.copytree(tmp_path / "adapter", tmp_path / "beside")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "beside" / "adapter_config.json").write_text(json.dumps(config))
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "beside" / "config.json")
    tokenizer.save_pretrained(tmp_path / "beside")
    beside = LLM2Vec.from_pretrained(str(tmp_path / "beside"), attention_impl="torch")
    np.testing.assert_allclose(beside.encode(TEXTS), expected, rtol=1e-3, atol=1e-4)


def _pool_reference(tokens, counted, mode):
    """One text's fp64 embedding from its real tokens' states and embed mask, as llm2vec pools."""
    if not len(tokens):
        return torch.zeros(tokens.shape[1], dtype=torch.float64)
    if mode == "bos_token":
        return tokens[0].double()
    if mode in ("eos_token", "last_token"):
        return tokens[-1].double()
    weights = counted.double()
    if mode == "weighted_mean":
        weights = torch.cumsum(weights, 0) * weights
    return (tokens.double() * weights[:, None]).sum(0) / weights.sum().clamp_min(1e-9)


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "eos_token", "last_token", "bos_token"])
def test_pool_padded_and_packed_equal_a_per_text_reference(mode):
    from llm2vec_fast.pooling import pool, pool_segments

    torch.manual_seed(0)
    lengths = [5, 1, 9, 3, 0, 4]
    hidden = [torch.randn(n, 8) for n in lengths]
    masks = [torch.tensor([0] * (n // 3) + [1] * (n - n // 3), dtype=torch.long) for n in lengths]
    masks[5] = torch.zeros(4, dtype=torch.long)  # a text whose embed mask is empty
    expected = torch.stack([_pool_reference(h, m, mode) for h, m in zip(hidden, masks)]).float()
    width = max(lengths) + 1
    for right in (False, True):  # left padding (ours, llm2vec's) and right padding
        padded = torch.randn(len(lengths), width, 8)  # padded positions hold other (finite) states
        attention = torch.zeros(len(lengths), width, dtype=torch.long)
        embed = torch.ones_like(attention)  # the embed mask's padded positions must not count
        for i, (h, m) in enumerate(zip(hidden, masks)):
            where = slice(0, len(h)) if right else slice(width - len(h), width)
            padded[i, where], attention[i, where], embed[i, where] = h, 1, m
        torch.testing.assert_close(pool(padded, attention, mode, embed_mask=embed), expected)
    packed = pool_segments(torch.cat(hidden), torch.tensor(lengths), mode, embed_mask=torch.cat(masks))
    torch.testing.assert_close(packed, expected)


def test_pool_is_one_graph_without_host_syncs():
    """The padded pool traces whole (a boolean-mask copy or a host sync breaks a fullgraph trace), keeps
    gradients, and names a wrong embed mask."""
    from llm2vec_fast.pooling import POOLING_MODES, pool

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1], [1] * 7])
    embed = attention * (torch.arange(7) % 2)
    for mode in POOLING_MODES:
        torch._dynamo.reset()
        traced = torch.compile(pool, backend="eager", fullgraph=True)
        torch.testing.assert_close(traced(hidden, attention, mode, embed_mask=embed),
                                   pool(hidden, attention, mode, embed_mask=embed))
    pool(hidden, attention, "weighted_mean", embed_mask=embed).sum().backward()
    assert hidden.grad[attention == 0].abs().sum() == 0 and hidden.grad[embed == 1].abs().sum() > 0
    with pytest.raises(ValueError, match="embed_mask must be"):
        pool(hidden, attention, "mean", embed_mask=embed[:, 1:])


def test_token_budget_batches():
    from llm2vec_fast.batching import length_sorted_batches

    lengths = [3, 10, 7, 7, 1, 12, 2]
    padded = length_sorted_batches(lengths, batch_size=3, max_batch_tokens=20)
    assert sorted(i for b in padded for i in b) == list(range(len(lengths)))
    for batch in padded:
        widths = [lengths[i] for i in batch]
        assert widths == sorted(widths, reverse=True) and len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(widths) <= 20
    packed = length_sorted_batches(lengths, batch_size=100, max_batch_tokens=20, packed=True)
    assert all(len(b) == 1 or sum(lengths[i] for i in b) <= 20 for b in packed)
    assert [lengths[b[0]] for b in packed] == sorted((lengths[b[0]] for b in packed), reverse=True)


def test_padded_batches_limit_padding():
    from llm2vec_fast.batching import length_sorted_batches

    lengths = [100, 90, 80, 74, 60, 30, 29, 10]
    batches = length_sorted_batches(lengths, batch_size=32, max_padding=0.25)
    assert [[lengths[i] for i in b] for b in batches] == [[100, 90, 80], [74, 60], [30, 29], [10]]
    with pytest.raises(ValueError, match="max_padding"):
        length_sorted_batches(lengths, batch_size=4, max_padding=1.5)


@pytest.mark.gpu
def test_cuda_packed_equals_padded_and_cpu(tokenizer):
    # On CUDA encode packs by default (Triton varlen kernel); padded batches and the CPU fp32 result agree.
    encoder = make_encoder(tokenizer, impl="auto")
    inputs = TEXTS + PAIRS
    cpu = encoder.encode(inputs, device="cpu", packed=False)
    encoder.model.to(torch.bfloat16)
    packed = encoder.encode(inputs, device="cuda")
    padded = encoder.encode(inputs, device="cuda", packed=False)
    assert cosine_min(packed, padded) > 0.999
    assert cosine_min(packed, cpu) > 0.99


def test_doc_max_length_keeps_the_first_tokens_of_a_single_long_word(tokenizer):
    # llm2vec's whole-word rule would empty such a text, leaving the instruction's embedding for the document.
    encoder = make_encoder(tokenizer, max_length=32, doc_max_length=8)
    (encoded,) = encoder.tokenize_texts([("Query:", "a" * 200)])
    text_tokens = [t for t, keep in zip(encoded.input_ids, encoded.embed_mask) if keep]
    kept = tokenizer.decode(text_tokens).strip()
    assert encoded.truncated and text_tokens and set(kept) == {"a"}
    # doc_max_length counts the text's tokens alone (llm2vec's rule); after the instruction they may split otherwise
    assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= 8


@pytest.fixture(scope="module")
def tiny_sinks_dir(tmp_path_factory, smollm2_path) -> str:
    """A tiny random GPT-OSS (learned attention sinks: the patch refuses it) with SmolLM2's tokenizer, saved."""
    from transformers import AutoModel, AutoTokenizer, GptOssConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = GptOssConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=4, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_sinks") / "model"
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_enable_bidirectional_false_keeps_a_model_the_patch_refuses_causal_and_unpatched(tiny_sinks_dir, caplog):
    from transformers import AutoModel, AutoTokenizer

    from llm2vec_fast import LLM2Vec, is_patched

    with pytest.raises(NotImplementedError, match="attention sinks"):  # bidirectional needs the patch
        LLM2Vec.from_pretrained(tiny_sinks_dir, pooling_mode="last_token")
    with caplog.at_level("WARNING", logger="llm2vec_fast.encoder"):
        encoder = LLM2Vec.from_pretrained(tiny_sinks_dir, enable_bidirectional=False, pooling_mode="last_token")
    assert not is_patched(encoder.model)
    assert "keeping the model's own causal attention" in caplog.text and "attention sinks" in caplog.text
    texts = ["A man is playing a guitar.", "x", "The quick brown fox jumps over the lazy dog near the river bank."]
    ours = encoder.encode(texts, batch_size=3, convert_to_tensor=True)  # one left-padded batch
    plain = AutoModel.from_pretrained(tiny_sinks_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_sinks_dir)
    with torch.no_grad():
        expected = torch.stack([plain(input_ids=tokenizer(t, return_tensors="pt").input_ids).last_hidden_state[0, -1]
                                for t in texts])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="packed=True needs a model patched by llm2vec_fast"):
        encoder.encode(texts, packed=True)
    # A wrong argument is not a refusal of the model: it is an error, not a silent causal fallback.
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        LLM2Vec.from_pretrained(tiny_sinks_dir, enable_bidirectional=False, attention_impl="trition")
