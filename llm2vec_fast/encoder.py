"""The LLM2Vec-compatible encoder: ``from_pretrained``, ``encode``, ``save``.

It reads and writes what llm2vec 0.2.3 reads and writes, and gives its embeddings: text preparation,
tokenization, batching and pooling are the shared pipeline's (``llm2vec_fast.pipeline``, where the differences
from llm2vec are listed). Batches are cut by a token budget over length-sorted inputs; on CUDA they are packed
(no padding computed) through our varlen attention, on CPU left-padded; each text's positions start at 0, so
that an embedding does not depend on the batch size or on the other texts of the batch (llm2vec issues #68, #74).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import PaddedBatch, length_sorted_batches
from .builtin_models import resolve_model
from .compilation import compute_rotary_once, float_attributes_constant, is_compiled, module_device
from .pipeline import (SEPARATOR, EncodedText, TextTokenizer, collate, embed, split_at_separator, text_token_states,
                       wrap_for_model)
from .pooling import check_pooling_mode
from .prompts import DOCUMENT_PROMPT_NAME, QUERY_PROMPT_NAME, default_prompts, resolve_prompt
from .quantization import check_precision, quantize_embeddings

# EncodedText, SEPARATOR and split_at_separator lived here before the pipeline: still importable from here.
__all__ = ["LLM2Vec", "EncodedText", "SEPARATOR", "split_at_separator", "wrap_for_model"]

logger = logging.getLogger(__name__)

LLM2VEC_CONFIG = "llm2vec_config.json"
ENCODER_KEYS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _is_pair(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)


def _at_least_two_by_two(batch: PaddedBatch, pad_id: int) -> PaddedBatch:
    """A padded batch for the compiled model, at least 2 rows by 2 columns: torch.compile specializes a size of 1
    (a new graph, a second compile of the whole model), so a lone text gets a copy of itself as a second row (its
    output dropped) and a batch of 1-token texts one more column of left padding. Rows are unchanged otherwise:
    the same embeddings.

    The copy is not free: it doubles the cost of that batch (a pad row would cost the same, the matrix products
    are dense). It is the cheapest way to one graph found: tracing sizes size-oblivious
    (``backed_size_oblivious``) lets dynamo's graph take one row, but inductor's fake-tensor stride computation
    of a view then guards ``batch >= 2`` and a lone text compiles a second graph (minutes on CPU). In the encode
    benchmark the copies are 19 of 3,611 tokens (docs/PERF.md)."""
    if batch.input_ids.shape[0] == 1:
        batch = PaddedBatch(*(t.repeat(2, 1) for t in (batch.input_ids, batch.attention_mask, batch.position_ids,
                                                          batch.embed_mask)))
    if batch.input_ids.shape[1] == 1:
        left = torch.nn.functional.pad
        batch = PaddedBatch(left(batch.input_ids, (1, 0), value=pad_id), left(batch.attention_mask, (1, 0)),
                            left(batch.position_ids, (1, 0)), left(batch.embed_mask, (1, 0)))
    return batch


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Each parameter's and buffer's storage and version counter: changes when one is updated in place or
    replaced."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


class LLM2Vec(torch.nn.Module):
    """A bidirectional decoder turned text encoder, llm2vec's ``LLM2Vec`` made fast.

    ``model`` returns hidden states (``AutoModel``, optionally PEFT-wrapped), already patched when
    bidirectional; ``tokenizer`` must be a fast tokenizer (character offsets are needed)."""

    def __init__(self, model, tokenizer, pooling_mode: str = "mean", max_length: int = 512, doc_max_length: int = 400,
                 skip_instruction: bool = True, *, name_or_path: str = "", max_batch_tokens: int | None = None,
                 packed: bool | None = None, max_padding: float | None = 0.25):
        super().__init__()
        check_pooling_mode(pooling_mode)
        self.model = model
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.max_length = int(max_length)
        self.doc_max_length = int(doc_max_length)
        self.skip_instruction = bool(skip_instruction)
        self.name_or_path = name_or_path
        self.max_batch_tokens = max_batch_tokens
        self.packed = packed
        self._compile_pending: str | None = None  # the backend compile_model chose, until the first batch compiles
        self._frozen_weights: tuple | None = None  # what compile_model(freeze=True) compiled in (see there)
        self._inductor_freezing = False
        self._inductor_options: dict[str, Any] = {}
        # Padded batches end where a text would be padded by more than this fraction of the batch's width.
        self.max_padding = max_padding
        self.config = model.config
        self.text_tokenizer  # noqa: B018  (a slow tokenizer or a bad length is refused here, not at encode)
        # sentence-transformers' prompts: name -> instruction, for encode(prompt_name=...), encode_query/_document.
        self.prompts = default_prompts()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, base_model_name_or_path: str, peft_model_name_or_path: str | Sequence[str] | None = None,
                        merge_peft: bool = False, enable_bidirectional: bool = True, pooling_mode: str | None = None,
                        max_length: int | None = None, doc_max_length: int | None = None,
                        skip_instruction: bool | None = None, attention_impl: str = "auto", compile: bool | str = False,
                        **model_kwargs: Any) -> "LLM2Vec":
        """Load as llm2vec 0.2.3 does.

        - ``base_model_name_or_path``: hub id, local directory or built-in name (``smollm2-135m``). An adapter
          stored beside the base (``adapter_config.json`` in that directory) is loaded and merged.
        - ``peft_model_name_or_path``: a LoRA adapter (or a list: all but the last are merged, the last is
          merged only with ``merge_peft``).
        - Encoder settings (``pooling_mode`` "mean", ``max_length`` 512, ``doc_max_length`` 400,
          ``skip_instruction`` True) come from ``llm2vec_config.json`` in the adapter directory (else the base
          directory); an explicit argument that is not None wins.
        - ``enable_bidirectional``: patch the model with our bidirectional attention (``llm2vec_fast.patch``);
          False keeps it causal, through the same kernel in causal mode (``patch(..., bidirectional=False)``), or,
          where the patch refuses the model, through its own attention unpatched (logged; padded batches only).
        - ``compile``: True (inductor) or a ``torch.compile`` backend name: :meth:`compile_model` after loading
          (call that yourself after ``model.to(device)`` to check the backend of another device).
        - ``model_kwargs`` go to ``AutoModel.from_pretrained`` (``torch_dtype`` is accepted as ``dtype``)."""
        from transformers import AutoModel, AutoTokenizer

        if not isinstance(base_model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"base_model_name_or_path must be a string or path, got {type(base_model_name_or_path)}")
        base = resolve_model(str(base_model_name_or_path))
        if "torch_dtype" in model_kwargs and "dtype" not in model_kwargs:
            model_kwargs["dtype"] = model_kwargs.pop("torch_dtype")
        model_kwargs.setdefault("dtype", torch.float32)

        # An adapter stored beside the base config (llm2vec's "special case"): its base weights come from the
        # directory itself when it holds them, else from the adapter's base_model_name_or_path.
        weights_from, beside_adapter = base, None
        if os.path.isfile(os.path.join(base, "adapter_config.json")):
            beside_adapter = base
            if not any(os.path.isfile(os.path.join(base, f)) for f in _WEIGHT_FILES):
                weights_from = _read_json(os.path.join(base, "adapter_config.json")).get("base_model_name_or_path")
                if not weights_from:
                    raise ValueError(f"{base} holds an adapter but no weights and no base_model_name_or_path")
                weights_from = resolve_model(weights_from)

        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.pad_token = tokenizer.eos_token  # llm2vec's choice, whatever it had (__init__ pads on the left)

        logger.info("Loading %s", weights_from)
        model = AutoModel.from_pretrained(weights_from, **model_kwargs)
        # llm2vec takes the name used by prepare_for_tokenization from the local config.json.
        config_file = os.path.join(base, "config.json")
        name = _read_json(config_file).get("_name_or_path", "") if os.path.isfile(config_file) else base

        if beside_adapter is not None:
            from peft import PeftModel

            logger.info("Merging the adapter stored beside the base config in %s", beside_adapter)
            model = PeftModel.from_pretrained(model, beside_adapter).merge_and_unload()

        adapters = [] if peft_model_name_or_path is None else (
            [peft_model_name_or_path] if isinstance(peft_model_name_or_path, (str, os.PathLike))
            else list(peft_model_name_or_path))
        for position, adapter in enumerate(adapters):
            from peft import PeftModel

            adapter = str(adapter)
            if not os.path.isfile(os.path.join(adapter, "adapter_config.json")) and os.path.isdir(adapter):
                raise FileNotFoundError(f"{adapter} has no adapter_config.json: not a PEFT adapter directory")
            logger.info("Loading adapter %s", adapter)
            model = PeftModel.from_pretrained(model, adapter)
            if merge_peft or position < len(adapters) - 1:
                model = model.merge_and_unload()

        config_path = os.path.join(str(adapters[-1]) if adapters else base, LLM2VEC_CONFIG)
        stored = _read_json(config_path) if os.path.isfile(config_path) else {}
        if set(stored) - set(ENCODER_KEYS):
            logger.warning("Ignoring unknown keys %s in %s", sorted(set(stored) - set(ENCODER_KEYS)), config_path)
        explicit = dict(pooling_mode=pooling_mode, max_length=max_length, doc_max_length=doc_max_length,
                        skip_instruction=skip_instruction)
        settings = {**{k: v for k, v in stored.items() if k in ENCODER_KEYS},
                    **{k: v for k, v in explicit.items() if v is not None}}

        from .bidirectional import IMPLEMENTATIONS, patch

        if attention_impl not in IMPLEMENTATIONS:  # a wrong argument is an error, not a refusal to fall back from
            raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {attention_impl!r}")
        if enable_bidirectional:
            patch(model, attention_impl=attention_impl, bidirectional=True)
        else:
            # A causal embedding model kept causal (Qwen3-Embedding, e5-mistral with last_token pooling) runs our
            # kernel in causal mode where the patch applies, so that its batches can be packed too; where the
            # patch refuses the model (attention sinks, image-token masks, attention outside transformers'
            # interface), it stays the plain causal model llm2vec would use, and batches are padded.
            try:
                patch(model, attention_impl=attention_impl, bidirectional=False)
            except (ValueError, NotImplementedError) as refusal:
                logger.warning("enable_bidirectional=False: keeping the model's own causal attention, not "
                               "llm2vec_fast's (%s); batches are padded, not packed", refusal)
        model.eval()
        encoder = cls(model, tokenizer, name_or_path=name, **settings)
        if compile:
            encoder.compile_model(backend="inductor" if compile is True else compile)
        return encoder

    def compile_model(self, backend: str = "inductor", *, freeze: bool = True,
                      options: dict[str, Any] | None = None) -> "LLM2Vec":
        """``torch.compile`` the model in place for encoding (``llm2vec_fast.compilation.compile_model``:
        fullgraph, sequence lengths and batch sizes dynamic from the first batch, so new shapes do not recompile).
        Call it after moving the model to its device: the check that a compiler backend works there (a C++
        compiler on CPU, Triton on CUDA) raises ``CompilerUnavailableError`` saying why. The first batch pays the
        compile; ``encode`` logs how long it took.

        ``freeze`` (inductor's ``freezing``): the weights become constants of the compiled inference graph, which
        lets inductor fold them and pre-pack the CPU matrix products. The graph then keeps the weights it was
        compiled with, so ``encode`` refuses to run once a parameter has changed in place or been replaced
        (``load_state_dict``, an optimizer step, merging an adapter); call ``compile_model`` again (it clears
        torch.compile's caches, ``torch._dynamo.reset()``, and recompiles) or compile with ``freeze=False``.
        Training compiles through the Trainer's ``torch_compile``, never frozen.

        ``options``: inductor config settings (``torch._inductor.config`` names, e.g. ``{"cpp.enable_concat_linear":
        True}``) set around the compiled calls, as inductor reads them when a graph compiles (none by default: the
        ones tried gave nothing measurable, docs/PERF.md). The rotary embedding's ``(cos, sin)`` are computed once
        per forward, not per layer (``compilation.compute_rotary_once``)."""
        from .compilation import compile_model

        chosen = dict(options or {})
        if chosen:
            from torch._inductor import config

            unknown = sorted(set(chosen) - set(config.get_config_copy()))
            if unknown:
                raise ValueError(f"compile_model options {unknown} are not torch._inductor.config settings")
        if self._frozen_weights is not None:
            logger.info("recompiling a frozen model: clearing torch.compile's caches (torch._dynamo.reset())")
            torch._dynamo.reset()
        compute_rotary_once(self.model)
        compile_model(self.model, dynamic=True, fullgraph=True, backend=backend)
        self._frozen_weights = _weights_fingerprint(self.model) if freeze and is_compiled(self.model) else None
        # inductor reads `freezing` from its global config when a graph compiles (on a call, lazily; a per-compile
        # options={"freezing": True} is not seen there), so encode sets it around its calls of the model.
        self._inductor_freezing = self._frozen_weights is not None
        self._inductor_options = chosen
        self._compile_pending = backend
        return self

    def _compile_settings(self):
        """Settings torch.compile reads when a graph is traced or compiled, i.e. on a call, so ``encode`` and
        ``forward`` set them around their calls of a compiled model (a no-op context for an eager one):

        - float attributes kept constant (``compilation.float_attributes_constant``);
        - inductor's ``freezing`` when ``compile_model(freeze=True)`` asked for it, and its ``options``."""
        settings = contextlib.ExitStack()
        if not is_compiled(self.model):
            return settings
        settings.enter_context(float_attributes_constant())
        if self._inductor_freezing or self._inductor_options:
            from torch._inductor import config

            settings.enter_context(config.patch({**self._inductor_options, "freezing": self._inductor_freezing}))
        return settings

    def _check_frozen_weights(self) -> None:
        if self._frozen_weights is not None and _weights_fingerprint(self.model) != self._frozen_weights:
            raise RuntimeError(
                "the model's weights changed (updated, replaced or moved) after compile_model(freeze=True) made them "
                "constants of the compiled graph, which would encode with the old weights: call compile_model() "
                "again to recompile with the new ones, or compile_model(freeze=False)")

    def save(self, output_path: str, merge_before_save: bool = False, save_config: bool = True) -> None:
        """Write the model (or its adapter), the tokenizer and ``llm2vec_config.json``, as llm2vec does.

        With a PEFT-wrapped model, only the adapter is written unless ``merge_before_save``; the adapter then
        loads with ``from_pretrained(base, peft_model_name_or_path=output_path)`` here and in llm2vec."""
        from . import transformers_compat
        from .bidirectional import unpatched

        if merge_before_save and hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()
            transformers_compat.forget_loaded_adapter(self.model)
        os.makedirs(output_path, exist_ok=True)
        # Written as it was before patching (is_causal, use_cache, attention implementation), so that transformers
        # and llm2vec load the plain model.
        with unpatched(self.model):
            self.model.save_pretrained(output_path)
        self.tokenizer.save_pretrained(output_path)
        if save_config:
            settings = {k: getattr(self, k) for k in ENCODER_KEYS}
            with open(os.path.join(output_path, LLM2VEC_CONFIG), "w", encoding="utf-8") as handle:
                json.dump(settings, handle, indent=4)

    # ------------------------------------------------------------------ text preparation
    def prepare_for_tokenization(self, text: str) -> str:
        """llm2vec's per-family wrapping of the joined text (chat wrappers, eos marker for eos_token pooling)."""
        return wrap_for_model(text, name_or_path=self.name_or_path, model_type=getattr(self.config, "model_type", None),
                              pooling_mode=self.pooling_mode)

    @property
    def text_tokenizer(self) -> TextTokenizer:
        """The pipeline's tokenizer with this encoder's current settings (llm2vec's ``encode`` joins an
        instruction and its text with a space and trims documents to ``doc_max_length`` words)."""
        return TextTokenizer(self.tokenizer, max_length=self.max_length, wrap=self.prepare_for_tokenization,
                             skip_instruction=self.skip_instruction, doc_max_length=self.doc_max_length)

    def tokenize_texts(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedText]:
        """Tokenize [instruction, text] pairs once each; ``embed_mask`` marks the text's tokens."""
        return self.text_tokenizer(pairs)

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _as_pairs(sentences) -> tuple[list[tuple[str, str]], bool]:
        if isinstance(sentences, str):
            return [("", sentences)], True
        if _is_pair(sentences) and isinstance(sentences, tuple):
            raise TypeError("encode() got a tuple of two strings: pass [[instruction, text]] for one pair, "
                            "or a list of strings for two texts")
        if isinstance(sentences, np.ndarray):
            sentences = sentences.tolist()
        if not isinstance(sentences, (list, tuple)):
            raise TypeError(f"encode() takes a string or a list of strings / [instruction, text] pairs, "
                            f"got {type(sentences).__name__}")
        if len(sentences) == 0:
            raise ValueError("encode() got an empty list: there is nothing to encode")
        pairs = []
        for i, item in enumerate(sentences):
            if isinstance(item, str):
                pairs.append(("", item))
            elif _is_pair(item):
                pairs.append((item[0], item[1]))
            else:
                raise TypeError(f"encode() input {i} must be a string or an [instruction, text] pair of strings, "
                                f"got {item!r:.80}")
        return pairs, False

    def _default_packed(self, device: torch.device) -> bool:
        # Packed on CUDA, where our patched attention's Triton varlen path computes no padding at all. On CPU the
        # varlen path is one SDPA call per text, and length-sorted padded batches (little padding) measured as
        # fast or faster on a quiet machine (docs/PERF.md), so CPU pads. An unpatched model always pads.
        if self.packed is not None:
            return bool(self.packed)
        from .bidirectional import is_patched

        return device.type == "cuda" and is_patched(self.model)

    @torch.no_grad()
    def encode(self, sentences: str | Sequence[str] | Sequence[Sequence[str]], batch_size: int = 32,
               show_progress_bar: bool | None = None, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               device: str | torch.device | None = None, normalize_embeddings: bool = False,
               output_value: str = "sentence_embedding", *, prompt: str | None = None, prompt_name: str | None = None,
               truncate_dim: int | None = None, precision: str = "float32", pool: dict[str, Any] | None = None,
               chunk_size: int | None = None, max_batch_tokens: int | None = None, packed: bool | None = None,
               ranges: np.ndarray | None = None, calibration_embeddings: np.ndarray | None = None):
        """Embed strings or ``[instruction, text]`` pairs; the result keeps the input order.

        Returns ``(n, dim)`` float32 (numpy by default, a tensor with ``convert_to_tensor``), or ``(dim,)`` for
        a single string. ``output_value="token_embeddings"`` gives, per input, the ``(tokens, dim)`` vectors of
        its text tokens (those that ``mean`` pools), as a list. Batches hold at most ``batch_size`` texts and
        ``max_batch_tokens`` tokens (default ``batch_size * max_length``); ``packed`` (default: on CUDA when the
        model is patched; padded on CPU) concatenates each batch's texts instead of padding them.

        As sentence-transformers' ``encode``: ``prompt`` (an instruction) or ``prompt_name`` (a key of
        ``self.prompts``: LLM2Vec's MTEB task names, ``query``, ``document``) is the instruction of every plain
        string (pairs keep their own), left out of pooling; ``truncate_dim`` keeps the leading dimensions
        (Matryoshka) before ``normalize_embeddings``; ``precision`` (``float32``, ``int8``, ``uint8``,
        ``binary``, ``ubinary``) quantizes the result as ``sentence_transformers.quantize_embeddings`` does (binary
        packs 8 dimensions per byte; the int8/uint8 buckets come from ``ranges`` ``(2, dim)``, each dimension's
        min and max, or from ``calibration_embeddings`` ``(m, dim)`` float, else from these embeddings: give one
        of them to quantize several calls alike); ``device=["cuda:0",
        "cuda:1"]`` or ``pool=start_multi_process_pool(...)`` encodes in several processes, ``chunk_size`` texts
        at a time."""
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, got {output_value!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        instruction = resolve_prompt(self.prompts, prompt, prompt_name)
        check_precision(precision)
        dimension = int(self.config.hidden_size)
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or not 1 <= truncate_dim <= dimension):
            raise ValueError(f"truncate_dim must be an integer in [1, {dimension}] (the embedding size), "
                             f"got {truncate_dim!r}")
        if output_value == "token_embeddings" and (truncate_dim is not None or precision != "float32"):
            raise ValueError("truncate_dim and precision apply to sentence embeddings, not to token_embeddings")
        if (ranges is not None or calibration_embeddings is not None) and precision not in ("int8", "uint8"):
            raise ValueError(f"ranges and calibration_embeddings set the int8/uint8 buckets; precision={precision!r} "
                             "uses none")
        if ranges is not None and calibration_embeddings is not None:
            raise ValueError("give ranges or calibration_embeddings, not both: ranges are computed from the "
                             "calibration embeddings")
        pairs, single = self._as_pairs(sentences)
        if instruction:
            pairs = [(given or instruction, text) for given, text in pairs]
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO and len(pairs) > batch_size
        if pool is not None or isinstance(device, (list, tuple)):
            embeddings = self._encode_in_processes(pairs, pool, device, chunk_size=chunk_size, batch_size=batch_size,
                                                   output_value=output_value, max_batch_tokens=max_batch_tokens,
                                                   packed=packed)
        else:
            encoded = self.tokenize_texts(pairs)
            cut = sum(e.truncated for e in encoded)
            if cut:  # said, not silent: an adapter's llm2vec_config.json may carry a short training max_length
                logger.warning("%d of %d texts were cut to fit max_length=%d tokens or doc_max_length=%d", cut,
                               len(encoded), self.max_length, self.doc_max_length)
            embeddings = self.encode_tokenized(
                encoded, batch_size=batch_size, device=device, output_value=output_value,
                max_batch_tokens=max_batch_tokens, packed=packed, show_progress_bar=show_progress_bar)
        if output_value == "token_embeddings":
            if normalize_embeddings:
                embeddings = [torch.nn.functional.normalize(e, dim=-1) for e in embeddings]
            if convert_to_numpy and not convert_to_tensor:
                embeddings = [e.numpy() for e in embeddings]
            return embeddings[0] if single else embeddings
        if truncate_dim is not None:
            embeddings = embeddings[:, :truncate_dim]
        if normalize_embeddings:
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        if precision != "float32":
            embeddings = torch.from_numpy(quantize_embeddings(embeddings.numpy(), precision, ranges=ranges,
                                                              calibration_embeddings=calibration_embeddings))
        if single:
            embeddings = embeddings[0]
        return embeddings if convert_to_tensor or not convert_to_numpy else embeddings.numpy()

    def encode_query(self, sentences, **kwargs):
        """:meth:`encode` with the ``query`` prompt (LLM2Vec gives queries an instruction) unless one is given."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
            kwargs["prompt_name"] = QUERY_PROMPT_NAME
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences, **kwargs):
        """:meth:`encode` with the ``document`` prompt (none: LLM2Vec encodes retrieval documents without one)."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
            kwargs["prompt_name"] = DOCUMENT_PROMPT_NAME
        return self.encode(sentences, **kwargs)

    def start_multi_process_pool(self, devices: Sequence[str] | None = None) -> dict[str, Any]:
        """One encoding process per device (default: every GPU, else 2 CPU processes); see ``multiprocess``."""
        from .multiprocess import start_multi_process_pool

        return start_multi_process_pool(self, devices)

    @staticmethod
    def stop_multi_process_pool(pool: dict[str, Any]) -> None:
        from .multiprocess import stop_multi_process_pool

        stop_multi_process_pool(pool)

    def _encode_in_processes(self, pairs, pool, devices, **kwargs):
        from .multiprocess import encode_multi_process, start_multi_process_pool, stop_multi_process_pool

        if pool is not None:
            return encode_multi_process(pairs, pool, **kwargs)
        pool = start_multi_process_pool(self, devices)
        try:
            return encode_multi_process(pairs, pool, **kwargs)
        finally:
            stop_multi_process_pool(pool)

    @torch.no_grad()
    def encode_tokenized(self, encoded: list[EncodedText], *, batch_size: int = 32,
                         device: str | torch.device | None = None, output_value: str = "sentence_embedding",
                         max_batch_tokens: int | None = None, packed: bool | None = None,
                         show_progress_bar: bool = False, progress: Any = None):
        """Run already tokenized inputs through the model: ``(n, dim)`` float32 CPU tensor in input order
        (a list of per-text tensors for ``token_embeddings``). ``progress``: anything with ``update(n)`` (a
        tqdm), told after each batch how many texts it held."""
        device = torch.device(device) if device is not None else module_device(self.model)
        if module_device(self.model) != device:
            self.model.to(device)
        self._check_frozen_weights()
        packed = self._default_packed(device) if packed is None else packed
        if packed:
            from .bidirectional import is_patched

            if not is_patched(self.model):
                # An unpatched model's attention would let the texts of a packed row see each other.
                raise ValueError("packed=True needs a model patched by llm2vec_fast (its attention keeps packed "
                                 "texts apart); this model is not patched: use packed=False")
        budget = next((b for b in (max_batch_tokens, self.max_batch_tokens) if b is not None),
                      batch_size * self.max_length)
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer, got {budget!r}")
        lengths = [len(e.input_ids) for e in encoded]
        batches = length_sorted_batches(lengths, batch_size=batch_size, max_batch_tokens=budget, packed=packed,
                                        max_padding=self.max_padding)
        results: list[Any] = [None] * len(encoded)
        bar = tqdm(total=len(encoded), desc="Encoding", unit="text", disable=not show_progress_bar)
        self.model.eval()
        pad_id = self.tokenizer.pad_token_id
        compiled = is_compiled(self.model)
        for batch in batches:
            inputs = collate([encoded[i] for i in batch], packed=packed, pad_id=pad_id)
            if compiled and not packed:
                inputs = _at_least_two_by_two(inputs, pad_id)
            inputs = inputs.to(device)
            backend, started = self._compile_pending, time.perf_counter()
            if backend is not None:
                bar.set_description(f"Encoding (compiling, torch.compile backend={backend})")
            with self._compile_settings():
                if output_value == "token_embeddings":
                    outputs = [states.cpu() for states in text_token_states(self.model, inputs)]
                else:
                    outputs = list(embed(self.model, inputs, self.pooling_mode).cpu())
            if backend is not None:
                self._compile_pending = None
                message = (f"compiling the model (torch.compile backend={backend}) took "
                           f"{time.perf_counter() - started:.1f} s, on the first batch")
                logger.info(message)
                bar.set_description("Encoding")
                if show_progress_bar:
                    bar.write(message)
            for index, output in zip(batch, outputs):  # (zip drops the copy _at_least_two_by_two added)
                results[index] = output
            bar.update(len(batch))
            if progress is not None:
                progress.update(len(batch))
        bar.close()
        return results if output_value == "token_embeddings" else torch.stack(results)

    def forward(self, sentence_feature: dict[str, torch.Tensor]) -> torch.Tensor:
        """llm2vec's forward: padded features (``input_ids``, ``attention_mask``, ``embed_mask``; optional
        ``position_ids``, else counted from each row's first real token) -> pooled ``(batch, dim)`` fp32, as
        ``encode`` pools them, left padding included.

        A compiled model runs as ``encode`` runs it (the same graph and settings, frozen after
        ``compile_model(freeze=True)``), so that a first call here compiles the graph ``encode`` then uses. Without
        gradients, a frozen graph refuses weights changed since it was compiled, as ``encode`` does; with gradients
        (training) inductor compiles a training graph, which reads the live weights and is never frozen."""
        features = dict(sentence_feature)
        if not self.skip_instruction:
            features.pop("embed_mask", None)
        if not torch.is_grad_enabled():
            self._check_frozen_weights()
        with self._compile_settings():
            return embed(self.model, features, self.pooling_mode)
