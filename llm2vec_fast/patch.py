"""How a Hugging Face decoder becomes bidirectional and runs our attention kernel.

``patch(model)`` works through transformers' own registries (no class reassignment, no copied forward
methods): it registers our attention function with ``AttentionInterface`` and a padding-mask builder under
the same name with ``AttentionMaskInterface``, sets ``config.is_causal = False`` (so that transformers builds a
padding-only mask and passes ``is_causal=False`` to every attention call) and selects the function with
``model.set_attn_implementation``. ``unpatch(model)`` puts back exactly what ``patch`` changed.

Data flow inside a patched model, per forward:

* the model calls ``create_causal_mask``; because ``config.is_causal`` is False transformers turns that into
  ``create_bidirectional_mask``, which calls our mask builder once: it returns the ``(batch, seq)`` bool key
  padding mask (True = real token), or None when nothing is padded;
* every attention layer calls ``_bidirectional_attention_forward`` with that mask, which hands q/k/v to
  ``llm2vec_fast.kernels.bidirectional_attention``: padded batches as ``(batch, seq, heads, head_dim)`` with
  ``key_padding_mask``, packed batches (no padding at all) as ``(total, heads, head_dim)`` with ``cu_seqlens``.

Packed input (what the encoder sends) -- a batch of sequences concatenated without padding, in either form:

* ``model(input_ids=(1, total), position_ids=(1, total))`` with ``position_ids`` restarting at 0 for every
  sequence (``[0, 1, 2, 0, 1, 0, 1, 2, 3]``), and no ``attention_mask`` (or an all-ones one); or
* transformers' FlashAttention keyword arguments passed to ``forward``: ``cu_seq_lens_q`` and ``cu_seq_lens_k``
  (int32, ``(num_seqs + 1,)``, starting at 0 and ending at ``total``; the same for q and k),
  ``max_length_q`` and ``max_length_k`` (ints), together with per-sequence ``position_ids`` for the rotary
  embedding.

Every sequence then attends only within itself. Position ids are read as transformers reads them
(``find_packed_sequence_indices``): a new sequence starts wherever a position is not the previous one plus 1;
with a batch of several rows each row also starts a sequence.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn as nn

from .kernels._dispatch import IMPLEMENTATIONS
from .kernels.attention import bidirectional_attention

logger = logging.getLogger(__name__)

__all__ = ["patch", "unpatch", "is_patched", "ATTENTION_NAMES"]

# One registered name per kernel implementation, so that the choice lives in the model's config rather than in
# global state: two models patched with different implementations do not interfere.
ATTENTION_NAMES = {
    "auto": "llm2vec_fast",
    "triton": "llm2vec_fast_triton",
    "torch": "llm2vec_fast_torch",
}
_IMPL_BY_NAME = {name: impl for impl, name in ATTENTION_NAMES.items()}

_STATE_ATTRIBUTE = "_llm2vec_fast_patch_state"

# Keyword arguments some architectures pass to the attention function that change its mathematics and that our
# kernel does not implement: refusing them beats returning a silently different model.
_UNSUPPORTED_ATTENTION_KWARGS = {
    "softcap": "attention logit soft-capping (Gemma-2 style attn_logit_softcapping)",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
}

_MISSING = object()


# ---------------------------------------------------------------------------------------------------------------------
# The mask builder (AttentionMaskInterface)
# ---------------------------------------------------------------------------------------------------------------------


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask builder registered with ``AttentionMaskInterface``: the key padding mask, no 4D tensor.

    Returns the ``(batch, seq)`` bool mask (True = real token) when some token is padded, else None.
    Called once per forward by ``create_bidirectional_mask`` (and ``create_bidirectional_sliding_window_mask``).
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is causal_mask_function or getattr(mask_function, "__name__", "") == "causal_mask_function":
        raise ValueError(
            "llm2vec_fast: a causal mask was requested from a model patched to be bidirectional (was `is_causal=True` "
            "passed to forward?). Call llm2vec_fast.unpatch(model) to get the causal model back."
        )
    sliding_window = kwargs.get("local_size")
    if mask_function is not bidirectional_mask_function and sliding_window is None:
        raise NotImplementedError(
            "llm2vec_fast: this model combines the attention mask with a custom mask function "
            "(or_mask_function/and_mask_function, e.g. for image tokens); the llm2vec_fast attention only applies "
            "a padding mask. Unpatch the model or use an implementation that supports it."
        )
    if (isinstance(q_offset, int) and q_offset != 0) or kv_length != q_length:
        raise ValueError(
            "llm2vec_fast: a patched (bidirectional) model cannot use a key/value cache: it recomputes every token "
            f"from all others, so it cannot decode incrementally (query length {q_length}, key length {kv_length}). "
            "Call with use_cache=False and no cache, or unpatch the model to generate."
        )
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2 or attention_mask.shape != (batch_size, kv_length):
        raise ValueError(
            f"llm2vec_fast: expected a 2D attention mask of shape (batch, seq) = {(batch_size, kv_length)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    attention_mask = attention_mask.to(torch.bool)
    if bool(attention_mask.all()):  # one host sync per forward, not per layer
        return None
    return attention_mask


# ---------------------------------------------------------------------------------------------------------------------
# Packed sequences
# ---------------------------------------------------------------------------------------------------------------------


class _PackedCache:
    """Remembers the varlen metadata of the last position_ids / cu_seqlens tensor seen.

    Every layer of one forward receives the same tensor object: computing cu_seqlens once per forward instead of once
    per layer saves a host sync per layer. Held by weak reference, so nothing is kept alive.
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None  # (weakref, key, value), replaced as one object: safe across threads

    def get(self, tensor: torch.Tensor, extra: tuple, compute):
        if tensor.is_inference():
            # Inference tensors keep no version counter, so an in-place change could not be seen: recompute.
            return compute()
        key = (tensor._version, tensor.shape, tensor.device, extra)
        entry = self._entry
        if entry is not None and entry[0]() is tensor and entry[1] == key:
            return entry[2]
        value = compute()
        self._entry = (weakref.ref(tensor), key, value)
        return value


