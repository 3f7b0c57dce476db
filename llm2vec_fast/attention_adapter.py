"""The transformers side of our attention: what a patched model calls, registered in transformers' registries.

``register()`` puts one attention function per kernel implementation into ``AttentionInterface`` and a
padding-mask builder under the same name into ``AttentionMaskInterface``; ``llm2vec_fast.bidirectional.patch``
then selects one of these names on a model (``ATTENTION_NAMES``). Nothing here changes a model.

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

import functools
import logging
import weakref
from typing import Any

import torch
import torch.nn as nn

from . import transformers_compat as compat
from .batching import max_length_bucket
from .kernels.attention import bidirectional_attention

logger = logging.getLogger(__name__)

__all__ = ["ATTENTION_NAMES", "CAUSAL_ATTENTION_NAMES", "register"]

# One registered name per kernel implementation, so that the choice lives in the model's config rather than in
# global state: two models patched with different implementations do not interfere.
ATTENTION_NAMES = {
    "auto": "llm2vec_fast",
    "triton": "llm2vec_fast_triton",
    "torch": "llm2vec_fast_torch",
}
# The same kernels in causal mode, for causal embedding models kept causal (``patch(model, bidirectional=False)``).
CAUSAL_ATTENTION_NAMES = {impl: f"{name}_causal" for impl, name in ATTENTION_NAMES.items()}

# Keyword arguments some architectures pass to the attention function that change its mathematics and that our
# kernel does not implement: refusing them beats returning a silently different model.
_UNSUPPORTED_ATTENTION_KWARGS = {
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
}


# --- The mask builder (AttentionMaskInterface) ------------------------------------------------------------------------
def _probe_positions(length: int, window: int | None) -> torch.Tensor:
    """The positions a mask function is evaluated at, a bounded set at any length: the first and the last 64 (where
    prompts put instructions and image tokens) and, for a window, the distances around its edge seen from
    position 0 (which tell |i - j| <= w from |i - j| < w)."""
    edge = [] if window is None else [window - 1, window, window + 1, window + 2]
    candidates = [*range(min(length, 64)), *range(max(0, length - 64), length), *edge]
    return torch.tensor(sorted({p for p in candidates if 0 <= p < length}), dtype=torch.long)


def _check_bidirectional_mask_function(mask_function, length: int, sliding_window: int | None) -> None:
    """Refuse a mask function that is not what the kernel computes for a bidirectional model: every key visible,
    or, for a sliding layer, the keys with |i - j| <= sliding_window (transformers' rule once ``is_causal`` is False;
    a family's own narrower overlay, Gemma-3's |i - j| < sliding_window, is OR-ed into it and disappears).

    The function is evaluated, not recognised by name, so that any overlay transformers adds (image tokens,
    blocks of a multimodal prompt) is caught whatever it is called."""
    if compat.is_bidirectional_mask_function(mask_function) and sliding_window is None:
        return  # the plain bidirectional mask, nothing to evaluate
    if _compiling():
        # As graph ops (no host branch), at positions independent of the (dynamic) length: raises when it runs.
        span = 8 if sliding_window is None else sliding_window + 3
        torch._assert_async(_mask_function_matches(mask_function, torch.arange(span), sliding_window).all(),
                            _MASK_FUNCTION_MESSAGE)
        return
    try:
        matches = _mask_function_matches(mask_function, _probe_positions(length, sliding_window), sliding_window)
    except Exception as error:  # a vmap-only mask function: it cannot be read, so it cannot be trusted
        raise NotImplementedError(
            "llm2vec_fast: this model builds its attention mask from a custom mask function that llm2vec_fast cannot "
            f"evaluate ({type(error).__name__}: {error}); the llm2vec_fast attention only applies padding, a sliding "
            "window and soft-capping. Unpatch the model or use an implementation that supports it.") from error
    if not bool(matches.all()):
        raise NotImplementedError(_MASK_FUNCTION_MESSAGE)


def _mask_function_matches(mask_function, positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Where ``mask_function`` (batch and head 0) agrees with the kernel's mask at ``positions`` x ``positions``:
    every key visible, or |i - j| <= sliding_window."""
    q_idx, kv_idx = positions[:, None], positions[None, :]
    zero = torch.zeros((), dtype=torch.long)
    visible = torch.as_tensor(mask_function(zero, zero, q_idx, kv_idx), dtype=torch.bool)
    expected = torch.ones((), dtype=torch.bool) if sliding_window is None else (q_idx - kv_idx).abs() <= sliding_window
    return visible == expected


