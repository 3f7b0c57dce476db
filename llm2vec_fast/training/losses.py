"""One loss module per objective, wrapping our kernels (sentence-transformers' ``losses/``):

- :class:`MNTPLoss`: the masked next-token loss of a frozen LM head on hidden states, and :class:`MNTPModel`,
  the module the Trainer wraps for MNTP (the PEFT body with the head and loss inside, so that FSDP and DDP
  wrap all of it and the head is gathered where it is used);
- :class:`InfoNCELoss`: InfoNCE on pooled embeddings of queries, positives and optional hard negatives;
- :class:`CachedInfoNCELoss`: the same with GradCache inside the loss, as sentence-transformers'
  ``CachedMultipleNegativesRankingLoss``: the forward embeds without a graph, the loss's backward re-encodes
  chunk by chunk.

Both InfoNCE losses take ``matryoshka_dims`` (sentence-transformers' ``MatryoshkaLoss``): the loss summed over
the leading dimensions of the embeddings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..kernels import info_nce_loss
from ..kernels.mntp_loss import masked_next_token_loss, masked_next_token_loss_reference
from ..pipeline import embed, last_hidden_state
from .collators import GROUPS, IGNORE_INDEX
from .gradcache import backward_chunks, embed_without_graph, embedding_grads


class MNTPLoss(nn.Module):
    """LM head ``(vocab, hidden)`` (optional bias, Gemma's logit softcap) applied to the labelled rows only,
    hidden state at ``i - 1`` predicting the token at ``i``; ``full_logits`` uses the plain head + cross-entropy
    (for comparison). The head stays frozen, as in llm2vec."""

    def __init__(self, head: nn.Module, *, logit_softcap: float | None = None, full_logits: bool = False,
                 impl: str = "auto"):
        super().__init__()
        if not hasattr(head, "weight"):
            raise ValueError(f"{type(head).__name__} has no weight to use as the LM head")
        self.head = head.requires_grad_(False)
        self.logit_softcap, self.full_logits, self.impl = logit_softcap, full_logits, impl

    @classmethod
    def from_causal_lm(cls, causal_lm, **kwargs) -> "MNTPLoss":
        head = causal_lm.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(causal_lm).__name__} has no output embeddings (LM head) to train MNTP with")
        config = causal_lm.config.get_text_config()
        return cls(head, logit_softcap=getattr(config, "final_logit_softcapping", None), **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kwargs = dict(bias=getattr(self.head, "bias", None), shift=1, ignore_index=IGNORE_INDEX,
                      logit_softcap=self.logit_softcap)
        if self.full_logits:
            return masked_next_token_loss_reference(hidden, self.head.weight, labels, **kwargs)
        return masked_next_token_loss(hidden, self.head.weight, labels, impl=self.impl, **kwargs)


class MNTPModel(nn.Module):
    """The PEFT body and the MNTP loss in one module: ``forward(input_ids, attention_mask, labels)`` returns
    ``{"loss"}``. ``save_pretrained`` saves the body's adapter, keyed like llm2vec's ``-mntp`` adapters."""

    def __init__(self, body: nn.Module, loss: MNTPLoss):
        super().__init__()
        self.body, self.loss = body, loss

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = last_hidden_state(self.body(input_ids=input_ids, attention_mask=attention_mask))
        if labels is None:
            return {"last_hidden_state": hidden}
        return {"loss": self.loss(hidden, labels)}

    def save_pretrained(self, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None, **kwargs):
        if state_dict is not None:
            state_dict = {k.removeprefix("body."): v for k, v in state_dict.items() if k.startswith("body.")}
        self.body.save_pretrained(output_dir, state_dict=state_dict, **kwargs)

    def activation_checkpointing_enable(self, **kwargs):
        self.body.activation_checkpointing_enable(**kwargs)


def check_matryoshka(dims: Sequence[int] | None, weights: Sequence[float] | None = None, *,
                     embedding_dim: int | None = None) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """Matryoshka settings, checked: ``dims`` strictly decreasing positive ints (at most ``embedding_dim`` when
    it is known), ``weights`` one finite non-negative number per dim, not all zero (default: 1 each). Returns
    ``(dims, weights)`` as tuples, or None when ``dims`` is None."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights were given without matryoshka_dims")
        return None
    dims = list(dims)
    if not dims:
        raise ValueError("matryoshka_dims is empty; give the leading dimensions to train, e.g. [64, 32, 8], or "
                         "null for plain InfoNCE")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"matryoshka_dims must be positive integers, got {dims}")
    if any(a <= b for a, b in zip(dims, dims[1:])):
        raise ValueError(f"matryoshka_dims must be strictly decreasing (largest first, no duplicates), got {dims}")
    if embedding_dim is not None and dims[0] > embedding_dim:
        raise ValueError(f"matryoshka_dims {dims}: {dims[0]} is larger than the embedding size {embedding_dim}")
    if weights is None:
        weights = [1.0] * len(dims)
    weights = [float(w) for w in weights]
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights needs one weight per dim: {len(dims)} dims {dims}, "
                         f"{len(weights)} weights {weights}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise ValueError(f"matryoshka_weights must be finite, non-negative and not all zero, got {weights}")
    return tuple(dims), tuple(weights)


