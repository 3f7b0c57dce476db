"""How a Hugging Face decoder becomes bidirectional and runs our attention kernel: ``patch`` and ``unpatch``.

``patch(model)`` works through transformers' own registries (no class reassignment, no copied forward
methods): it registers our attention function and its padding-mask builder
(``llm2vec_fast.attention_adapter``), sets ``config.is_causal = False`` (so that transformers builds a
padding-only mask and passes ``is_causal=False`` to every attention call) and selects the function with
``model.set_attn_implementation``. ``unpatch(model)`` puts back exactly what ``patch`` changed, and
``with unpatched(model):`` does so for the length of a block (saving the plain model, for instance).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch.nn as nn

from . import transformers_compat as compat
from .attention_adapter import ATTENTION_NAMES, CAUSAL_ATTENTION_NAMES, register
from .kernels._dispatch import IMPLEMENTATIONS

logger = logging.getLogger(__name__)

__all__ = ["patch", "unpatch", "unpatched", "is_patched", "patch_settings", "ATTENTION_NAMES"]

_STATE_ATTRIBUTE = "_llm2vec_fast_patch_state"

_MISSING = object()


def _base_model(model: nn.Module):
    """The outermost transformers ``PreTrainedModel`` in ``model`` (itself, or the one inside a PEFT wrapper)."""
    from transformers import PreTrainedModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"llm2vec_fast.patch expects a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"llm2vec_fast.patch: no transformers PreTrainedModel found inside {type(model).__name__}; "
                    "patch works on Hugging Face models (bare, ...ForCausalLM, or PEFT-wrapped)")


def _all_configs(base) -> list:
    """The configs of every sub-model and their nested sub-configs, each once."""
    from transformers import PreTrainedModel

    found: dict[int, Any] = {}
    pending = [m.config for m in base.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            pending.append(getattr(config, key, None))
    return list(found.values())


def _attention_modules(base) -> list[nn.Module]:
    """Self-attention modules in transformers' layout: an ``*Attention*`` class with an ``is_causal`` flag."""
    return [m for m in base.modules() if "Attention" in type(m).__name__ and hasattr(m, "is_causal")]


def _check_can_patch(base, bidirectional: bool) -> None:
    name = type(base).__name__
    configs = _all_configs(base)
    if any(getattr(c, "is_encoder_decoder", False) for c in configs):
        raise ValueError(f"llm2vec_fast.patch: {name} is an encoder-decoder model; patch makes decoder-only LLMs "
                         "bidirectional")
    if not compat.routes_attention_through_interface(base):
        raise ValueError(f"llm2vec_fast.patch: {name} does not call attention through transformers' "
                         "AttentionInterface (ALL_ATTENTION_FUNCTIONS), so its attention cannot be replaced")
    modules = _attention_modules(base)
    if not modules:
        raise ValueError(f"llm2vec_fast.patch: no self-attention modules with an is_causal flag found in {name}")
    # A decoder in its own bidirectional mode (Gemma-3's use_bidirectional_attention, EmbeddingGemma) is patched to
    # get our kernel with its own rule; without such a flag, no causal module means an encoder.
    own_bidirectional_mode = any(getattr(c, "use_bidirectional_attention", False) is True for c in configs)
    if not any(bool(m.is_causal) for m in modules) and (not bidirectional or not own_bidirectional_mode):
        raise ValueError(f"llm2vec_fast.patch: {name} has no causal attention (an encoder-only model?): it is "
                         "bidirectional already")
    if not bidirectional and not all(compat.supports_flash_attention_masks(m) for m in base.modules()
                                     if hasattr(m, "_supports_flash_attn")):
        raise NotImplementedError(f"llm2vec_fast.patch: {name} needs attention masks beyond causality and a sliding "
                                  "window (bidirectional image-token masks; transformers refuses FlashAttention for it "
                                  "too), which the llm2vec_fast causal mode does not apply")
    if any(getattr(m, "sinks", None) is not None for m in modules):
        raise NotImplementedError(f"llm2vec_fast.patch: {name} adds learned attention sinks to the softmax (GPT-OSS "
                                  "`sinks`), which the llm2vec_fast kernel does not implement")
    for config in configs:
        softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                    or not softcap > 0):
            raise ValueError(f"llm2vec_fast.patch: {name} has attn_logit_softcapping={softcap!r}; a soft-cap must be a "
                             "positive number (or None for none)")
        window = getattr(config, "sliding_window", None)
        # 0 is no window to transformers' masks either: they would let a causal token attend to nothing (None is
        # "no window"). A value no layer uses (Qwen2's sliding_window=0 beside use_sliding_window=False, which
        # makes every layer "full_attention") is not checked.
        layer_types = getattr(config, "layer_types", None) or ("sliding_attention",)
        if getattr(config, "use_sliding_window", True) is False or "sliding_attention" not in layer_types:
            window = None
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"llm2vec_fast.patch: {name} has sliding_window={window!r}; a window must be a positive "
                             "number of tokens (or None for none)")


