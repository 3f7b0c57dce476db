"""Building the model every stage trains: base model, earlier adapters merged, patched bidirectional, new LoRA."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..bidirectional import patch
from ..builtin_models import resolve_model
from ..dtypes import DTYPES, MODEL_DTYPES, default_dtype, resolve_dtype  # noqa: F401  (re-exported: old imports)

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_tokenizer(model_name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_name_or_path: str, *, model_class: Any = None, dtype: torch.dtype | str | None = "auto",
                    merge_adapters: list[str] | tuple[str, ...] = (), bidirectional: bool = True,
                    attention_dropout: float | None = None, attention_impl: str = "auto", **model_kwargs: Any):
    """Load a base model, merge earlier stages' LoRA adapters into it, and patch it bidirectional.

    ``model_class`` defaults to ``AutoModel`` (hidden states only); MNTP passes ``AutoModelForCausalLM``.
    ``attention_impl`` goes to ``patch`` (``"auto"``, ``"triton"`` or ``"torch"``)."""
    from transformers import AutoModel

    if isinstance(dtype, str) or dtype is None:
        dtype = resolve_dtype(dtype)
    model_class = model_class or AutoModel
    model = model_class.from_pretrained(resolve_model(model_name_or_path), dtype=dtype, **model_kwargs)
    # Adapters of every stage (and llm2vec's) are keyed on the decoder body, as AutoModel loads it: merge them
    # into the body, also inside a ...ForCausalLM, whose extra prefix would otherwise leave them unloaded.
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    for adapter in merge_adapters:
        from peft import PeftModel

        logger.info("Merging adapter %s into the base model", adapter)
        merged = PeftModel.from_pretrained(body, adapter).merge_and_unload()
        if body is model:
            model = body = merged
    if bidirectional:
        patch(model, attention_impl=attention_impl, attention_dropout=attention_dropout)
    return model


def add_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             target_modules: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS):
    """Wrap ``model`` with a new trainable LoRA adapter (peft)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    return get_peft_model(model, config)


def base_model_for(model_args, **kwargs):
    """``load_base_model`` with the model settings of :class:`~llm2vec_fast.training.arguments.ModelArguments`
    (``kwargs``: ``model_class``...)."""
    return load_base_model(model_args.model_name_or_path, dtype=model_args.dtype,
                           merge_adapters=model_args.merge_adapters, attention_dropout=model_args.attention_dropout,
                           attention_impl=kernel_impl(model_args.attention_impl), **kwargs)


def lora_for(model, model_args):
    """``add_lora`` with the LoRA settings of :class:`~llm2vec_fast.training.arguments.ModelArguments`."""
    return add_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                    target_modules=model_args.lora_target_modules)


def kernel_impl(setting: str) -> str:
    """A stage's ``"auto"``: our Triton kernels on CUDA, PyTorch elsewhere (never the slow Triton interpreter)."""
    if setting != "auto":
        return setting
    return "auto" if torch.cuda.is_available() else "torch"
