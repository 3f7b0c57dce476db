"""Pooling token states into one embedding per text, with llm2vec's meaning of each mode.

``embed_mask`` marks the tokens that count: the text's real tokens, without the instruction and without
padding. For ``eos_token``/``last_token`` and ``bos_token`` the last and first real tokens of the whole input
are taken, as llm2vec does with left padding.
"""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")


def check_pooling_mode(mode: str) -> str:
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling_mode must be one of {POOLING_MODES}, got {mode!r}")
    return mode


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: str = "mean",
    *,
    embed_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden ``(batch, seq, dim)``, masks ``(batch, seq)`` -> ``(batch, dim)``, computed in fp32.

    ``attention_mask`` marks real tokens; ``embed_mask`` (default: ``attention_mask``) marks the tokens
    that are pooled by ``mean`` and ``weighted_mean``. A text whose embed mask is empty pools to zeros.
    """
    check_pooling_mode(mode)
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (batch, seq, dim) and masks (batch, seq); got {tuple(hidden.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    counted = real if embed_mask is None else (embed_mask.bool() & real)
    states = hidden.float()
    if mode == "mean":
        weights = counted.float()
    elif mode == "weighted_mean":
        # Weights 1, 2, ..., n over the counted tokens in order (llm2vec's position weighting).
        weights = torch.cumsum(counted.float(), dim=1) * counted.float()
    else:
        positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
        if mode == "bos_token":
            index = torch.where(real, positions, real.shape[1]).amin(dim=1)
        else:
            index = torch.where(real, positions, -1).amax(dim=1)
        index = index.clamp(0, real.shape[1] - 1)
        picked = states[torch.arange(states.shape[0], device=states.device), index]
        return picked * real.any(dim=1, keepdim=True).float()
    total = weights.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return torch.einsum("bs,bsd->bd", weights / total, states)


def pool_packed(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str = "mean",
    *,
    embed_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooling for packed texts: hidden ``(total, dim)`` (or ``(1, total, dim)``), ``cu_seqlens`` ``(n + 1,)``
    offsets of the texts, ``embed_mask`` ``(total,)`` -> ``(n, dim)`` in fp32, with :func:`pool`'s meaning.

    Every packed text has at least one token, so ``bos_token``/``eos_token``/``last_token`` take each text's
    first/last token. A text whose embed mask is empty pools to zeros, as in :func:`pool`.
    """
    check_pooling_mode(mode)
    if hidden.dim() == 3:
        if hidden.shape[0] != 1:
            raise ValueError(f"packed hidden states must be (total, dim) or (1, total, dim), got {tuple(hidden.shape)}")
        hidden = hidden[0]
    if hidden.dim() != 2 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"hidden must be (total, dim) and cu_seqlens (n + 1,); got {tuple(hidden.shape)} "
                         f"and {tuple(cu_seqlens.shape)}")
    total = hidden.shape[0]
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but there are {total} packed tokens")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths <= 0).any()):
        raise ValueError("every packed text needs at least one token")
    states = hidden.float()
    if mode == "bos_token":
        return states[cu[:-1]]
    if mode in ("eos_token", "last_token"):
        return states[cu[1:] - 1]
    n = lengths.numel()
    segment = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths)
    counted = torch.ones(total, device=hidden.device) if embed_mask is None else embed_mask.reshape(-1).float()
    if counted.numel() != total:
        raise ValueError(f"embed_mask has {counted.numel()} entries for {total} packed tokens")
    if mode == "mean":
        weights = counted
    else:
        # Weights 1, 2, ..., n over each text's counted tokens: a running count that restarts per text.
        running = torch.cumsum(counted, dim=0)
        before = torch.cat([running.new_zeros(1), running])[cu[:-1]]
        weights = (running - before[segment]) * counted
    sums = torch.zeros(n, device=hidden.device).index_add_(0, segment, weights).clamp_min(1e-9)
    out = torch.zeros(n, states.shape[1], device=hidden.device, dtype=states.dtype)
    return out.index_add_(0, segment, states * (weights / sums[segment]).unsqueeze(1))
