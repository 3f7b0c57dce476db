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
