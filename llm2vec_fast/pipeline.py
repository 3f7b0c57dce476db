"""The one path from text to embedding, shared by encoding, both contrastive stages and corpus encoding.

    (instruction, text)  --TextTokenizer-->  EncodedText (token ids, embed mask)
                         --collate-------->  PaddedBatch | PackedBatch
                         --embed---------->  (n, dim) fp32 pooled over the embed mask

Text preparation is llm2vec 0.2.3's: the instruction and the text are joined with the separator ``!@#$%^&*()``
where the pooled text starts, the joined text gets the model's wrapping (``wrap_for_model``: chat wrappers,
the end marker for ``eos_token`` pooling), and ``doc_max_length`` trims the text by whole words. Where it
differs, it is on purpose: the instruction/text boundary comes from one tokenization of the joined text and its
character offsets, so a text that tokenizes differently alone and after the instruction (llm2vec issue #80) is
handled exactly; a text with no token of its own (empty, or only an instruction) is pooled over all the input's
tokens; an input with no token at all is encoded as the single token EOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .batching import PackedBatch, PaddedBatch, pack_batch, pad_batch, positions_from_mask
from .pooling import pool, pool_segments

__all__ = ["SEPARATOR", "EncodedText", "TextTokenizer", "collate", "embed", "hidden_states", "last_hidden_state",
           "text_token_states", "wrap_for_model", "split_at_separator"]

SEPARATOR = "!@#$%^&*()"

# llm2vec's prepare_for_tokenization: chat wrappers keyed by the model's name on the hub...
_CHAT_WRAPPERS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
    "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
    "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "Qwen/Qwen2-1.5B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
}
# ...and, for eos_token pooling, the end marker appended per family (by model_type).
_EOS_SUFFIX = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}


def wrap_for_model(text: str, *, name_or_path: str, model_type: str | None, pooling_mode: str) -> str:
    """llm2vec's ``prepare_for_tokenization``: the chat wrapper of a known instruct model (by its hub name) and,
    for ``eos_token`` pooling, the family's end marker. Give it to :class:`TextTokenizer` as ``wrap`` (with
    ``functools.partial``), so that training and encoding wrap a text the same way."""
    wrapper = _CHAT_WRAPPERS.get(name_or_path)
    if wrapper is not None:
        text = wrapper[0] + text.strip() + wrapper[1]
        if name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct":
            return text
    if pooling_mode == "eos_token":
        if name_or_path == "meta-llama/Meta-Llama-3-8B":
            text = text.strip() + "<|end_of_text|>"
        elif model_type in _EOS_SUFFIX:
            text = text.strip() + _EOS_SUFFIX[model_type]
    return text


def split_at_separator(marked: str, wrap: Callable[[str], str]) -> tuple[str, int]:
    """``marked`` holds :data:`SEPARATOR` where the pooled text starts: wrap it, then return the full text
    without the separator and the character where the pooled text starts."""
    parts = wrap(marked).split(SEPARATOR)
    full = "".join(parts)
    return full, (len(parts[0]) if len(parts) > 1 else len(full))


@dataclasses.dataclass
class EncodedText:
    """One input after tokenization: ``input_ids`` and ``embed_mask`` (1 on the tokens that are pooled);
    ``truncated`` when doc_max_length word trimming or max_length cut it; ``pooled_whole`` when the text kept
    no token of its own (empty, or cut away behind the instruction) and the whole input is pooled instead."""

    input_ids: list[int]
    embed_mask: list[int]
    truncated: bool
    pooled_whole: bool = False


class TextTokenizer:
    """(instruction, text) pairs -> :class:`EncodedText`, one tokenization of each joined text.

    ``instruction_separator`` joins a non-empty instruction (stripped) and the text: ``" "`` in llm2vec's
    ``encode``, ``"; "`` in llm2vec's supervised training data. ``wrap`` is the model's wrapping of the joined
    text (``wrap_for_model``). ``doc_max_length`` is llm2vec's word trimming of the text alone (the encoder
    sets it; training does not). With ``skip_instruction`` the embed mask marks the text's own tokens: a token
    counts when its characters reach past the instruction (a token such as " word" that starts on the joining
    space counts as the text's); tokens the tokenizer adds (BOS) do not. Without it every token is pooled."""

    def __init__(self, tokenizer, *, max_length: int, wrap: Callable[[str], str] | None = None,
                 instruction_separator: str = " ", skip_instruction: bool = True, doc_max_length: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("llm2vec-fast needs a fast (Rust) tokenizer: the instruction/text boundary is taken "
                             "from character offsets, which slow tokenizers do not give")
        if max_length < 1 or (doc_max_length is not None and doc_max_length < 1):
            raise ValueError(f"max_length and doc_max_length must be positive, got {max_length}, {doc_max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.wrap = wrap or (lambda text: text)
        self.instruction_separator = instruction_separator
        self.skip_instruction = bool(skip_instruction)
        self.doc_max_length = None if doc_max_length is None else int(doc_max_length)

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedText]:
        texts, trimmed = [text for _, text in pairs], [False] * len(pairs)
        if self.doc_max_length is not None:
            texts, trimmed = self.trim_documents(texts)
        # llm2vec joins any non-empty instruction, even a blank one: `f"{instruction.strip()} {SEPARATOR}{text}"`.
        joined = [split_at_separator(
            (f"{instruction.strip()}{self.instruction_separator}" if instruction else "") + SEPARATOR + text,
            self.wrap) for (instruction, _), text in zip(pairs, texts)]
        encoded = self.tokenizer([full for full, _ in joined], add_special_tokens=True, truncation=True,
                                 max_length=self.max_length, return_offsets_mapping=True)
        out = []
        for i, (_, boundary) in enumerate(joined):
            ids, offsets = list(encoded["input_ids"][i]), encoded["offset_mapping"][i]
            sequence_ids = encoded.sequence_ids(i)
            truncated = trimmed[i] or bool(encoded.encodings[i].overflowing)
            if not ids:  # nothing to encode at all (empty text, no instruction, no BOS): EOS stands for it
                out.append(EncodedText([self.tokenizer.eos_token_id], [1], truncated, pooled_whole=True))
                continue
            mask = [1] * len(ids)
            if self.skip_instruction:
                mask = [int(seq is not None and (end > boundary or (start == end and start >= boundary)))
                        for (start, end), seq in zip(offsets, sequence_ids)]
            pooled_whole = not any(mask)
            out.append(EncodedText(ids, [1] * len(ids) if pooled_whole else mask, truncated, pooled_whole))
        return out

    def trim_documents(self, texts: list[str]) -> tuple[list[str], list[bool]]:
        """llm2vec's doc_max_length rule: cut whole words until the text alone has at most doc_max_length tokens.

        Returns the texts and, per text, whether it was cut."""
        limit = self.doc_max_length
        counts = self._token_counts(texts)
        out, trimmed = list(texts), [False] * len(texts)
        for i, count in enumerate(counts):
            text = out[i]
            while limit is not None and count > limit:
                words = text.split()
                reduced = int(len(words) * limit / count)
                trimmed[i] = True
                if reduced == 0:
                    # Not even one whole word fits (a long URL, unspaced script): llm2vec empties the text here,
                    # which would give the document the instruction's embedding. Keep its first tokens instead.
                    offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                    text = text[: offsets["offset_mapping"][limit - 1][1]]
                    break
                text = " ".join(words[:reduced])
                count = self._token_counts([text])[0]
            out[i] = text
        return out, trimmed

    def _token_counts(self, texts: list[str]) -> list[int]:
        # As llm2vec counts them: no special tokens, truncated at max_length.
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)
        return [len(ids) for ids in encoded["input_ids"]]


def collate(encoded: Sequence[EncodedText], *, packed: bool, pad_id: int) -> PaddedBatch | PackedBatch:
    """Texts back to back (``packed``: no padding, for a patched model) or left-padded to the longest."""
    ids, masks = [e.input_ids for e in encoded], [e.embed_mask for e in encoded]
    return pack_batch(ids, masks) if packed else pad_batch(ids, masks, pad_id=pad_id)


def last_hidden_state(outputs) -> torch.Tensor:
    """The last hidden states of a transformers model's output (a ``ModelOutput`` or a tuple)."""
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


def as_batch(batch: PaddedBatch | PackedBatch | Mapping[str, Any]) -> PaddedBatch | PackedBatch:
    """A batch, or its ``dataclasses.asdict`` form (what the Trainer moves to the device). A padded dict may
    leave out ``position_ids`` (computed from the attention mask, so that left padding does not shift positions)
    and ``embed_mask`` (every real token is pooled), as llm2vec's features do."""
    if isinstance(batch, (PaddedBatch, PackedBatch)):
        return batch
    if "cu_seqlens" in batch:
        return PackedBatch(**{f.name: batch[f.name] for f in dataclasses.fields(PackedBatch)})
    attention_mask = batch["attention_mask"]
    position_ids = batch.get("position_ids")
    embed_mask = batch.get("embed_mask")
    return PaddedBatch(batch["input_ids"], attention_mask,
                       positions_from_mask(attention_mask) if position_ids is None else position_ids,
                       attention_mask if embed_mask is None else embed_mask)


def hidden_states(model, batch: PaddedBatch | PackedBatch | Mapping[str, Any]) -> torch.Tensor:
    """A batch through the model: the last hidden states, packed ``(total, dim)`` or padded ``(batch, longest,
    dim)``, with each text's positions from 0."""
    batch = as_batch(batch)
    if isinstance(batch, PackedBatch):
        return last_hidden_state(model(**batch.model_inputs(), use_cache=False))[0]
    return last_hidden_state(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   position_ids=batch.position_ids, use_cache=False))


