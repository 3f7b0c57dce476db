"""The support matrix: every decoder family people build embedders from, patched, on a tiny random config.

For each family of ``conftest.MATRIX_FAMILIES`` (2 layers, hidden 64, fp32, CPU) one test per check:

* ``reference``: the patched model equals the model's own bidirectional reference -- the same weights under eager
  attention with ``config.is_causal = False`` (transformers then builds its bidirectional masks, sliding windows
  included, and eager applies the family's soft-cap), or, for Gemma-3 in its own bidirectional mode
  (``use_bidirectional_attention=True``), that mode itself;
* ``padding``: left and right padding, and a sequence alone or among others, give the same outputs;
* ``packed``: sequences packed into one row (restarting ``position_ids``) equal the padded batch;
* ``mntp`` / ``contrastive``: one step through ``masked_next_token_loss`` / ``info_nce_loss`` on the patched
  model's hidden states, finite gradients reaching the weights;
* ``unpatch``: the unpatched model gives exactly the causal outputs of before, in exactly the state of before.

A family whose attention the kernel cannot express must be refused with a clear llm2vec_fast error, never run
differently: such a cell passes only if the refusal happens and names the reason :data:`EXPECTED_REFUSALS` gives.
Every outcome is recorded, and ``test_models_doc_is_current`` (after the cells) renders docs/models.md from the
outcomes and fails when the committed table differs; ``LLM2VEC_FAST_WRITE_MODELS_DOC=1`` rewrites it instead, and
``LLM2VEC_FAST_MATRIX_JSON=path`` also writes the outcomes as JSON (``tests/helpers/model_table.py`` renders such a
file). Most cells run the PyTorch path of the kernel; :data:`TRITON_CELLS` run the Triton kernel in the interpreter.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from conftest import MATRIX_FAMILIES, REPO_ROOT, matrix_config, matrix_model_type, padded_batch, slow_except
from helpers.model_table import CHECKS, render_models_doc

from llm2vec_fast import is_patched, patch, unpatch
from llm2vec_fast.kernels import info_nce_loss, masked_next_token_loss

ATOL, RTOL = 3e-5, 1e-4  # fp32, two layers: summation-order differences only
LENGTHS = (11, 4, 1, 7)  # longer and shorter than the configs' window of 5, one single token
MODELS_DOC = REPO_ROOT / "docs" / "models.md"

#: family -> a regex its refusal message must match. Only what the kernel truly cannot express belongs here; a
#: refusal of any other family, or with another reason, fails the test.
EXPECTED_REFUSALS: dict[str, str] = {
    "gpt_oss": r"attention sinks",
}

#: (family, check) cells that run the Triton kernel (interpreter here) instead of its PyTorch path.
TRITON_CELLS = {("gemma2", "reference"), ("gemma3_text_bidirectional", "packed")}

_OUTCOMES: dict[str, dict] = {}


# ---------------------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------------------


_MODELS: dict[str, torch.nn.Module] = {}


def _model(family: str):
    """The family's tiny ``...ForCausalLM`` (eager attention, eval mode), built once per session; callers that change
    it must put it back (patch is undone by every check)."""
    if family not in _MODELS:
        from transformers import AutoModelForCausalLM

        try:
            config = matrix_config(family)
        except (KeyError, ValueError) as error:  # a family newer than this transformers release
            pytest.skip(f"transformers {_transformers_version()} has no {matrix_model_type(family)}: {error}")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        _MODELS[family] = model.eval()
    return _MODELS[family]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _sequences(vocab=123, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in LENGTHS]


def _hidden(model, **inputs):
    return model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]


def _rows(hidden, attention_mask):
    """The real (unpadded) rows of each sequence of a padded batch's ``(B, S, D)`` output."""
    return [hidden[row][attention_mask[row].bool()] for row in range(hidden.shape[0])]


def _assert_rows_close(actual, expected, what):
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}, sequence {index}: {m}")