_position_cache = _PackedCache()
_cu_seqlens_cache = _PackedCache()


def _cu_seqlens_from_position_ids(position_ids: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, int] | None:
    """``(cu_seqlens int32, max_seqlen)`` over the flattened ``batch * seq`` tokens, or None if nothing is packed."""

    def compute():
        positions = position_ids
        if positions.ndim == 1:
            positions = positions.unsqueeze(0)
        if positions.ndim != 2 or positions.shape[-1] != seq or positions.shape[0] not in (1, batch):
            raise ValueError(
                f"llm2vec_fast: position_ids of shape {tuple(position_ids.shape)} do not match the input "
                f"(batch {batch}, seq {seq})"
            )
        positions = positions.expand(batch, seq)
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        if int(starts.sum()) == batch:  # one sequence per row: a plain (unpacked) batch
            return None
        boundaries = starts.reshape(-1).nonzero().reshape(-1)
        total = torch.tensor([batch * seq], device=boundaries.device, dtype=boundaries.dtype)
        cu_seqlens = torch.cat([boundaries, total]).to(torch.int32)
        max_seqlen = int(cu_seqlens.diff().max())
        return cu_seqlens, max_seqlen

    return _position_cache.get(position_ids, (batch, seq), compute)


def _checked_cu_seqlens(kwargs: dict, batch: int, seq: int) -> tuple[torch.Tensor, int]:
    """Validated ``(cu_seqlens int32, max_seqlen)`` from transformers' FlashAttention kwargs (cached per forward)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if batch != 1:
        raise ValueError(
            f"llm2vec_fast: with cu_seq_lens_q the sequences must be packed into one row, input_ids (1, total); "
            f"got batch {batch}"
        )
    cu_q = cu_q if cu_q is not None else cu_k

    def compute():
        if cu_q.ndim != 1 or cu_q.numel() < 2:
            raise ValueError(f"llm2vec_fast: cu_seq_lens_q must be 1D (num_seqs + 1,), got {tuple(cu_q.shape)}")
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k.to(cu_q.device, cu_q.dtype), cu_q):
            raise ValueError("llm2vec_fast: cu_seq_lens_k must equal cu_seq_lens_q (self-attention over packed input)")
        cu = cu_q.to(torch.int32)
        lengths = cu.diff()
        if int(cu[0]) != 0 or int(cu[-1]) != seq or bool((lengths < 0).any()):
            raise ValueError(
                f"llm2vec_fast: cu_seq_lens_q must rise from 0 to the packed length {seq}, got {cu.tolist()}"
            )
        longest = int(lengths.max())
        for name, given in (("max_length_q", max_q), ("max_length_k", max_k)):
            if given is not None and int(given) < longest:
                raise ValueError(
                    f"llm2vec_fast: {name}={int(given)} is shorter than the longest packed sequence {longest}"
                )
        # The kernel gets the exact longest length (a larger max_length would only launch idle programs).
        return cu, longest

    return _cu_seqlens_cache.get(cu_q, (seq, id(cu_k)), compute)


# ---------------------------------------------------------------------------------------------------------------------
# The attention function (AttentionInterface)
# ---------------------------------------------------------------------------------------------------------------------


def _requested_causal(module: nn.Module, is_causal: bool | None) -> bool:
    # The keyword wins (transformers passes the config's is_causal through it); module.is_causal stays True on
    # decoders, so it is only the last resort.
    if is_causal is not None:
        return bool(is_causal)
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "is_causal", None) is not None:
        return bool(config.is_causal)
    return bool(getattr(module, "is_causal", False))


_warned_output_attentions = False


def _warn_output_attentions() -> None:
    global _warned_output_attentions
    _warned_output_attentions = True
    logger.warning("llm2vec_fast attention does not return attention weights: output_attentions=True gives None")


def _check_sliding_window(sliding_window: int | None, longest: int) -> None:
    # transformers' bidirectional sliding window lets tokens at distance <= sliding_window see each other: it is
    # inactive (full attention, what our kernel computes) when the longest sequence fits in sliding_window + 1.
    if sliding_window is not None and longest - 1 > sliding_window:
        raise ValueError(
            f"llm2vec_fast: this layer uses a sliding attention window of {sliding_window} tokens but the input is "
            f"{longest} tokens long; the llm2vec_fast attention computes full attention only. Use inputs of at most "
            f"{sliding_window + 1} tokens or unpatch the model."
        )


def _bidirectional_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    impl: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention signature: query ``(B, H, S, D)``, key/value ``(B, Hkv, S, D)`` -> ``(B, S, H, D)``."""
    if _requested_causal(module, is_causal):
        raise ValueError(
            "llm2vec_fast: causal attention was requested from a model patched to be bidirectional (is_causal=True). "
            "Call llm2vec_fast.unpatch(model) for the causal model."
        )
    for name, what in _UNSUPPORTED_ATTENTION_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"llm2vec_fast: our attention kernel does not implement {what} ({name}=...)")
    if kwargs.get("use_cache"):
        raise ValueError(
            "llm2vec_fast: use_cache=True on a patched (bidirectional) model: it cannot decode incrementally, so a "
            "key/value cache is meaningless. Pass use_cache=False, or unpatch the model to generate."
        )
    batch, heads, seq, head_dim = query.shape
    if key.shape[2] != seq:
        raise ValueError(
            f"llm2vec_fast: key length {key.shape[2]} differs from query length {seq}: a patched (bidirectional) "
            "model cannot use a key/value cache. Pass use_cache=False, or unpatch the model to generate."
        )
    if kwargs.get("output_attentions") and not _warned_output_attentions:
        _warn_output_attentions()

    sliding_window = kwargs.get("sliding_window")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views, no copy

    if attention_mask is not None and attention_mask.ndim == 4:
        # A prepared 4D mask given by the caller reaches us untouched (transformers passes 4D masks through): honour
        # it exactly with PyTorch SDPA rather than dropping it.
        logger.debug("llm2vec_fast: 4D attention mask given; using PyTorch SDPA with that mask for this call")
        _check_sliding_window(sliding_window, seq)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            enable_gqa=key.shape[1] != heads,
        )
        return out.transpose(1, 2), None

    packed = None
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        if attention_mask is not None:
            raise ValueError(
                "llm2vec_fast: packed input (cu_seq_lens_q) must not be padded; got an attention mask with padding too"
            )
        packed = _checked_cu_seqlens(kwargs, batch, seq)
    elif attention_mask is None and kwargs.get("position_ids") is not None:
        packed = _cu_seqlens_from_position_ids(kwargs["position_ids"], batch, seq)

    if packed is not None:
        cu_seqlens, max_seqlen = packed
        _check_sliding_window(sliding_window, max_seqlen)
        out = bidirectional_attention(
            q.reshape(batch * seq, heads, head_dim),
            k.reshape(batch * seq, k.shape[2], head_dim),
            v.reshape(batch * seq, v.shape[2], v.shape[3]),
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            softmax_scale=scaling,
            dropout_p=dropout,
            impl=impl,
        )
        return out.reshape(batch, seq, heads, -1), None

    if attention_mask is not None:
        if attention_mask.shape != (batch, seq):
            raise ValueError(
                f"llm2vec_fast: the key padding mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq)}"
            )
        attention_mask = attention_mask.to(torch.bool)
    _check_sliding_window(sliding_window, seq)
    out = bidirectional_attention(
        q, k, v, key_padding_mask=attention_mask, softmax_scale=scaling, dropout_p=dropout, impl=impl
    )
    return out, None


