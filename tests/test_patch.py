"""llm2vec_fast.patch / unpatch on tiny random models of each family (CPU, fp32).

The default implementation runs our Triton kernel through the interpreter (TRITON_INTERPRET=1, set by conftest);
``attention_impl="torch"`` runs the PyTorch reference path. The reference for "bidirectional" is the unpatched
model under PyTorch SDPA given an explicit 4D bidirectional padding mask, built here by hand.
"""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch
from conftest import TINY_FAMILIES, build_tiny_model, padded_batch, slow_except

from llm2vec_fast import is_patched, patch, unpatch

IMPLS = ("auto", "torch")
ATOL, RTOL = 2e-5, 1e-4  # fp32, two layers: summation-order differences only
LENGTHS = (9, 4, 1, 6)


def families_and_impls(*fast):
    """``(tiny_family, impl)`` for every tiny family and implementation (ids ``llama-auto``), all but ``fast``
    marked slow: the fast loop runs the interpreted Triton kernel ("auto") of a whole model where it adds a path."""
    return slow_except([pytest.param(family, impl, id=f"{family}-{impl}") for family in TINY_FAMILIES
                        for impl in IMPLS], *fast)


def random_sequences(lengths=LENGTHS, vocab=123, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]


def real_rows(hidden, attention_mask, row):
    return hidden[row][attention_mask[row].bool()]


def hidden_states(model, **inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]


def sdpa_bidirectional_reference(model, input_ids, attention_mask):
    """The unpatched model under SDPA with a hand-built (B, 1, S, S) bidirectional key padding mask."""
    assert model.config._attn_implementation == "sdpa"
    keys = attention_mask.bool()[:, None, None, :]
    mask_4d = keys.expand(-1, 1, input_ids.shape[1], -1)
    return hidden_states(model, input_ids=input_ids, attention_mask=mask_4d)


def model_state(model):
    """Everything patch may touch, for comparing before/after."""
    config = model.config
    modules = [m for m in model.modules() if hasattr(m, "attention_dropout") and hasattr(m, "is_causal")]
    return {
        "attn": config._attn_implementation,
        "is_causal": getattr(config, "is_causal", "<absent>"),
        "use_cache": getattr(config, "use_cache", "<absent>"),
        "config_dropout": getattr(config, "attention_dropout", "<absent>"),
        "module_dropout": [m.attention_dropout for m in modules],
        "module_causal": [m.is_causal for m in modules],
        "patched": is_patched(model),
    }


# --------------------------------------------------------------------------------------------------------------------
# Behaviour on each family
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny_family,impl", families_and_impls("llama-auto", "llama-torch", "gemma-auto",
                                                               "gemma-torch"))
def test_patched_matches_sdpa_bidirectional_and_sees_the_future(tiny_family, impl):
    model = build_tiny_model(tiny_family)
    sequences = random_sequences()
    for side in ("right", "left"):
        input_ids, attention_mask = padded_batch(sequences, side)
        reference = sdpa_bidirectional_reference(model, input_ids, attention_mask)
        patch(model, attention_impl=impl)
        got = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
        unpatch(model)
        for row in range(len(sequences)):
            torch.testing.assert_close(
                real_rows(got, attention_mask, row), real_rows(reference, attention_mask, row), atol=ATOL, rtol=RTOL
            )

    # Changing the last token changes the first token's output (and not under the causal model).
    first, changed = sequences[0], sequences[0].clone()
    changed[-1] = 3 + (changed[-1] - 3 + 1) % 120
    causal = [hidden_states(model, input_ids=s[None])[0, 0] for s in (first, changed)]
    torch.testing.assert_close(causal[0], causal[1], atol=0, rtol=0)
    patch(model, attention_impl=impl)
    bidirectional = [hidden_states(model, input_ids=s[None])[0, 0] for s in (first, changed)]
    assert (bidirectional[0] - bidirectional[1]).abs().max() > 1e-3