def _bidirectional_reference(model):
    """The outputs of a copy of the (unpatched) model with the same weights in the family's own bidirectional mode,
    under eager attention, on the padded test batch."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    if not getattr(reference.config, "use_bidirectional_attention", False):
        reference.config.is_causal = False  # transformers' rule for bidirectional decoders, windows included
    input_ids, attention_mask = padded_batch(_sequences())
    with torch.no_grad():
        return _hidden(reference, input_ids=input_ids, attention_mask=attention_mask)


def _mean_pool(hidden, attention_mask):
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1)


def _assert_gradients_finite(model, what):
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), f"{what}: no gradient reached the weights"
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), f"{what}: non-finite gradient in {name}"


# ---------------------------------------------------------------------------------------------------------------------
# The checks (each runs on a patched model and unpatches it)
# ---------------------------------------------------------------------------------------------------------------------


def _check_reference(model, family, expected):
    input_ids, attention_mask = padded_batch(_sequences())
    with torch.no_grad():
        actual = _hidden(model, input_ids=input_ids, attention_mask=attention_mask)
    _assert_rows_close(_rows(actual, attention_mask), _rows(expected, attention_mask), f"{family} vs its reference")
    # Bidirectional for real: the first token's output changes when only the last token changes.
    changed = input_ids.clone()
    changed[0, LENGTHS[0] - 1] = 3 + (int(changed[0, LENGTHS[0] - 1]) - 2) % 120
    with torch.no_grad():
        after = _hidden(model, input_ids=changed, attention_mask=attention_mask)
    assert not torch.allclose(after[0, 0], actual[0, 0]), f"{family}: the first token does not see the last one"


def _check_padding(model, family, expected=None):
    sequences = _sequences()
    with torch.no_grad():
        right_ids, right_mask = padded_batch(sequences, "right")
        left_ids, left_mask = padded_batch(sequences, "left")
        right = _rows(_hidden(model, input_ids=right_ids, attention_mask=right_mask), right_mask)
        left = _rows(_hidden(model, input_ids=left_ids, attention_mask=left_mask), left_mask)
        alone = [_hidden(model, input_ids=s[None])[0] for s in sequences]
        reordered_ids, reordered_mask = padded_batch(sequences[::-1], "right")
        reordered = _rows(_hidden(model, input_ids=reordered_ids, attention_mask=reordered_mask), reordered_mask)[::-1]
    _assert_rows_close(left, right, f"{family}: left vs right padding")
    _assert_rows_close(alone, right, f"{family}: alone vs in a padded batch")
    _assert_rows_close(reordered, right, f"{family}: batch order")


def _check_packed(model, family, expected=None):
    sequences = _sequences()
    input_ids, attention_mask = padded_batch(sequences)
    packed_ids = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    with torch.no_grad():
        padded = _rows(_hidden(model, input_ids=input_ids, attention_mask=attention_mask), attention_mask)
        packed = _hidden(model, input_ids=packed_ids, position_ids=position_ids)[0].split(list(LENGTHS))
    _assert_rows_close(packed, padded, f"{family}: packed vs padded")


def _check_mntp(model, family, expected=None):
    input_ids, attention_mask = padded_batch(_sequences())
    labels = torch.full_like(input_ids, -100)
    labels[:, 1::2] = input_ids[:, 1::2]
    labels[attention_mask == 0] = -100
    model.zero_grad(set_to_none=True)
    hidden = _hidden(model, input_ids=input_ids, attention_mask=attention_mask)
    head = model.get_output_embeddings()
    loss = masked_next_token_loss(
        hidden, head.weight, labels, bias=head.bias,
        logit_softcap=getattr(model.config, "final_logit_softcapping", None), impl="torch",
    )
    assert torch.isfinite(loss), f"{family}: MNTP loss {loss}"
    loss.backward()
    _assert_gradients_finite(model, f"{family} MNTP step")


def _check_contrastive(model, family, expected=None):
    sequences = _sequences()
    queries_ids, queries_mask = padded_batch(sequences)
    positives_ids, positives_mask = padded_batch(_sequences(seed=2))
    model.zero_grad(set_to_none=True)
    queries = _mean_pool(_hidden(model, input_ids=queries_ids, attention_mask=queries_mask), queries_mask)
    positives = _mean_pool(_hidden(model, input_ids=positives_ids, attention_mask=positives_mask), positives_mask)
    loss = info_nce_loss(queries, positives, impl="torch")
    assert torch.isfinite(loss), f"{family}: InfoNCE loss {loss}"
    loss.backward()
    _assert_gradients_finite(model, f"{family} contrastive step")


CHECK_FUNCTIONS = {
    "reference": _check_reference,
    "padding": _check_padding,
    "packed": _check_packed,
    "mntp": _check_mntp,
    "contrastive": _check_contrastive,
}
assert tuple(CHECK_FUNCTIONS) + ("unpatch",) == CHECKS


def _state(model):
    """Everything patch may change, for an exact before/after comparison."""
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "is_causal")]
    return {
        "attn": [c._attn_implementation for c in configs],
        "is_causal": [getattr(c, "is_causal", "<absent>") for c in configs],
        "use_cache": [getattr(c, "use_cache", "<absent>") for c in configs],
        "modules": [(m.is_causal, getattr(m, "attention_dropout", None)) for m in model.modules() if hasattr(m, "is_causal")],
        "patched": is_patched(model),
    }


def _record(family, check, outcome):
    _OUTCOMES.setdefault(family, {})[check] = outcome


def _refusal(error: Exception) -> str | None:
    """The first sentence of an llm2vec_fast refusal, or None for any other error (which is a failure)."""
    message = str(error)
    if not isinstance(error, (NotImplementedError, ValueError)) or not message.startswith("llm2vec_fast"):
        return None
    return message.split(": ", 1)[-1].split(". ")[0]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("family", slow_except(MATRIX_FAMILIES, "gemma2", "gemma3_text_bidirectional"))
def test_family(family, check):
    model = _model(family)
    impl = "auto" if (family, check) in TRITON_CELLS else "torch"
    with torch.no_grad():
        input_ids, attention_mask = padded_batch(_sequences())
        causal_before = _hidden(model, input_ids=input_ids, attention_mask=attention_mask)
    state_before = _state(model)
    expected = _bidirectional_reference(model) if check == "reference" else None
    try:
        patch(model, attention_impl=impl)
        if check != "unpatch":
            CHECK_FUNCTIONS[check](model, family, expected)
    except (NotImplementedError, ValueError) as error:
        reason, pattern = _refusal(error), EXPECTED_REFUSALS.get(family)
        if reason is None or pattern is None or not re.search(pattern, str(error)):
            raise
        _record(family, check, f"refused: {reason}")
    else:
        _record(family, check, "ok")
    finally:
        if is_patched(model):
            unpatch(model)
        model.zero_grad(set_to_none=True)
    assert _state(model) == state_before, f"{family}: unpatch did not restore the model's state"
    with torch.no_grad():
        causal_after = _hidden(model, input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(causal_after, causal_before), f"{family}: unpatch did not restore the causal outputs exactly"


def _family_facts(family: str) -> dict:
    config = _model(family).config
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    windowed = bool(window) and (layer_types is None or "sliding_attention" in layer_types)
    if family == "qwen2" or family == "qwen3":
        windowed = windowed and getattr(config, "use_sliding_window", False)
    if not windowed:
        rule = "full"
    elif getattr(config, "use_bidirectional_attention", False):
        rule = f"sliding layers: |i - j| < {window} (Gemma-3's own bidirectional overlay)"
    else:
        rule = f"sliding layers: |i - j| <= {window} (create_bidirectional_sliding_window_mask)"
    return {
        "model_type": config.model_type,
        "model_class": type(_model(family)).__name__,
        "window_rule": rule,
        "attn_logit_softcapping": getattr(config, "attn_logit_softcapping", None),
    }


def test_models_doc_is_current():
    """docs/models.md is the table these outcomes render to (runs after every cell: pytest keeps the file's order)."""
    missing = [(f, c) for f in MATRIX_FAMILIES for c in CHECKS if c not in _OUTCOMES.get(f, {})]
    if missing:
        pytest.skip(f"the matrix did not run entirely in this session ({len(missing)} cells missing, e.g. "
                    f"{missing[0]}): the table is rendered from a full run only")
    results = {
        "transformers": _transformers_version(),
        "torch": torch.__version__.split("+")[0],
        "families": {f: {**_family_facts(f), "checks": _OUTCOMES[f]} for f in MATRIX_FAMILIES},
    }
    if os.environ.get("LLM2VEC_FAST_MATRIX_JSON"):
        with open(os.environ["LLM2VEC_FAST_MATRIX_JSON"], "w", encoding="utf-8") as file:
            json.dump(results, file, indent=1)
    rendered = render_models_doc(results)
    if os.environ.get("LLM2VEC_FAST_WRITE_MODELS_DOC") == "1":
        MODELS_DOC.write_text(rendered, encoding="utf-8")
    committed = MODELS_DOC.read_text(encoding="utf-8") if MODELS_DOC.exists() else ""
    recorded = re.search(r"transformers (\S+)\*\*", committed)
    if recorded and recorded.group(1) != results["transformers"]:
        pytest.skip(f"docs/models.md was generated on transformers {recorded.group(1)}, this is "
                    f"{results['transformers']}: the table is compared on that release only (the matrix itself ran)")
    assert rendered == committed, (
        "docs/models.md is out of date with the support matrix; regenerate it with "
        "LLM2VEC_FAST_WRITE_MODELS_DOC=1 python -m pytest tests/test_model_matrix.py"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Causal embedders (enable_bidirectional=False): our kernel in causal mode, packed or padded, last-token pooling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_causal_embedder(smollm2_path, tmp_path_factory):
    """A 2-layer random Qwen3 (the family of Qwen3-Embedding) with SmolLM2's tokenizer, saved as a HF directory."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = matrix_config("qwen3", vocab_size=len(tokenizer), pad_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_causal_embedder")
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# Qwen3-Embedding's query format: the instruction is the prompt, "Instruct: <task>\nQuery:", the text follows it.
TASK = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
CAUSAL_INPUTS = [[TASK, "What is rotary position embedding?"], "Rotary embeddings rotate queries and keys.",
                 [TASK, "capital of France"], "Paris is the capital and largest city of France, on the Seine."]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_causal_embedder_matches_plain_transformers_last_token(tiny_causal_embedder, packed, impl):
    from transformers import AutoModel, AutoTokenizer

    from llm2vec_fast import LLM2Vec

    encoder = LLM2Vec.from_pretrained(tiny_causal_embedder, enable_bidirectional=False, pooling_mode="last_token",
                                      attention_impl=impl)
    # Patched (our kernel) but still causal: transformers builds causal masks, the kernel runs with causal=True.
    assert is_patched(encoder.model) and getattr(encoder.model.config, "is_causal", True) is not False
    ours = encoder.encode(CAUSAL_INPUTS, batch_size=4, packed=packed, convert_to_tensor=True)

    plain = AutoModel.from_pretrained(tiny_causal_embedder, dtype=torch.float32).eval()
    assert plain.config._attn_implementation != encoder.model.config._attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_embedder)
    expected = []
    for item in CAUSAL_INPUTS:
        text = f"{item[0].strip()} {item[1]}" if isinstance(item, list) else item  # llm2vec's join
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            expected.append(plain(input_ids=ids).last_hidden_state[0, -1])
    cosine = torch.nn.functional.cosine_similarity(ours, torch.stack(expected), dim=-1)
    assert bool((cosine >= 0.99999).all()), f"cosine to transformers' causal last-token embeddings: {cosine.tolist()}"


def test_causal_patch_refuses_a_bidirectional_request_and_stays_causal():
    model = _model("mistral")
    ids, mask = padded_batch(_sequences())
    with torch.no_grad():
        causal = _hidden(model, input_ids=ids, attention_mask=mask)
    patch(model, bidirectional=False, attention_impl="torch")
    try:
        with torch.no_grad():
            ours = _hidden(model, input_ids=ids, attention_mask=mask)
            packed_ids = torch.cat(_sequences())[None]
            positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
            packed = _hidden(model, input_ids=packed_ids, position_ids=positions)[0].split(list(LENGTHS))
        # Mistral's causal window (j > i - 5) is applied by the kernel, padded and packed.
        _assert_rows_close(_rows(ours, mask), _rows(causal, mask), "causal patch vs the causal model")
        _assert_rows_close(packed, _rows(causal, mask), "packed causal patch vs the causal model")
        with pytest.raises(ValueError, match="bidirectional attention was requested"):
            model.model.layers[0].self_attn.config.is_causal = False
            try:
                _hidden(model, input_ids=ids)
            finally:
                del model.model.layers[0].self_attn.config.is_causal
    finally:
        unpatch(model)