_MASK_FUNCTION_MESSAGE = (
    "llm2vec_fast: this model combines the attention mask with a custom mask function "
    "(or_mask_function/and_mask_function, e.g. for image tokens) that is neither full attention nor a sliding "
    "window; the llm2vec_fast attention only applies padding, a sliding window and soft-capping. Unpatch the "
    "model or use an implementation that supports it.")


def _compiling() -> bool:
    """Inside a graph torch.compile traces: no host syncs and no data-dependent Python branches there."""
    return torch.compiler.is_compiling()


def _make_mask_builder(causal: bool):
    def mask_builder(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function=None, attention_mask: torch.Tensor | None = None,
                     **kwargs: Any) -> torch.Tensor | None:
        """Mask builder registered with ``AttentionMaskInterface``: the key padding mask, no 4D tensor.

        Returns the ``(batch, seq)`` bool mask (True = real token) when some token is padded, else None. Called
        once per forward and mask kind (full, sliding) by transformers' ``create_*_mask`` functions. The window and
        causality themselves are applied by the attention function, from the layer's ``sliding_window``."""
        if not causal and compat.is_causal_mask_function(mask_function):
            raise ValueError("llm2vec_fast: a causal mask was requested from a model patched to be bidirectional (was "
                             "`is_causal=True` passed to forward?). Call llm2vec_fast.unpatch(model) to get the causal "
                             "model back.")
        if (isinstance(q_offset, int) and q_offset != 0) or kv_length != q_length:
            raise ValueError(_cache_message(q_length, kv_length))
        # Causal: as transformers' FlashAttention integration, causality and the window come from the attention
        # call; the mask function (which packing detection wraps around causal_mask_function) is not evaluated.
        if not causal:
            _check_bidirectional_mask_function(mask_function, kv_length, kwargs.get(compat.MASK_SLIDING_WINDOW_KWARG))
        if attention_mask is None:
            return None
        if attention_mask.ndim != 2 or attention_mask.shape != (batch_size, kv_length):
            raise ValueError(f"llm2vec_fast: expected a 2D attention mask of shape (batch, seq) = "
                             f"{(batch_size, kv_length)}, got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(torch.bool)
        # One host sync per forward, not per layer; none in a compiled graph, where an all-True mask goes to the
        # kernel as it is (the same result).
        return None if not _compiling() and bool(attention_mask.all()) else attention_mask

    mask_builder.__name__ = f"llm2vec_fast_{'causal' if causal else 'bidirectional'}_mask"
    return mask_builder


def _cache_message(q_length: int, kv_length: int) -> str:
    return ("llm2vec_fast: a model patched by llm2vec_fast cannot use a key/value cache: it encodes whole sequences, "
            f"it does not decode incrementally (query length {q_length}, key length {kv_length}). Call with "
            "use_cache=False and no cache, or unpatch the model to generate.")


# --- Packed sequences -------------------------------------------------------------------------------------------------
class _PackedCache:
    """Remembers the varlen metadata of the last position_ids / cu_seqlens tensor seen.

    Every layer of one forward receives the same tensor object: computing cu_seqlens once per forward instead of once
    per layer saves a host sync per layer. Held by weak reference, so nothing is kept alive."""

    def __init__(self) -> None:
        self._entry: tuple | None = None  # (weakref, key, value), replaced as one object: safe across threads

    def get(self, tensor: torch.Tensor, extra: tuple, compute):
        if _compiling():
            return compute()  # traced once into the graph: nothing to cache, and no weakref in a graph
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
            raise ValueError(f"llm2vec_fast: position_ids of shape {tuple(position_ids.shape)} do not match the input "
                             f"(batch {batch}, seq {seq})")
        positions = positions.expand(batch, seq)
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        if _compiling():
            # Finding the sequences of a packed row needs their number on the host (a data-dependent shape); in a
            # compiled graph packed input comes with its cu_seq_lens_q / max_length_q, and a row is one sequence.
            torch._assert_async(starts.sum() == batch, _PACKED_UNDER_COMPILE_MESSAGE)
            return None
        if int(starts.sum()) == batch:  # one sequence per row: a plain (unpacked) batch
            return None
        boundaries = starts.reshape(-1).nonzero().reshape(-1)
        total = torch.tensor([batch * seq], device=boundaries.device, dtype=boundaries.dtype)
        cu_seqlens = torch.cat([boundaries, total]).to(torch.int32)
        return cu_seqlens, int(cu_seqlens.diff().max())

    return _position_cache.get(position_ids, (batch, seq), compute)


_PACKED_UNDER_COMPILE_MESSAGE = (
    "llm2vec_fast: under torch.compile, packed input (position_ids restarting within a row) must come with "
    "transformers' cu_seq_lens_q/cu_seq_lens_k and max_length_q/max_length_k keyword arguments "
    "(llm2vec_fast.batching.PackedBatch.model_inputs() gives them)")


def _checked_cu_seqlens_in_graph(cu_q, cu_k, max_q, max_k, seq, on_cuda: bool) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32, max_seqlen)`` inside a compiled graph: shapes checked while tracing, values by the
    attention op itself when it runs (on CPU with a clear error, on CUDA by a device-side assert).

    ``max_length_q`` is a Python int that torch.compile would specialize on (a new graph per longest length), so
    the graph gets a bound instead: on CPU the packed length itself (a dynamic size; the PyTorch path reads no
    max_seqlen), on CUDA ``max_length_q`` rounded up to a power of two (the kernel's grid; at most 2x idle
    programs, one graph per power of two)."""
    if cu_q.ndim != 1:
        raise ValueError(f"llm2vec_fast: cu_seq_lens_q must be 1D (num_seqs + 1,), got {tuple(cu_q.shape)}")
    if cu_k is not None and cu_k is not cu_q:
        if cu_k.shape != cu_q.shape:
            raise ValueError("llm2vec_fast: cu_seq_lens_k must equal cu_seq_lens_q (self-attention over packed input)")
        torch._assert_async((cu_k.to(cu_q.dtype) == cu_q).all(),
                            "llm2vec_fast: cu_seq_lens_k must equal cu_seq_lens_q (self-attention over packed input)")
    longest = max_q if max_q is not None else max_k
    if longest is None or isinstance(longest, torch.Tensor):
        raise ValueError("llm2vec_fast: under torch.compile, packed input needs max_length_q (the longest sequence, a "
                         "Python int) beside cu_seq_lens_q: finding it from cu_seq_lens_q would need a host sync "
                         "inside the graph")
    cu = cu_q.to(torch.int32)
    torch._assert_async((cu[-1] == seq) & (cu[0] == 0),
                        "llm2vec_fast: cu_seq_lens_q must rise from 0 to the packed length")
    return cu, (max_length_bucket(longest) if on_cuda else seq)  # (already a bucket from PackedBatch.model_inputs)


def _checked_cu_seqlens(kwargs: dict, batch: int, seq: int, on_cuda: bool = False) -> tuple[torch.Tensor, int]:
    """Validated ``(cu_seqlens int32, max_seqlen)`` from transformers' FlashAttention kwargs (cached per forward)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if batch != 1:
        raise ValueError(f"llm2vec_fast: with cu_seq_lens_q the sequences must be packed into one row, input_ids "
                         f"(1, total); got batch {batch}")
    cu_q = cu_q if cu_q is not None else cu_k
    if _compiling():
        return _checked_cu_seqlens_in_graph(cu_q, cu_k, max_q, max_k, seq, on_cuda)

    def compute():
        if cu_q.ndim != 1 or cu_q.numel() < 2:
            raise ValueError(f"llm2vec_fast: cu_seq_lens_q must be 1D (num_seqs + 1,), got {tuple(cu_q.shape)}")
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k.to(cu_q.device, cu_q.dtype), cu_q):
            raise ValueError("llm2vec_fast: cu_seq_lens_k must equal cu_seq_lens_q (self-attention over packed input)")
        cu = cu_q.to(torch.int32)
        lengths = cu.diff()
        if int(cu[0]) != 0 or int(cu[-1]) != seq or bool((lengths < 0).any()):
            raise ValueError(f"llm2vec_fast: cu_seq_lens_q must rise from 0 to the packed length {seq}, got "
                             f"{cu.tolist()}")
        longest = int(lengths.max())
        for name, given in (("max_length_q", max_q), ("max_length_k", max_k)):
            if given is not None and int(given) < longest:
                raise ValueError(f"llm2vec_fast: {name}={int(given)} is shorter than the longest packed sequence "
                                 f"{longest}")
        # The kernel gets the exact longest length (a larger max_length would only launch idle programs).
        return cu, longest

    return _cu_seqlens_cache.get(cu_q, (seq, id(cu_k)), compute)


