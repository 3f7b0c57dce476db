"""Every private transformers name llm2vec-fast relies on, in one place.

transformers 5.x has no public way to read a config's own attention implementation (before the defaults are
resolved), to write it on one sub-model, or to ask whether a model routes attention through
``ALL_ATTENTION_FUNCTIONS``. When a transformers release renames one of these, this file is the one to change.
"""

from __future__ import annotations

from typing import Any, Callable

# The keyword argument transformers' sliding-window mask functions hand to a registered mask builder.
MASK_SLIDING_WINDOW_KWARG = "local_size"


def own_attn_implementation(config) -> str | None:
    """The implementation set on this config itself (None = transformers' default), not the resolved one."""
    return config._attn_implementation_internal


def set_own_attn_implementation(config, value: str | None) -> None:
    config._attn_implementation_internal = value


def attn_implementation(config) -> str:
    """The implementation transformers will use for this config."""
    return config._attn_implementation


def routes_attention_through_interface(model) -> bool:
    """Whether ``model`` calls attention through ``ALL_ATTENTION_FUNCTIONS`` (so that it can be replaced)."""
    return bool(model._can_set_attn_implementation())


def forget_loaded_adapter(model) -> None:
    """After ``merge_and_unload``: stop transformers from saving the model as an adapter."""
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


def is_causal_mask_function(mask_function: Callable | None) -> bool:
    from transformers.masking_utils import causal_mask_function

    return mask_function is causal_mask_function or getattr(mask_function, "__name__", "") == "causal_mask_function"


def is_bidirectional_mask_function(mask_function: Callable | None) -> bool:
    from transformers.masking_utils import bidirectional_mask_function

    return mask_function is bidirectional_mask_function


def register_attention(name: str, attention_function: Callable[..., Any], mask_builder: Callable[..., Any]) -> None:
    """Register an attention function and, under the same name, its mask builder (without one transformers
    passes no mask at all to a custom attention function, and padding is silently ignored)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, mask_builder)


# Model types whose own bidirectional mode (``config.use_bidirectional_attention = True``) gives sliding layers an
# exclusive window, |i - j| < sliding_window (Gemma-3's ``_bidirectional_window_overlay``), rather than the
# inclusive |i - j| <= sliding_window of ``create_bidirectional_sliding_window_mask``.
_OWN_BIDIRECTIONAL_OVERLAY_MODEL_TYPES = frozenset({"gemma3_text"})


def uses_own_bidirectional_overlay(config) -> bool:
    """Whether ``config`` is a model in its own bidirectional mode with the exclusive sliding-window rule."""
    return (getattr(config, "model_type", None) in _OWN_BIDIRECTIONAL_OVERLAY_MODEL_TYPES
            and getattr(config, "use_bidirectional_attention", False) is True)


def supports_flash_attention_masks(model) -> bool:
    """Whether transformers lets ``model`` run FlashAttention, which (like our causal mode) applies causality and
    the window from the attention call and ignores mask overlays; multimodal models with bidirectional image-token
    masks set ``_supports_flash_attn = False``."""
    return bool(getattr(model, "_supports_flash_attn", True))
