"""Bidirectional (non-causal) fused attention.

PLACEHOLDER written by the lead so that other modules can import the public function; the owner of this
file replaces it with the Triton kernels, the autograd Function and the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bidirectional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """q ``(batch, seq, heads, head_dim)``, k/v ``(batch, seq, kv_heads, head_dim)`` -> ``(batch, seq, heads, head_dim)``."""
    if cu_seqlens is not None:
        raise NotImplementedError("varlen placeholder")
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    kt = kt.repeat_interleave(group, dim=1)
    vt = vt.repeat_interleave(group, dim=1)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    out = out.transpose(1, 2)
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, :, None, None].to(out.dtype)
    return out