class InfoNCELoss(nn.Module):
    """InfoNCE (sentence-transformers' ``MultipleNegativesRankingLoss``) on pooled embeddings: ``forward(model,
    inputs)`` with the collator's groups, each a list of chunks, encoded in one graph. With several processes
    and ``gather_across_ranks``, every query is scored against the global batch. When the batch holds the
    collator's ``positive_ids`` (and ``negative_ids``), false negatives are left out of each query's softmax
    (``info_nce_loss``'s ids, gathered across ranks with the embeddings); without them, llm2vec's loss.

    ``matryoshka_dims`` (e.g. ``(4096, 1024, 256, 64)``, strictly decreasing) makes it sentence-transformers'
    ``MatryoshkaLoss`` around it: the sum over ``d`` of ``weight_d * InfoNCE(embeddings[:, :d])``, each term the
    fused kernel on the leading ``d`` dimensions, so the cosine is that of the truncated vectors (normalized
    after truncation, as ``encode(truncate_dim=d)`` gives them). ``matryoshka_weights`` default to 1 each. The
    full dimension is trained only when it is listed, as in sentence-transformers."""

    def __init__(self, pooling_mode: str = "mean", *, scale: float = 20.0, gather_across_ranks: bool = True,
                 impl: str = "auto", matryoshka_dims: Sequence[int] | None = None,
                 matryoshka_weights: Sequence[float] | None = None):
        super().__init__()
        self.pooling_mode, self.scale, self.impl = pooling_mode, scale, impl
        self.gather_across_ranks = gather_across_ranks
        checked = check_matryoshka(matryoshka_dims, matryoshka_weights)
        self.matryoshka_dims, self.matryoshka_weights = checked if checked else (None, None)

    def score(self, *reps: torch.Tensor | None, ids: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
              ) -> torch.Tensor:
        gather = self.gather_across_ranks and torch.distributed.is_available() and \
            torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        positive_ids, negative_ids = ids  # the Trainer moved them with the batch; info_nce_loss checks them
        if self.matryoshka_dims is not None and self.matryoshka_dims[0] > reps[0].shape[-1]:
            raise ValueError(f"matryoshka_dims {list(self.matryoshka_dims)}: {self.matryoshka_dims[0]} is larger "
                             f"than the embedding size {reps[0].shape[-1]}")
        # Matryoshka in the same call: the documents and ids are gathered across ranks once, at full size, and
        # truncated per dim there.
        return info_nce_loss(*reps, scale=self.scale, gather_across_ranks=gather, impl=self.impl,
                             positive_ids=positive_ids, negative_ids=negative_ids,
                             matryoshka_dims=self.matryoshka_dims, matryoshka_weights=self.matryoshka_weights)

    @staticmethod
    def text_ids(inputs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The collator's ``positive_ids`` / ``negative_ids`` (None where it gave none: nothing is masked)."""
        return inputs.get("positive_ids"), inputs.get("negative_ids")

    def forward(self, model, inputs: dict[str, list[dict[str, Any]]]) -> torch.Tensor:
        return self.score(*(torch.cat([embed(model, chunk, self.pooling_mode) for chunk in inputs[group]])
                            for group in GROUPS if group in inputs), ids=self.text_ids(inputs))


class CachedInfoNCELoss(InfoNCELoss):
    """:class:`InfoNCELoss` through GradCache: the forward encodes every chunk without a graph and returns the
    loss as a leaf whose backward re-encodes each chunk with its replayed RNG state and back-propagates its
    slice of the embedding gradient (scaled by what reaches the loss: gradient accumulation, loss scaling).
    Activation memory is that of one chunk, the gradients those of the whole batch."""

    def forward(self, model, inputs: dict[str, list[dict[str, Any]]]) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(model, inputs)
        encode = functools.partial(embed, model, pooling_mode=self.pooling_mode)
        groups = [inputs[group] for group in GROUPS if group in inputs]
        cached, states = embed_without_graph(encode, groups)
        loss = self.score(*cached, ids=self.text_ids(inputs))
        grads = embedding_grads(loss, cached)
        loss = loss.detach().requires_grad_()
        no_sync = getattr(model, "no_sync", None)

        def backward_hook(grad_output: torch.Tensor) -> None:
            with torch.enable_grad():  # autograd runs hooks without grad mode
                backward_chunks(encode, groups, states, [None if g is None else g * grad_output for g in grads],
                                no_sync=no_sync)

        loss.register_hook(backward_hook)
        return loss
