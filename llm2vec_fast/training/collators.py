"""Data collators: MNTP masking (Hugging Face's ``DataCollatorForLanguageModeling`` with what it lacks) and the
contrastive collator (instruction-free embed masks, padded or packed groups cut into GradCache chunks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import DataCollatorForLanguageModeling

from ..kernels import text_hashes
from ..pipeline import TextTokenizer, collate

IGNORE_INDEX = -100
GROUPS = ("query", "positive", "negative")


def resolve_mask_token(tokenizer, mask_token_type: str) -> tuple[int, bool]:
    """Set ``tokenizer.mask_token`` as llm2vec's ``mask_token_type`` does; return (its id, whether it was added).

    ``blank``: the token ``_``; ``eos``: the eos token; ``mask``: a new ``<mask>`` token (the embedding matrix
    must then grow by one row). Raises ``ValueError`` when the tokenizer has no such single token."""
    if mask_token_type == "blank":
        token_id = tokenizer.convert_tokens_to_ids("_")
        unk = tokenizer.unk_token_id
        if token_id is None or (unk is not None and token_id == unk and tokenizer.unk_token != "_"):
            raise ValueError("mask_token_type 'blank' needs '_' as a single token in the vocabulary, and this "
                             "tokenizer has none; use mask_token_type 'eos' or 'mask'")
        tokenizer.mask_token = "_"
        return token_id, False
    if mask_token_type == "eos":
        if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
            raise ValueError("mask_token_type 'eos' needs a tokenizer with an eos token; use 'blank' or 'mask'")
        tokenizer.mask_token = tokenizer.eos_token
        return tokenizer.eos_token_id, False
    if mask_token_type == "mask":
        added = tokenizer.add_tokens(["<mask>"], special_tokens=True)
        tokenizer.mask_token = "<mask>"
        return tokenizer.convert_tokens_to_ids("<mask>"), bool(added)
    raise ValueError(f"mask_token_type must be one of ('blank', 'eos', 'mask'), got {mask_token_type!r}")


@dataclass
class MNTPDataCollator(DataCollatorForLanguageModeling):
    """``DataCollatorForLanguageModeling`` (BERT's 80/10/10, random tokens from the tokenizer's own
    ``len(tokenizer)`` tokens, not the padding rows some heads add) with what MNTP needs besides:

    - special tokens are never masked, also where a feature's ``special_tokens_mask`` misses one (a pad or eos
      id inside a concatenated block);
    - token ids beyond the LM head's ``vocab_size`` rows are an error before any step;
    - :meth:`for_replacement` builds llm2vec's variants: ``"default"`` 80/10/10, ``"all_mask"`` every masked
      token replaced by the mask token (llm2vec's ``DataCollatorForLanguageModelingWithFullMasking``)."""

    vocab_size: int | None = None

    @classmethod
    def for_replacement(cls, tokenizer, replacement: str, mask_probability: float, **kwargs):
        if replacement not in ("default", "all_mask"):
            raise ValueError(f"replacement must be 'default' or 'all_mask', got {replacement!r}")
        if not 0.0 < mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in (0, 1], got {mask_probability}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (set tokenizer.pad_token, e.g. to the eos token)")
        full = replacement == "all_mask"
        return cls(tokenizer=tokenizer, mlm_probability=mask_probability, mask_replace_prob=1.0 if full else 0.8,
                   random_replace_prob=0.0 if full else 0.1, **kwargs)

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        if self.vocab_size is not None and ((inputs < 0) | (inputs >= self.vocab_size)).any():
            bad = inputs[(inputs < 0) | (inputs >= self.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")
        special = torch.isin(inputs, torch.tensor(self.tokenizer.all_special_ids, dtype=inputs.dtype))
        if special_tokens_mask is not None:
            special |= torch.as_tensor(special_tokens_mask, dtype=torch.bool)
        return super().torch_mask_tokens(inputs, special_tokens_mask=special, offset_mapping=offset_mapping)


class ContrastiveCollator:
    """Rows ``{"query", "positive", "negative"?, "instruction"?}`` -> per group (query, positive, negative) a list
    of chunks of at most ``chunk_size`` texts (one chunk when ``None``), each the fields of a
    :class:`~llm2vec_fast.batching.PaddedBatch` (left padded as the encoder pads) or, with ``packed``, of a
    :class:`~llm2vec_fast.batching.PackedBatch`. Chunks are cut here, on the host, so that GradCache never reads
    a packed group's ``cu_seqlens`` back from the device.

    Texts go through the pipeline the encoder uses (:class:`~llm2vec_fast.pipeline.TextTokenizer`, ``collate``):
    the query is ``"{instruction}; {query}"`` as in llm2vec's supervised data, its instruction left out of
    pooling; ``wrap`` is the model's wrapping (``wrap_for_model``). Texts cut at ``max_length`` and texts pooled
    whole (no token of their own left) are counted in ``self.stats``.

    With ``text_ids`` (the default), the batch also holds ``positive_ids`` ``(B,)`` and, with hard negatives,
    ``negative_ids`` ``(B,)``: int64 hashes of the document texts (``text_hashes``), by which the losses leave a
    query's false negatives (another document that is the same text as its positive) out of its softmax. Only
    documents are hashed: in SimCSE the query and its positive are the same sentence by construction and the
    query is never a column, so only other rows' copies of the sentence are masked. Texts are hashed as given
    (before the model's wrapping and the cut at ``max_length``, which are the same for every document).
    ``self.stats["false_negatives"]`` counts the (query, document) pairs so masked within each process's batch."""

    def __init__(self, tokenizer, max_length: int, *, packed: bool = False, wrap: Callable[[str], str] | None = None,
                 chunk_size: int | None = None, text_ids: bool = True):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of texts or None, got {chunk_size}")
        self.text_tokenizer = TextTokenizer(tokenizer, max_length=max_length, wrap=wrap, instruction_separator="; ")
        self.tokenizer, self.chunk_size = tokenizer, chunk_size
        self.packed, self.text_ids = bool(packed), bool(text_ids)
        self.stats = {"texts": 0, "truncated": 0, "instruction_filled_input": 0, "false_negatives": 0}

    def tokenize(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """(instruction, text) pairs -> one padded or packed group, as a dict (so that the Trainer moves it)."""
        encoded = self.text_tokenizer(pairs)
        self.stats["texts"] += len(encoded)
        self.stats["truncated"] += sum(e.truncated for e in encoded)
        self.stats["instruction_filled_input"] += sum(e.pooled_whole for e in encoded)
        return dataclasses.asdict(collate(encoded, packed=self.packed, pad_id=self.tokenizer.pad_token_id))

    def chunks(self, pairs: list[tuple[str, str]]) -> list[dict[str, torch.Tensor]]:
        size = self.chunk_size or len(pairs)
        return [self.tokenize(pairs[start:start + size]) for start in range(0, len(pairs), size)]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, torch.Tensor]]]:
        if not rows:
            raise ValueError("the contrastive collator got an empty batch")
        # A blank instruction is none (llm2vec's supervised data joins "instruction; " only when there is one);
        # the encoder, as llm2vec's encode, joins any non-empty one.
        out = {"query": self.chunks([((row.get("instruction") or "").strip(), row["query"]) for row in rows]),
               "positive": self.chunks([("", row["positive"]) for row in rows])}
        negatives = [row.get("negative") for row in rows]
        if any(n is not None for n in negatives):
            if any(n is None for n in negatives):
                raise ValueError("a batch mixes rows with and without a hard negative")
            out["negative"] = self.chunks([("", n) for n in negatives])
        if self.text_ids:
            out["positive_ids"] = text_hashes([row["positive"] for row in rows])
            columns = out["positive_ids"]
            if "negative" in out:
                out["negative_ids"] = text_hashes(negatives)
                columns = torch.cat([columns, out["negative_ids"]])
            # (query, document) pairs masked: a document other than the query's own positive with its text.
            self.stats["false_negatives"] += int((columns[None, :] == out["positive_ids"][:, None]).sum()) - len(rows)
        return out
