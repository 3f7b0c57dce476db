"""Fused Triton kernels, each with a PyTorch reference that is also the CPU fallback.

This package imports only torch and triton.
"""

from .attention import bidirectional_attention
from .infonce import info_nce_loss, text_hashes
from .mntp_loss import masked_next_token_loss

__all__ = ["bidirectional_attention", "masked_next_token_loss", "info_nce_loss", "text_hashes"]