# The interpreted kernel through a whole model ("auto", 2-2.5 s of CPU a case) is in the fast loop in the test above,
# for both families; here and in the packed test the fast loop runs both families on the PyTorch path: the adapter
# hands both paths the same padding mask or packed metadata, and the kernel's padded and packed (varlen) results
# are checked against the reference in the fast loop by tests/test_attention_kernel.py.
@pytest.mark.parametrize("tiny_family,impl", families_and_impls("llama-torch", "gemma-torch"))
def test_padding_batch_size_and_composition_do_not_matter(tiny_family, impl):
    model = patch(build_tiny_model(tiny_family), attention_impl=impl)
    sequences = random_sequences()
    alone = [hidden_states(model, input_ids=s[None])[0] for s in sequences]
    others = random_sequences(lengths=(2, 11), seed=7)
    batches = [
        (sequences, "right"),
        (sequences, "left"),
        ([sequences[1], others[0], sequences[2], others[1]], "left"),
    ]
    for batch, side in batches:
        input_ids, attention_mask = padded_batch(batch, side)
        got = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
        for row, seq in enumerate(batch):
            for index, known in enumerate(sequences):
                if seq is known:
                    torch.testing.assert_close(real_rows(got, attention_mask, row), alone[index], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("tiny_family,impl", families_and_impls("llama-torch", "gemma-torch"))
def test_packed_input_equals_padded_batch(tiny_family, impl):
    model = patch(build_tiny_model(tiny_family), attention_impl=impl)
    sequences = random_sequences(lengths=(5, 1, 9, 3))
    input_ids, attention_mask = padded_batch(sequences, "right")
    padded = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
    expected = torch.cat([real_rows(padded, attention_mask, row) for row in range(len(sequences))])

    packed_ids = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    by_positions = hidden_states(model, input_ids=packed_ids, position_ids=position_ids)[0]
    torch.testing.assert_close(by_positions, expected, atol=ATOL, rtol=RTOL)

    cu_seqlens = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    by_cu_seqlens = hidden_states(
        model,
        input_ids=packed_ids,
        position_ids=position_ids,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=9,
        max_length_k=9,
    )[0]
    torch.testing.assert_close(by_cu_seqlens, expected, atol=ATOL, rtol=RTOL)

    # Several rows, each packed (no padding): every row start and every position restart begins a sequence.
    rows = torch.stack([torch.cat([sequences[0], sequences[1], sequences[3]]), sequences[2]])
    row_positions = torch.stack([torch.cat([torch.arange(5), torch.arange(1), torch.arange(3)]), torch.arange(9)])
    two_rows = hidden_states(model, input_ids=rows, position_ids=row_positions)
    torch.testing.assert_close(two_rows[0], expected[[*range(6), *range(15, 18)]], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(two_rows[1], expected[6:15], atol=ATOL, rtol=RTOL)


def test_packed_input_under_inference_mode():
    # Inference tensors have no version counter: the packed-metadata cache must not rely on one.
    model = patch(build_tiny_model("llama"), attention_impl="torch")
    sequences = random_sequences(lengths=(5, 1, 9, 3))
    packed_ids = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    expected = hidden_states(model, input_ids=packed_ids, position_ids=position_ids)
    with torch.inference_mode():
        position_ids = position_ids.clone()  # made inside inference mode, as an encoder would
        got = model(input_ids=packed_ids, position_ids=position_ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_unpatch_restores_exact_causal_outputs_and_state(tiny_family):
    model = build_tiny_model(tiny_family)
    input_ids, attention_mask = padded_batch(random_sequences(), "right")
    before_state = model_state(model)
    before = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)

    patch(model, attention_dropout=0.3)
    patched_state = model_state(model)
    assert patched_state["attn"] == "llm2vec_fast"
    assert patched_state["is_causal"] is False and patched_state["use_cache"] is False
    assert set(patched_state["module_dropout"]) == {0.3} and patched_state["config_dropout"] == 0.3
    assert all(patched_state["module_causal"])  # module.is_causal stays True: the is_causal keyword decides

    unpatch(model)
    assert model_state(model) == before_state
    after = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(after, before)


# --------------------------------------------------------------------------------------------------------------------
# Idempotence, options, wrappers
# --------------------------------------------------------------------------------------------------------------------


def test_patch_is_idempotent_and_repatching_replaces_options():
    model = build_tiny_model("llama")
    original = model_state(model)
    input_ids, attention_mask = padded_batch(random_sequences(), "left")
    once = hidden_states(patch(model), input_ids=input_ids, attention_mask=attention_mask)
    state_once = model_state(model)
    twice = hidden_states(patch(model), input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(once, twice) and model_state(model) == state_once

    patch(model, attention_impl="torch", attention_dropout=0.2)
    assert model.config._attn_implementation == "llm2vec_fast_torch"
    assert set(model_state(model)["module_dropout"]) == {0.2}
    patch(model)  # no dropout given: back to the model's own value
    assert model_state(model) == state_once

    unpatch(model)
    assert model_state(model) == original
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)


def test_unpatched_gives_the_plain_model_for_a_block_and_patches_back_with_the_same_options():
    from llm2vec_fast import unpatched

    model = build_tiny_model("llama")
    original = model_state(model)
    with unpatched(model):  # not patched: left as it is
        assert model_state(model) == original
    patch(model, attention_impl="torch", attention_dropout=0.2)
    patched = model_state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with unpatched(model):
            assert model_state(model) == original
            raise RuntimeError("inside")
    assert model_state(model) == patched  # patched again after the exception, dropout and impl included
    assert model.config._attn_implementation == "llm2vec_fast_torch"


def test_patch_settings_patch_another_copy_alike():
    """What a pickled or copied model (multiprocess encoding) is patched again with: the same options."""
    from llm2vec_fast.bidirectional import patch_settings

    model, other = build_tiny_model("llama"), build_tiny_model("llama")
    assert patch_settings(model) is None
    patch(model, attention_impl="torch", attention_dropout=0.2)
    settings = patch_settings(model)
    assert settings == {"attention_impl": "torch", "attention_dropout": 0.2, "bidirectional": True}
    patch(other, **settings)
    assert model_state(other) == model_state(model)
    unpatch(model)
    assert patch_settings(model) is None


# "auto" (the interpreted Triton kernel's dropout, 3 s of CPU) is left to the full suite: the adapter hands the kernel
# and the PyTorch path the same dropout_p, which "torch" checks here (training only, redrawn, off when repatched),
# and the kernel's dropout itself is checked in the fast loop by tests/test_attention_kernel.py's dropout tests.
@pytest.mark.parametrize("impl", [pytest.param("auto", marks=pytest.mark.slow), "torch"])
def test_attention_dropout_applies_in_training_only(impl):
    model = patch(build_tiny_model("llama"), attention_impl=impl, attention_dropout=0.3)
    input_ids, attention_mask = padded_batch(random_sequences(), "right")
    eval_runs = [hidden_states(model, input_ids=input_ids, attention_mask=attention_mask) for _ in range(2)]
    assert torch.equal(*eval_runs)
    model.train()
    torch.manual_seed(0)
    train_runs = [hidden_states(model, input_ids=input_ids, attention_mask=attention_mask) for _ in range(2)]
    assert not torch.allclose(train_runs[0], train_runs[1])
    assert not torch.allclose(train_runs[0], eval_runs[0])
    patch(model, attention_impl=impl)  # without attention_dropout: the config's 0.0 again, training is deterministic
    assert torch.equal(*[hidden_states(model, input_ids=input_ids, attention_mask=attention_mask) for _ in range(2)])


def test_causal_lm_and_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = build_tiny_model("qwen2", causal_lm=True)
    input_ids, attention_mask = padded_batch(random_sequences(), "right")
    reference = sdpa_bidirectional_reference(model.model, input_ids, attention_mask)
    causal_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.detach()

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    mask_4d = attention_mask.bool()[:, None, None, :].expand(-1, 1, input_ids.shape[1], -1)
    lora_reference = hidden_states(wrapped, input_ids=input_ids, attention_mask=mask_4d, output_hidden_states=True)
    assert patch(wrapped) is wrapped
    assert model.config._attn_implementation == "llm2vec_fast" and model.model.config.is_causal is False
    got = hidden_states(wrapped, input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    for row in range(input_ids.shape[0]):
        torch.testing.assert_close(
            real_rows(got, attention_mask, row), real_rows(lora_reference, attention_mask, row), atol=ATOL, rtol=RTOL
        )

    wrapped.train()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = wrapped(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    grads = [p.grad for name, p in wrapped.named_parameters() if "lora_" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    unpatch(wrapped)
    wrapped.eval()
    with wrapped.disable_adapter(), torch.no_grad():
        assert torch.equal(wrapped(input_ids=input_ids, attention_mask=attention_mask).logits, causal_logits)
        patch(wrapped)
        bare = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    for row in range(input_ids.shape[0]):
        torch.testing.assert_close(
            real_rows(bare, attention_mask, row), real_rows(reference, attention_mask, row), atol=ATOL, rtol=RTOL
        )


def test_prepared_4d_mask_is_honoured():
    model = build_tiny_model("mistral")
    input_ids, attention_mask = padded_batch(random_sequences(), "right")
    mask_4d = torch.ones(4, 1, 9, 9, dtype=torch.bool).tril()  # a causal pattern given explicitly by the caller
    expected = hidden_states(model, input_ids=input_ids, attention_mask=mask_4d)
    patch(model)
    got = hidden_states(model, input_ids=input_ids, attention_mask=mask_4d)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------------------------


def test_bad_arguments():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="attention_impl"):
        patch(model, attention_impl="cuda")
    with pytest.raises(ValueError, match="attention_dropout"):
        patch(model, attention_dropout=1.5)
    with pytest.raises(TypeError, match="attention_dropout"):
        patch(model, attention_dropout="0.1")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        patch("llama")
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "is_causal")


def test_encoder_only_and_encoder_decoder_models_are_refused():
    from transformers import BertConfig, BertModel, T5Config, T5Model

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(ValueError, match="encoder-only"):
        patch(bert)
    t5 = T5Model(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        patch(t5)
    assert not hasattr(bert.config, "is_causal") or bert.config.is_causal is not False


LEGACY_MODEL_SOURCE = '''
import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel


class LegacyAttention(nn.Module):
    """Attention that calls torch directly instead of going through transformers' registry."""

    def __init__(self):
        super().__init__()
        self.is_causal = True
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class LegacyModel(PreTrainedModel):
    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = LegacyAttention()
'''


def test_model_without_attention_interface_is_refused(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    (tmp_path / "legacy_model_for_llm2vec_fast_test.py").write_text(textwrap.dedent(LEGACY_MODEL_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    legacy = importlib.import_module("legacy_model_for_llm2vec_fast_test")
    model = legacy.LegacyModel(LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1))
    with pytest.raises(ValueError, match="AttentionInterface"):
        patch(model)


def test_cache_generation_and_causal_requests_are_refused():
    model = patch(build_tiny_model("llama", causal_lm=True))
    input_ids, attention_mask = padded_batch(random_sequences(lengths=(5, 5)), "left")
    with pytest.raises(ValueError, match="cannot decode incrementally"):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    with pytest.raises(ValueError, match="cannot decode incrementally"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="unpatch"):
        model(input_ids=input_ids, attention_mask=attention_mask, is_causal=True)
    assert model.config.is_causal is False  # the forward keyword did not stick
    model(input_ids=input_ids, attention_mask=attention_mask)  # plain calls still work


def test_sliding_window_is_applied_by_the_kernel_not_refused():
    # The window used to be refused for inputs longer than window + 1; now the kernel applies transformers' rule
    # (|i - j| <= 4 here): a token 6 positions away changes nothing, one 4 positions away does.
    model = patch(build_tiny_model("mistral", sliding_window=4), attention_impl="torch")
    ids = random_sequences(lengths=(11,))[0][None]
    base = hidden_states(model, input_ids=ids)
    far, near = ids.clone(), ids.clone()
    far[0, 10] = 3 + (int(far[0, 10]) - 2) % 120
    near[0, 8] = 3 + (int(near[0, 8]) - 2) % 120
    # Two layers: information travels at most 2 * 4 positions, so token 0 is out of reach of token 10 but not of 8.
    assert torch.equal(hidden_states(model, input_ids=far)[0, 0], base[0, 0])
    assert not torch.allclose(hidden_states(model, input_ids=near)[0, 0], base[0, 0])


@pytest.mark.parametrize(("setting", "value"), [("attn_logit_softcapping", 0.0), ("attn_logit_softcapping", -5.0),
                                                ("sliding_window", -1), ("sliding_window", 0)])
def test_non_positive_softcap_or_window_is_refused(setting, value):
    from transformers import AutoModel, Gemma2Config

    config = Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0)
    setattr(config, setting, value)
    model = AutoModel.from_config(config, attn_implementation="eager")
    with pytest.raises(ValueError, match=f"{setting}={value!r}"):
        patch(model)
    assert model.config._attn_implementation == "eager" and not hasattr(model.config, "is_causal")


def test_a_window_no_layer_uses_is_not_checked():
    """Qwen2-MoE's config defaults to sliding_window=0 with use_sliding_window=False (every layer full attention):
    nothing slides, so the patch must not refuse the 0."""
    from transformers import AutoModel, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, num_experts=2, num_experts_per_tok=1)
    assert config.sliding_window == 0 and config.use_sliding_window is False
    model = patch(AutoModel.from_config(config, attn_implementation="eager"), attention_impl="torch")
    ids = torch.randint(0, 50, (2, 7))
    assert torch.isfinite(model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state).all()


def test_attention_sinks_are_refused_at_patch_time():
    from transformers import AutoModel, GptOssConfig

    config = GptOssConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=4)
    model = AutoModel.from_config(config, attn_implementation="eager")
    with pytest.raises(NotImplementedError, match="attention sinks"):
        patch(model)
    assert model.config._attn_implementation == "eager"


def test_bad_packed_metadata_is_refused():
    model = patch(build_tiny_model("llama"))
    packed = torch.cat(random_sequences(lengths=(3, 4)))[None]
    good = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="must rise from 0"):
        model(input_ids=packed, cu_seq_lens_q=torch.tensor([0, 3, 6], dtype=torch.int32), max_length_q=4)
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal"):
        model(input_ids=packed, cu_seq_lens_q=good, cu_seq_lens_k=torch.tensor([0, 4, 7], dtype=torch.int32),
              max_length_q=4, max_length_k=4)
    with pytest.raises(ValueError, match="max_length_q=2"):
        model(input_ids=packed, cu_seq_lens_q=good, cu_seq_lens_k=good, max_length_q=2, max_length_k=4)
    two_rows = torch.stack([packed[0], packed[0]])
    with pytest.raises(ValueError, match="packed into one row"):
        model(input_ids=two_rows, cu_seq_lens_q=good, cu_seq_lens_k=good, max_length_q=4, max_length_k=4)


# --------------------------------------------------------------------------------------------------------------------
# On a GPU (run by the GPU check script; skipped on CPU machines)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_patched_low_precision_error_within_twice_sdpa(tiny_family, dtype):
    """Triton kernel on CUDA in bf16/fp16, head_dim 64, lengths up to 300: padded and packed outputs are as close to
    an fp32 SDPA reference as SDPA itself in the same dtype (at most twice its error plus a small floor)."""
    overrides = dict(hidden_size=256, intermediate_size=512, max_position_embeddings=512)
    if tiny_family in ("gemma", "qwen3"):
        overrides["head_dim"] = 64
    model32 = build_tiny_model(tiny_family, **overrides).cuda()
    sequences = [s.cuda() for s in random_sequences(lengths=(300, 37, 1, 129))]
    input_ids, attention_mask = padded_batch(sequences, "left")
    reference = sdpa_bidirectional_reference(model32, input_ids, attention_mask).float()
    model = model32.to(dtype)
    sdpa = sdpa_bidirectional_reference(model, input_ids, attention_mask).float()
    patch(model, attention_impl="triton")
    ours = hidden_states(model, input_ids=input_ids, attention_mask=attention_mask).float()
    real = attention_mask.bool()
    sdpa_error = (sdpa[real] - reference[real]).abs().max().item()
    floor = 1e-3 * reference[real].abs().max().item()
    ours_error = (ours[real] - reference[real]).abs().max().item()
    assert ours_error <= 2 * sdpa_error + floor, (ours_error, sdpa_error)

    packed_ids = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(len(s), device="cuda") for s in sequences])[None]
    packed = hidden_states(model, input_ids=packed_ids, position_ids=position_ids)[0].float()
    expected = torch.cat([real_rows(reference, attention_mask, row) for row in range(len(sequences))])
    assert (packed - expected).abs().max().item() <= 2 * sdpa_error + floor


