"""The sentence-transformers modules that an exported directory's ``modules.json`` names.

``LLM2VecTransformer`` (input module, saved in the root) holds an :class:`~llm2vec_fast.LLM2Vec`: it
tokenizes as llm2vec does (the prompt is the instruction, joined to the text and left out of pooling through
``embed_mask``), left-pads, and runs the patched model (our bidirectional attention, with gradients when
training). ``LLM2VecPooling`` (``1_Pooling``) pools the token states over ``embed_mask`` with llm2vec's meaning
of each mode (:func:`llm2vec_fast.pooling.pool`). Together they give ``LLM2Vec.encode``'s embeddings.

Load with ``SentenceTransformer(DIR, trust_remote_code=True)``: sentence-transformers >= 6 imports module classes
outside its own package only with that consent. Its own ``Transformer`` + ``Pooling(include_prompt=False)``
would load without it, but they cannot run our attention (nothing imports llm2vec_fast to register it) and they
do not pool an instruction's boundary as llm2vec does; docs/integrations.md ("Why trust_remote_code=True
stays") gives the source lines and the measured cosines. ``model_kwargs`` go to ``LLM2Vec.from_pretrained``
(``dtype``, ``attention_impl``...).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

try:
    from sentence_transformers.base.modules import InputModule, Module
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("llm2vec_fast.sentence_transformers needs sentence-transformers>=6: "
                      "pip install 'llm2vec-fast[sentence-transformers]'") from error

from .encoder import ENCODER_KEYS, LLM2VEC_CONFIG, LLM2Vec
from .export import pooling_config, write_model_files
from .pipeline import collate, hidden_states
from .pooling import check_pooling_mode, pool


class LLM2VecTransformer(InputModule):
    """Texts (and a prompt) -> left-padded token ids with ``embed_mask`` -> token states of the patched model.

    Features out of :meth:`preprocess`: ``input_ids``, ``attention_mask``, ``position_ids``, ``embed_mask``, all
    ``(batch, longest)``; :meth:`forward` adds ``token_embeddings`` ``(batch, longest, dim)``."""

    config_file_name = LLM2VEC_CONFIG
    config_keys = list(ENCODER_KEYS)
    save_in_root = True

    def __init__(self, encoder: LLM2Vec):
        super().__init__()
        if not isinstance(encoder, LLM2Vec):
            raise TypeError(f"LLM2VecTransformer wraps an llm2vec_fast.LLM2Vec, got {type(encoder).__name__}")
        self.encoder = encoder

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self.encoder.tokenizer = value

    def get_config_dict(self) -> dict[str, Any]:
        return {key: getattr(self.encoder, key) for key in self.config_keys}

    @property
    def max_seq_length(self) -> int:
        return self.encoder.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"max_seq_length must be a positive integer, got {value!r}")
        self.encoder.max_length = value

    def get_embedding_dimension(self) -> int:
        return int(self.encoder.config.hidden_size)

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """Strings (or ``[instruction, text]`` pairs) -> padded features; ``prompt`` is the instruction of every
        plain string, as in :meth:`LLM2Vec.encode`."""
        pairs, _ = self.encoder._as_pairs(list(inputs))
        if prompt:
            pairs = [(instruction or prompt, text) for instruction, text in pairs]
        encoded = self.encoder.tokenize_texts(pairs)
        batch = collate(encoded, packed=False, pad_id=self.encoder.tokenizer.pad_token_id)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids, "embed_mask": batch.embed_mask}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        features["token_embeddings"] = hidden_states(self.encoder.model, features)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        write_model_files(self.encoder, output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             model_kwargs: dict[str, Any] | None = None, **kwargs) -> "LLM2VecTransformer":
        path = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        if path is None or not os.path.isdir(path):
            raise FileNotFoundError(f"no model directory found at {model_name_or_path!r}")
        return cls(LLM2Vec.from_pretrained(path, **dict(model_kwargs or {})))


class LLM2VecPooling(Module):
    """``token_embeddings`` pooled over ``embed_mask`` -> ``sentence_embedding`` ``(batch, dim)`` in fp32."""

    config_keys = ["word_embedding_dimension", "pooling_mode"]

    def __init__(self, word_embedding_dimension: int, pooling_mode: str = "mean"):
        super().__init__()
        self.word_embedding_dimension = int(word_embedding_dimension)
        self.pooling_mode = check_pooling_mode(pooling_mode)

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        features["sentence_embedding"] = pool(features["token_embeddings"], features["attention_mask"],
                                              self.pooling_mode, embed_mask=features["embed_mask"])
        return features

    def get_embedding_dimension(self) -> int:
        return self.word_embedding_dimension

    def get_config_dict(self) -> dict[str, Any]:
        return pooling_config(self.pooling_mode, self.word_embedding_dimension)

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs) -> "LLM2VecPooling":
        config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        if "llm2vec_pooling_mode" not in config:
            raise ValueError(f"{model_name_or_path}/{subfolder}/config.json has no llm2vec_pooling_mode: not a "
                             "pooling config written by llm2vec-fast")
        return cls(config["word_embedding_dimension"], config["llm2vec_pooling_mode"])
