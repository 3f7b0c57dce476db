"""Pooling token states into one embedding per text, with llm2vec's meaning of each mode.

``embed_mask`` marks the tokens that count: the text's real tokens, without the instruction and without
padding. For ``eos_token``/``last_token`` and ``bos_token`` the last and first real tokens of the whole input
are taken, as llm2vec does with left padding. Padded batches (:func:`pool`) are pooled by masked weighted sums,
packed ones (:func:`pool_segments`) by per-text segment sums; tests check that both give the same embeddings.
"""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")


def check_pooling_mode(mode: str) -> str:
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling_mode must be one of {POOLING_MODES}, got {mode!r}")
    return mode


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean", *,
         embed_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Padded batch: hidden ``(batch, seq, dim)``, masks ``(batch, seq)`` -> ``(batch, dim)``, in fp32.

    ``attention_mask`` marks real tokens; ``embed_mask`` (default: ``attention_mask``) marks the tokens
    that are pooled by ``mean`` and ``weighted_mean``. A text whose embed mask is empty pools to zeros, and so
    does a row without a real token. Masked weighted sums and a gather, no copy of the real tokens and no host
    sync; padded positions get weight 0, so their states must be finite (a model's are)."""
    check_pooling_mode(mode)
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (batch, seq, dim) and masks (batch, seq); got {tuple(hidden.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    if embed_mask is not None and embed_mask.shape != attention_mask.shape:
        raise ValueError(f"embed_mask must be (batch, seq) like attention_mask {tuple(attention_mask.shape)}, "
                         f"got {tuple(embed_mask.shape)}")
    real = attention_mask.to(hidden.device).bool()
    if real.shape[1] == 0:
        return hidden.new_zeros(real.shape[0], hidden.shape[2], dtype=torch.float32)
    if mode in ("bos_token", "eos_token", "last_token"):
        position = torch.arange(real.shape[1], device=hidden.device).expand_as(real)
        if mode == "bos_token":  # the first real token (seq where there is none)
            index = torch.where(real, position, real.shape[1]).amin(dim=1)
        else:  # the last real token (-1 where there is none)
            index = torch.where(real, position, -1).amax(dim=1)
        present = real.any(dim=1, keepdim=True)
        rows = torch.arange(real.shape[0], device=hidden.device)
        return hidden[rows, index.clamp(0, real.shape[1] - 1)].float() * present
    counted = (real if embed_mask is None else real & embed_mask.to(hidden.device).bool()).float()
    # weighted_mean: weights 1, 2, ..., n over each row's counted tokens
    weights = torch.cumsum(counted, dim=1) * counted if mode == "weighted_mean" else counted
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return torch.bmm(weights.unsqueeze(1), hidden.float()).squeeze(1)


def pool_segments(states: torch.Tensor, lengths: torch.Tensor, mode: str = "mean", *,
                  embed_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Packed texts: states ``(total, dim)`` (or ``(1, total, dim)``) of the texts back to back, ``lengths``
    ``(n,)`` their token counts (``cu_seqlens.diff()``), ``embed_mask`` ``(total,)`` -> ``(n, dim)`` in fp32,
    with :func:`pool`'s meaning. A text without a token, or whose embed mask is empty, pools to zeros."""
    check_pooling_mode(mode)
    if states.dim() == 3 and states.shape[0] == 1:
        states = states[0]
    if states.dim() != 2 or lengths.dim() != 1:
        raise ValueError(f"states must be (total, dim) and lengths (n,); got {tuple(states.shape)} and "
                         f"{tuple(lengths.shape)}")
    total, n = states.shape[0], lengths.numel()
    lengths = lengths.to(device=states.device, dtype=torch.long)
    if int(lengths.sum()) != total:  # the one host sync of pooling
        raise ValueError(f"the texts' lengths add up to {int(lengths.sum())} but there are {total} tokens")
    states = states.float()
    ends = torch.cumsum(lengths, dim=0)
    if mode in ("bos_token", "eos_token", "last_token"):
        index = ends - lengths if mode == "bos_token" else ends - 1
        present = (lengths > 0).unsqueeze(1)
        return states[index.clamp(0, max(total - 1, 0))] * present if total else states.new_zeros(n, states.shape[1])
    # output_size: the total is known (checked above), so this costs no second host sync
    segment = torch.repeat_interleave(torch.arange(n, device=states.device), lengths, output_size=total)
    counted = torch.ones(total, device=states.device) if embed_mask is None else embed_mask.reshape(-1).float()
    if counted.numel() != total:
        raise ValueError(f"embed_mask has {counted.numel()} entries for {total} tokens")
    weights = counted
    if mode == "weighted_mean":
        # Weights 1, 2, ..., n over each text's counted tokens: a running count that restarts per text.
        running = torch.cumsum(counted, dim=0)
        before = torch.cat([running.new_zeros(1), running])[ends - lengths]
        weights = (running - before[segment]) * counted
    sums = torch.zeros(n, device=states.device).index_add_(0, segment, weights).clamp_min(1e-9)
    out = torch.zeros(n, states.shape[1], device=states.device, dtype=states.dtype)
    return out.index_add_(0, segment, states * (weights / sums[segment]).unsqueeze(1))