def embed(model, batch: PaddedBatch | PackedBatch | Mapping[str, Any], pooling_mode: str) -> torch.Tensor:
    """A batch through the model, pooled over each text's embed mask: ``(texts, dim)`` fp32, with the autograd
    graph kept (training calls this; encoding calls it under ``torch.no_grad``)."""
    batch = as_batch(batch)
    hidden = hidden_states(model, batch)
    if isinstance(batch, PackedBatch):
        return pool_segments(hidden, batch.cu_seqlens.diff(), pooling_mode, embed_mask=batch.embed_mask)
    return pool(hidden, batch.attention_mask, pooling_mode, embed_mask=batch.embed_mask)


def text_token_states(model, batch: PaddedBatch | PackedBatch | Mapping[str, Any]) -> list[torch.Tensor]:
    """Per text, the fp32 ``(tokens, dim)`` hidden states of the tokens its embed mask marks (what ``mean``
    pools)."""
    batch = as_batch(batch)
    hidden = hidden_states(model, batch)
    if isinstance(batch, PackedBatch):
        bounds, flags = batch.cu_seqlens.tolist(), batch.embed_mask.bool()
        return [hidden[a:b][flags[a:b]].float() for a, b in zip(bounds[:-1], bounds[1:])]
    flags = batch.embed_mask.bool() & batch.attention_mask.bool()
    return [hidden[row][flags[row]].float() for row in range(hidden.shape[0])]