def _make_attention_function(impl: str):
    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        return _bidirectional_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, impl=impl, **kw
        )

    attention_forward.__name__ = f"llm2vec_fast_attention_{impl}"
    attention_forward.__doc__ = _bidirectional_attention_forward.__doc__
    return attention_forward


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for impl, name in ATTENTION_NAMES.items():
        AttentionInterface.register(name, _make_attention_function(impl))
        AttentionMaskInterface.register(name, _padding_mask)
    _registered = True


# ---------------------------------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------------------------------


def _base_model(model: nn.Module):
    """The outermost transformers ``PreTrainedModel`` in ``model`` (itself, or the one inside a PEFT wrapper)."""
    from transformers import PreTrainedModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"llm2vec_fast.patch expects a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(
        f"llm2vec_fast.patch: no transformers PreTrainedModel found inside {type(model).__name__}; "
        "patch works on Hugging Face models (bare, ...ForCausalLM, or PEFT-wrapped)"
    )


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


def _check_can_patch(base) -> None:
    name = type(base).__name__
    configs = _all_configs(base)
    if any(getattr(c, "is_encoder_decoder", False) for c in configs):
        raise ValueError(
            f"llm2vec_fast.patch: {name} is an encoder-decoder model; patch makes decoder-only LLMs bidirectional"
        )
    if not base._can_set_attn_implementation():
        raise ValueError(
            f"llm2vec_fast.patch: {name} does not call attention through transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS), so its attention cannot be replaced"
        )
    modules = _attention_modules(base)
    if not modules:
        raise ValueError(f"llm2vec_fast.patch: no self-attention modules with an is_causal flag found in {name}")
    if not any(bool(m.is_causal) for m in modules):
        raise ValueError(
            f"llm2vec_fast.patch: {name} has no causal attention (an encoder-only model?): it is bidirectional already"
        )
    for config in configs:
        softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None:
            raise NotImplementedError(
                f"llm2vec_fast.patch: {name} soft-caps its attention logits (attn_logit_softcapping={softcap}), which "
                "the llm2vec_fast kernel does not implement. Set config.attn_logit_softcapping = None before patching "
                "if you accept that change to the model."
            )
    windows = {getattr(c, "sliding_window", None) for c in configs} - {None}
    if windows:
        logger.info(
            "llm2vec_fast.patch: %s has sliding attention windows %s: inputs longer than window + 1 tokens raise at "
            "call time (the kernel computes full attention only)", name, sorted(windows)
        )


