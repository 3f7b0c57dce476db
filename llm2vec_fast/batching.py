"""Batches for encoding: token-budget batches over length-sorted inputs, padded or packed.

Encoding sorts its inputs by token count (longest first) and cuts the sorted list into batches that hold at
most ``batch_size`` texts and at most ``max_batch_tokens`` tokens. Two layouts feed the model:

- packed (the encoder's default for a patched model on CUDA): all texts of a batch one after the other in
  ``(1, total)``, positions restarting at 0 per text and ``cu_seqlens`` marking the boundaries; no padding is
  computed at all;
- padded (the encoder's default on CPU, unpatched models, or ``packed=False``): ``(batch, longest)`` left-padded
  ids with an attention mask, positions restarting at 0 on each text's first real token.

Both give the same embeddings, and neither depends on which other texts share the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class PaddedBatch:
    """``input_ids``, ``attention_mask``, ``position_ids``, ``embed_mask``: ``(batch, longest)``, left padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    embed_mask: torch.Tensor

    def to(self, device) -> "PaddedBatch":
        return _moved(self, device)


@dataclasses.dataclass
class PackedBatch:
    """Texts back to back: ``input_ids``/``position_ids`` ``(1, total)``, ``embed_mask`` ``(total,)``,
    ``cu_seqlens`` ``(n + 1,)`` int32 offsets of each text, ``max_seqlen`` the longest text's length."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    embed_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def to(self, device) -> "PackedBatch":
        return _moved(self, device)

    def model_inputs(self) -> dict:
        """Keyword arguments for a patched model: packed ids and positions plus transformers' varlen kwargs.
        ``max_length_q``/``max_length_k`` are :func:`max_length_bucket` of the longest text, computed here once
        per batch (a bound, as flash-attention's ``max_seqlen`` may be): a compiled model specializes on this
        Python int, so it sees one value per power of two instead of one per longest length."""
        bound = max_length_bucket(self.max_seqlen)
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens, "max_length_q": bound, "max_length_k": bound}


def max_length_bucket(longest: int) -> int:
    """``longest`` rounded up to a power of two, at least 16: the packed-length bound a compiled graph gets (the
    Triton kernel's grid: at most 2x idle programs; eager calls read the exact length from ``cu_seqlens``)."""
    return max(16, 1 << (int(longest) - 1).bit_length())


def _moved(batch, device):
    """The batch with its tensors on ``device`` (copied without waiting where the source is pinned)."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True)
                                         for f in dataclasses.fields(batch) if torch.is_tensor(getattr(batch, f.name))})


def length_sorted_batches(lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int | None = None,
                          packed: bool = False, max_padding: float | None = None) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, longest texts first.

    A batch holds at most ``batch_size`` texts and costs at most ``max_batch_tokens`` tokens: the sum of the
    lengths when ``packed``, ``texts * longest`` when padded. A single text longer than the budget gets a
    batch of its own. Padded batches with ``max_padding`` (a fraction) also end where the next text would
    be padded by more than that fraction of the batch's width, so that little padding is computed. The order
    inside the sort is stable, so equal inputs always batch the same way."""
    if max_padding is not None and not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be a fraction in [0, 1), got {max_padding}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    cost = 0
    for index in order:
        length = lengths[index]
        # Sorted longest first, so a padded batch's width is its first text's length.
        new_cost = cost + length if packed else (len(current) + 1) * (lengths[current[0]] if current else length)
        too_padded = (not packed and max_padding is not None and current
                      and length < (1.0 - max_padding) * lengths[current[0]])
        if current and (len(current) >= batch_size or too_padded
                        or (max_batch_tokens is not None and new_cost > max_batch_tokens)):
            batches.append(current)
            current, new_cost = [], length
        current.append(index)
        cost = new_cost
    if current:
        batches.append(current)
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], embed_masks: Sequence[Sequence[int]], *, pad_id: int) -> PaddedBatch:
    """Left-pad token id lists (llm2vec pads from the left) into a :class:`PaddedBatch`."""
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(s) for s in sequences)
    if width == 0:
        raise ValueError("pad_batch got only empty sequences")
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    embed_mask = torch.zeros((n, width), dtype=torch.long)
    for row, (ids, mask) in enumerate(zip(sequences, embed_masks)):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {row} has {len(ids)} tokens but an embed mask of {len(mask)}")
        if ids:
            input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
            embed_mask[row, width - len(ids):] = torch.as_tensor(mask, dtype=torch.long)
    return PaddedBatch(input_ids, attention_mask, positions_from_mask(attention_mask), embed_mask)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` position ids that start at 0 on each row's first real token, whatever the padding in
    front of it (so that an embedding does not depend on how much its batch pads it)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def pack_batch(sequences: Sequence[Sequence[int]], embed_masks: Sequence[Sequence[int]]) -> PackedBatch:
    """Concatenate token id lists into a :class:`PackedBatch` (positions restart at 0 per text)."""
    if not sequences:
        raise ValueError("pack_batch needs at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError("pack_batch cannot pack an empty sequence; give it at least one token")
    for row, (ids, mask) in enumerate(zip(sequences, embed_masks)):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {row} has {len(ids)} tokens but an embed mask of {len(mask)}")
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long).unsqueeze(0)
    embed_mask = torch.tensor([t for m in embed_masks for t in m], dtype=torch.long)
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).unsqueeze(0)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0)
    return PackedBatch(input_ids, position_ids, embed_mask, cu_seqlens, max(lengths))