def test_mask_functions_beyond_a_window_are_refused():
    """The mask builder evaluates the mask function transformers hands it: full attention and the inclusive window
    pass, anything else (an image-token overlay, another window rule) is refused, never dropped."""
    from transformers.masking_utils import (and_masks, bidirectional_mask_function, or_masks,
                                            sliding_window_bidirectional_mask_function)

    adapter = importlib.import_module("llm2vec_fast.attention_adapter")
    check = adapter._check_bidirectional_mask_function
    check(bidirectional_mask_function, 300, None)
    check(sliding_window_bidirectional_mask_function(5), 300, 5)
    check(sliding_window_bidirectional_mask_function(100), 300, 100)

    def image_block(batch_idx, head_idx, q_idx, kv_idx):  # tokens 250..259 see each other, as image tokens do
        return (q_idx >= 250) & (q_idx < 260) & (kv_idx >= 250) & (kv_idx < 260)

    def exclusive(window):
        return lambda batch_idx, head_idx, q_idx, kv_idx: (q_idx - kv_idx).abs() < window

    with pytest.raises(NotImplementedError, match="neither full attention nor a sliding window"):
        check(or_masks(sliding_window_bidirectional_mask_function(5), image_block), 300, 5)
    with pytest.raises(NotImplementedError, match="neither full attention nor a sliding window"):
        check(and_masks(bidirectional_mask_function, exclusive(5)), 300, 5)
    with pytest.raises(NotImplementedError, match="neither full attention nor a sliding window"):
        check(and_masks(bidirectional_mask_function, exclusive(200)), 300, 200)

    def vmap_only(batch_idx, head_idx, q_idx, kv_idx):
        return bool(q_idx >= 0)  # a Python bool of a tensor: works per element under vmap only

    with pytest.raises(NotImplementedError, match="cannot evaluate"):
        check(or_masks(bidirectional_mask_function, vmap_only), 300, None)