def _set_attribute(record: list, obj: Any, attribute: str, value: Any) -> None:
    record.append((obj, attribute, getattr(obj, attribute, _MISSING)))
    setattr(obj, attribute, value)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the PreTrainedModel inside it) is currently patched by llm2vec_fast."""
    return getattr(_base_model(model), _STATE_ATTRIBUTE, None) is not None


def patch(model: nn.Module, *, attention_impl: str = "auto", attention_dropout: float | None = None) -> nn.Module:
    """Make a Hugging Face decoder bidirectional, running ``llm2vec_fast.kernels.bidirectional_attention``.

    Args:
        model: a transformers ``PreTrainedModel`` (``LlamaModel``, ``...ForCausalLM``...) or a module wrapping one
            (a PEFT ``PeftModel``); the outermost PreTrainedModel inside it is patched, with all its sub-models.
        attention_impl: the kernel's ``impl``: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, PyTorch
            SDPA elsewhere), ``"triton"`` or ``"torch"``.
        attention_dropout: if given, the attention dropout probability the model's attention modules use in training
            (llm2vec's SimCSE stage uses 0.3); None keeps the model's own value.

    Returns:
        ``model``, patched in place. Patching again replaces the earlier patch (same result as patching once);
        ``unpatch(model)`` restores exactly the state before the first patch.

    Changes made (all undone by ``unpatch``): ``config.is_causal = False`` and ``config.use_cache = False`` on every
    (sub-)config, the attention implementation (``model.set_attn_implementation``), and with ``attention_dropout``
    the ``attention_dropout`` of the configs and of every attention module.

    Packed input: the patched model accepts sequences packed into one row with no padding, either as
    ``position_ids`` of shape ``(1, total)`` restarting at 0 for each sequence (no attention mask, or an all-ones
    one), or with transformers' FlashAttention kwargs ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32, ``(n + 1,)``)
    and ``max_length_q``/``max_length_k`` passed to ``forward``. Each sequence attends only within itself.

    Errors: encoder-decoder or encoder-only models, models whose attention does not go through transformers'
    ``AttentionInterface``, attention logit soft-capping (Gemma-2) raise here. At call time: a key/value cache or
    ``use_cache=True`` (a bidirectional model cannot decode incrementally), ``is_causal=True``, an input longer
    than an active sliding window + 1, custom mask functions.
    """
    if attention_impl not in IMPLEMENTATIONS:
        raise ValueError(f"llm2vec_fast.patch: attention_impl must be one of {IMPLEMENTATIONS}, got {attention_impl!r}")
    if attention_dropout is not None:
        if isinstance(attention_dropout, bool) or not isinstance(attention_dropout, (int, float)):
            raise TypeError(f"llm2vec_fast.patch: attention_dropout must be a float, got {attention_dropout!r}")
        if not 0.0 <= float(attention_dropout) < 1.0:
            raise ValueError(f"llm2vec_fast.patch: attention_dropout must be in [0, 1), got {attention_dropout}")

    base = _base_model(model)
    if getattr(base, _STATE_ATTRIBUTE, None) is not None:
        unpatch(model)  # re-patching == patching once with the new arguments
    _check_can_patch(base)
    _register()

    from transformers import PreTrainedModel

    record: list = []
    implementations = [
        (m.config, m.config._attn_implementation_internal) for m in base.modules() if isinstance(m, PreTrainedModel)
    ]
    name = ATTENTION_NAMES[attention_impl]
    base.set_attn_implementation(name)
    unset = [
        type(m).__name__
        for m in base.modules()
        if isinstance(m, PreTrainedModel) and m.config._attn_implementation != name
    ]
    if unset:
        _restore_implementations(base, implementations)
        raise ValueError(f"llm2vec_fast.patch: could not set the attention implementation of {sorted(set(unset))}")

    for config in _all_configs(base):
        _set_attribute(record, config, "is_causal", False)
        if hasattr(config, "use_cache"):
            _set_attribute(record, config, "use_cache", False)
        if attention_dropout is not None and hasattr(config, "attention_dropout"):
            _set_attribute(record, config, "attention_dropout", float(attention_dropout))
    if attention_dropout is not None:
        for module in _attention_modules(base):
            if hasattr(module, "attention_dropout"):
                _set_attribute(record, module, "attention_dropout", float(attention_dropout))

    setattr(base, _STATE_ATTRIBUTE, {"record": record, "implementations": implementations, "impl": attention_impl})
    logger.info("llm2vec_fast: patched %s to bidirectional attention (%s)", type(base).__name__, name)
    return model


def _restore_implementations(base, implementations: list) -> None:
    base.set_attn_implementation(implementations[0][1])
    for config, value in implementations:  # sub-models that had their own implementation
        if config._attn_implementation_internal != value:
            config._attn_implementation_internal = value


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the attention implementation, ``is_causal``, ``use_cache`` and attention dropout as they were.

    Raises ValueError if ``model`` is not patched. Returns ``model``.
    """
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