# --- The attention function (AttentionInterface) ----------------------------------------------------------------------
def _requested_causal(module: nn.Module, is_causal: bool | None) -> bool:
    # The keyword wins (transformers passes the config's is_causal through it); module.is_causal stays True on
    # decoders, so it is only the last resort.
    if is_causal is not None:
        return bool(is_causal)
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "is_causal", None) is not None:
        return bool(config.is_causal)
    return bool(getattr(module, "is_causal", False))


@functools.cache  # once per process
def _warn_output_attentions() -> None:
    logger.warning("llm2vec_fast attention does not return attention weights: output_attentions=True gives None")


def kernel_window(module: nn.Module, sliding_window: int | None, *, causal: bool) -> int | None:
    """The kernel's ``window`` (key j visible from query i when |i - j| < window) for a layer whose attention call
    got ``sliding_window``, by the rule transformers applies to the model:

    * causal: ``sliding_window_overlay``, j > i - sliding_window, so ``window = sliding_window``;
    * bidirectional through ``config.is_causal = False``: ``create_bidirectional_sliding_window_mask``,
      |i - j| <= sliding_window, so ``window = sliding_window + 1``;
    * Gemma-3 in its own bidirectional mode (``config.use_bidirectional_attention = True``, EmbeddingGemma): its
      overlay |i - j| < sliding_window, so ``window = sliding_window``."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0:
        raise ValueError(f"llm2vec_fast: {type(module).__name__} passed sliding_window={sliding_window!r}; a sliding "
                         "window must be a positive number of tokens")
    if causal or compat.uses_own_bidirectional_overlay(getattr(module, "config", None)):
        return sliding_window
    return sliding_window + 1


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, *, impl: str = "auto", causal: bool = False,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention signature: query ``(B, H, S, D)``, key/value ``(B, Hkv, S, D)`` -> ``(B, S, H, D)``.

    ``causal`` is the mode the model was patched in (each mode has its own registered name); a call asking for the
    other one is refused rather than computed differently."""
    if _requested_causal(module, is_causal) != causal:
        if causal:
            raise ValueError("llm2vec_fast: bidirectional attention was requested from a model patched to stay "
                             "causal (patch(model, bidirectional=False)). Patch it with bidirectional=True for a "
                             "bidirectional model.")
        raise ValueError("llm2vec_fast: causal attention was requested from a model patched to be bidirectional "
                         "(is_causal=True). Call llm2vec_fast.unpatch(model) for the causal model.")
    for name, what in _UNSUPPORTED_ATTENTION_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"llm2vec_fast: our attention kernel does not implement {what} ({name}=...)")
    if kwargs.get("use_cache"):
        raise ValueError("llm2vec_fast: use_cache=True on a model patched by llm2vec_fast: it encodes whole sequences "
                         "and cannot decode incrementally, so a key/value cache is meaningless. Pass use_cache=False, "
                         "or unpatch the model to generate.")
    batch, heads, seq, head_dim = query.shape
    if key.shape[2] != seq:
        raise ValueError(f"llm2vec_fast: key length {key.shape[2]} differs from query length {seq}: a model patched "
                         "by llm2vec_fast cannot use a key/value cache. Pass use_cache=False, or unpatch the model to "
                         "generate.")
    if kwargs.get("output_attentions"):
        _warn_output_attentions()

    window = kernel_window(module, kwargs.get("sliding_window"), causal=causal)
    softcap = kwargs.get("softcap")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views, no copy

    if attention_mask is not None and attention_mask.ndim == 4:
        # A prepared 4D mask given by the caller reaches us untouched (transformers passes 4D masks through, and
        # then applies neither causality nor a window of its own): honour it exactly with PyTorch SDPA.
        if softcap is not None:
            raise NotImplementedError("llm2vec_fast: a prepared 4D attention mask on a model that soft-caps its "
                                      "attention logits; the SDPA path used for 4D masks cannot soft-cap. Pass a 2D "
                                      "(batch, seq) padding mask instead.")
        if not _compiling():
            logger.debug("llm2vec_fast: 4D attention mask given; using PyTorch SDPA with that mask for this call")
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               dropout_p=dropout, scale=scaling,
                                                               enable_gqa=key.shape[1] != heads)
        return out.transpose(1, 2), None

    options = dict(softmax_scale=scaling, dropout_p=dropout, logit_softcap=softcap, window=window, causal=causal,
                   impl=impl)
    packed = None
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        if attention_mask is not None:
            raise ValueError("llm2vec_fast: packed input (cu_seq_lens_q) must not be padded; got an attention mask "
                             "with padding too")
        packed = _checked_cu_seqlens(kwargs, batch, seq, query.is_cuda)
    elif attention_mask is None and kwargs.get("position_ids") is not None:
        packed = _cu_seqlens_from_position_ids(kwargs["position_ids"], batch, seq)

    if packed is not None:
        cu_seqlens, max_seqlen = packed
        out = bidirectional_attention(q.reshape(batch * seq, heads, head_dim),
                                      k.reshape(batch * seq, k.shape[2], head_dim),
                                      v.reshape(batch * seq, v.shape[2], v.shape[3]), cu_seqlens=cu_seqlens,
                                      max_seqlen=max_seqlen, **options)
        return out.reshape(batch, seq, heads, -1), None

    if attention_mask is not None:
        if attention_mask.shape != (batch, seq):
            raise ValueError(f"llm2vec_fast: the key padding mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{(batch, seq)}")
        attention_mask = attention_mask.to(torch.bool)
    return bidirectional_attention(q, k, v, key_padding_mask=attention_mask, **options), None


def _make_attention_function(impl: str, causal: bool):
    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        return _attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, impl=impl,
                                  causal=causal, **kw)

    attention_forward.__name__ = f"llm2vec_fast_{'causal_' if causal else ''}attention_{impl}"
    attention_forward.__doc__ = _attention_forward.__doc__
    return attention_forward


@functools.cache
def register() -> None:
    """Register our attention functions and mask builder under every name of ``ATTENTION_NAMES`` (once)."""
    for causal, names in ((False, ATTENTION_NAMES), (True, CAUSAL_ATTENTION_NAMES)):
        mask_builder = _make_mask_builder(causal)
        for impl, name in names.items():
            compat.register_attention(name, _make_attention_function(impl, causal), mask_builder)
