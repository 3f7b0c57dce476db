"""Building the model every stage trains: base model, earlier adapters merged, patched bidirectional, new LoRA."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..builtin_models import resolve_model
from ..bidirectional import patch

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where the device computes it natively (CUDA with bf16 support), fp32 elsewhere."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MODEL_DTYPES = ("auto", *DTYPES)  # the names a config or a command line may give


def resolve_dtype(name: str | None) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def load_tokenizer(model_name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_name_or_path: str,
    *,
    model_class: Any = None,
    dtype: torch.dtype | str | None = "auto",
    merge_adapters: list[str] | tuple[str, ...] = (),
    bidirectional: bool = True,
    attention_dropout: float | None = None,
    attention_impl: str = "auto",
    **model_kwargs: Any,
):
    """Load a base model, merge earlier stages' LoRA adapters into it, and patch it bidirectional.

    ``model_class`` defaults to ``AutoModel`` (hidden states only); MNTP passes ``AutoModelForCausalLM``.
    ``attention_impl`` goes to ``patch`` (``"auto"``, ``"triton"`` or ``"torch"``).
    """
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


def add_lora(model, settings: LoraSettings, *, gradient_checkpointing: bool = False):
    """Wrap ``model`` with a new trainable LoRA adapter (peft)."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    return get_peft_model(model, config)