def _set_attribute(record: list, obj: Any, attribute: str, value: Any) -> None:
    record.append((obj, attribute, getattr(obj, attribute, _MISSING)))
    setattr(obj, attribute, value)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the PreTrainedModel inside it) is currently patched by llm2vec_fast."""
    return getattr(_base_model(model), _STATE_ATTRIBUTE, None) is not None


def patch_settings(model: nn.Module) -> dict[str, Any] | None:
    """The keyword arguments ``patch`` was given for ``model`` (``patch(other, **patch_settings(model))`` patches
    another copy alike), or None when ``model`` is not patched."""
    state = getattr(_base_model(model), _STATE_ATTRIBUTE, None)
    if state is None:
        return None
    return {"attention_impl": state["impl"], "attention_dropout": state["attention_dropout"],
            "bidirectional": state["bidirectional"]}


def patch(model: nn.Module, *, attention_impl: str = "auto", attention_dropout: float | None = None,
          bidirectional: bool = True) -> nn.Module:
    """Make a Hugging Face decoder bidirectional, running ``llm2vec_fast.kernels.bidirectional_attention``.

    Args:
        model: a transformers ``PreTrainedModel`` (``LlamaModel``, ``...ForCausalLM``...) or a module wrapping one
            (a PEFT ``PeftModel``); the outermost PreTrainedModel inside it is patched, with all its sub-models.
        attention_impl: the kernel's ``impl``: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, PyTorch
            SDPA elsewhere), ``"triton"`` or ``"torch"``.
        attention_dropout: if given, the attention dropout probability the model's attention modules use in training
            (llm2vec's SimCSE stage uses 0.3); None keeps the model's own value.
        bidirectional: False keeps the model causal (llm2vec's ``enable_bidirectional=False``) and runs it through
            the same kernel in causal mode, with padded or packed batches: causal embedding models with last-token
            pooling (Qwen3-Embedding, e5-mistral, gte-Qwen2) encode padding-free.

    Returns ``model``, patched in place: ``config.is_causal = False`` and ``use_cache = False`` on every
    (sub-)config, our attention implementation, and with ``attention_dropout`` that of the configs and attention
    modules. Patching again equals patching once; ``unpatch(model)`` restores exactly the state before.

    The patched model also takes packed input (one row, no padding): ``position_ids`` ``(1, total)`` restarting
    at 0 per sequence, or transformers' FlashAttention kwargs ``cu_seq_lens_q/k`` and ``max_length_q/k``.
    Soft-capping (Gemma-2) and sliding windows go to the kernel with the rule transformers gives the model
    (``attention_adapter.kernel_window``; docs/models.md lists each family).

    Errors: encoder-decoder or encoder-only models, attention outside transformers' ``AttentionInterface``,
    attention sinks (GPT-OSS), a soft-cap or window that is not positive raise here; a key/value cache, a causal
    request to a bidirectional patch (or the reverse) and masks beyond padding and windows raise at call time."""
    if attention_impl not in IMPLEMENTATIONS:
        raise ValueError(f"llm2vec_fast.patch: attention_impl must be one of {IMPLEMENTATIONS}, got {attention_impl!r}")
    if attention_dropout is not None:
        if isinstance(attention_dropout, bool) or not isinstance(attention_dropout, (int, float)):
            raise TypeError(f"llm2vec_fast.patch: attention_dropout must be a float, got {attention_dropout!r}")
        if not 0.0 <= float(attention_dropout) < 1.0:
            raise ValueError(f"llm2vec_fast.patch: attention_dropout must be in [0, 1), got {attention_dropout}")

    base = _base_model(model)
    if not isinstance(bidirectional, bool):
        raise TypeError(f"llm2vec_fast.patch: bidirectional must be True or False, got {bidirectional!r}")
    if getattr(base, _STATE_ATTRIBUTE, None) is not None:
        unpatch(model)  # re-patching == patching once with the new arguments
    _check_can_patch(base, bidirectional)
    register()

    from transformers import PreTrainedModel

    record: list = []
    models = [m for m in base.modules() if isinstance(m, PreTrainedModel)]
    implementations = [(m.config, compat.own_attn_implementation(m.config)) for m in models]
    name = (ATTENTION_NAMES if bidirectional else CAUSAL_ATTENTION_NAMES)[attention_impl]
    base.set_attn_implementation(name)
    unset = [type(m).__name__ for m in models if compat.attn_implementation(m.config) != name]
    if unset:
        _restore_implementations(base, implementations)
        raise ValueError(f"llm2vec_fast.patch: could not set the attention implementation of {sorted(set(unset))}")

    for config in _all_configs(base):
        if bidirectional:
            _set_attribute(record, config, "is_causal", False)
        if hasattr(config, "use_cache"):
            _set_attribute(record, config, "use_cache", False)
        if attention_dropout is not None and hasattr(config, "attention_dropout"):
            _set_attribute(record, config, "attention_dropout", float(attention_dropout))
    if attention_dropout is not None:
        for module in _attention_modules(base):
            if hasattr(module, "attention_dropout"):
                _set_attribute(record, module, "attention_dropout", float(attention_dropout))

    setattr(base, _STATE_ATTRIBUTE, {"record": record, "implementations": implementations, "impl": attention_impl,
                                     "attention_dropout": attention_dropout, "bidirectional": bidirectional})
    logger.info("llm2vec_fast: patched %s to %s attention (%s)", type(base).__name__,
                "bidirectional" if bidirectional else "causal", name)
    return model


def _restore_implementations(base, implementations: list) -> None:
    base.set_attn_implementation(implementations[0][1])
    for config, value in implementations:  # sub-models that had their own implementation
        if compat.own_attn_implementation(config) != value:
            compat.set_own_attn_implementation(config, value)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the attention implementation, ``is_causal``, ``use_cache`` and attention dropout as they were.

    Raises ValueError if ``model`` is not patched. Returns ``model``."""
    base = _base_model(model)
    state = getattr(base, _STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError(f"llm2vec_fast.unpatch: {type(base).__name__} is not patched")
    for obj, attribute, previous in reversed(state["record"]):
        if previous is _MISSING:
            delattr(obj, attribute)
        else:
            setattr(obj, attribute, previous)
    _restore_implementations(base, state["implementations"])
    delattr(base, _STATE_ATTRIBUTE)
    logger.info("llm2vec_fast: unpatched %s", type(base).__name__)
    return model


@contextlib.contextmanager
def unpatched(model: nn.Module) -> Iterator[str | None]:
    """``with unpatched(model) as impl:`` the model as it was before ``patch`` (causal, its own attention; a copy
    or a pickle of it then carries no patch state), patched again with the same settings afterwards, even on an
    exception. Yields the patch's ``attention_impl``, or None when ``model`` is not patched (left as it is)."""
    settings = patch_settings(model)
    if settings is None:
        yield None
        return
    unpatch(model)
    try:
        yield settings["attention_impl"]
    finally:
        patch(model, **settings)
