"""Stage 1 of LLM2Vec: masked next-token prediction (MNTP) with a LoRA adapter on a bidirectional decoder.

Data flow: text rows -> tokens concatenated and cut into blocks (``text_data``) -> ``MNTPCollator`` masks a
fraction of the tokens (labels = the original ids there, ``-100`` elsewhere) -> the base model's body, patched
bidirectional (``llm2vec_fast.patch``) and wrapped with LoRA, gives the last hidden states -> the fused
``masked_next_token_loss`` applies the LM head to the labelled rows only (hidden state at ``i - 1`` predicts
the token at ``i``), never building ``(tokens, vocab)`` logits.

The runner is Hugging Face's ``Trainer`` (checkpoints, resume, logging, DDP through ``torchrun``; FSDP is not
supported: the LM head is applied outside the wrapped module, and a sharded tied head would not be gathered for
it). The model it trains is the PEFT-wrapped body (``AutoModel``), so the adapter it saves is keyed like llm2vec's
``-mntp`` adapters and loads with ``LLM2Vec.from_pretrained(base, peft_model_name_or_path=output_dir)`` or
``LLM2Vec.from_pretrained(output_dir)`` (the directory also holds the base config and the tokenizer).

Command line: ``llm2vec-fast train mntp --config training/mntp/smollm2_135m.json [--set key=value ...]``.
Relative paths in the config (data files, output_dir) are taken against the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels._dispatch import IMPLEMENTATIONS
from ..kernels.mntp_loss import masked_next_token_loss, masked_next_token_loss_reference
from .config import add_config_arguments, check_run_settings, config_to_dataclass, load_config
from .modeling import LoraSettings, add_lora, load_base_model, load_tokenizer, resolve_dtype
from .text_data import load_text_dataset, tokenize_into_blocks

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MASK_TOKEN_TYPES = ("blank", "eos", "mask")
REPLACEMENTS = ("default", "all_mask")
LOSSES = ("fused", "full_logits")


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MNTPDataSettings:
    """Where the text comes from and how it is cut. Exactly one of ``train_files`` / ``dataset_name``."""

    train_files: list[str] | None = None  # .txt/.jsonl, optionally .gz; relative paths against the current dir
    dataset_name: str | None = None  # or a datasets.load_dataset name / local script
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"  # the text field of JSON lines / the dataset column
    block_size: int = 512  # llm2vec's max_seq_length
    max_train_blocks: int | None = None  # keep only the first N blocks (smoke runs)
    validation_fraction: float = 0.0  # held-out share of the blocks, evaluated at the Trainer's eval steps
    num_proc: int | None = None  # tokenization processes


@dataclass
class MNTPSettings:
    model_name_or_path: str = ""
    output_dir: str = ""
    data: MNTPDataSettings = field(default_factory=MNTPDataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    mask_probability: float = 0.2  # llm2vec's mlm_probability (0.8 for Mistral in the paper)
    replacement: str = "default"  # llm2vec's data_collator_type: "default" 80/10/10 or "all_mask"
    mask_token_type: str = "blank"  # "blank" ("_"), "eos", or "mask" (an added "<mask>" token)
    dtype: str = "auto"  # bf16 where the device has it, else fp32
    gradient_checkpointing: bool = True
    merge_adapters: list[str] = field(default_factory=list)  # earlier adapters merged into the base first
    attention_impl: str = "auto"  # our attention kernel's impl; "auto": Triton on CUDA, PyTorch SDPA elsewhere
    loss: str = "fused"  # "fused" (our kernel) or "full_logits" (plain LM head + cross-entropy, for comparison)
    loss_impl: str = "auto"  # the fused loss's impl; "auto": Triton on CUDA, chunked PyTorch elsewhere
    resume_from_checkpoint: Any = None  # None, true (latest in output_dir) or a checkpoint directory
    training: dict[str, Any] = field(default_factory=dict)  # Hugging Face TrainingArguments

    def validate(self) -> None:
        check_run_settings(self, {"replacement": REPLACEMENTS, "mask_token_type": MASK_TOKEN_TYPES, "loss": LOSSES,
                                  "loss_impl": IMPLEMENTATIONS, "attention_impl": IMPLEMENTATIONS})
        if not 0.0 < self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in (0, 1], got {self.mask_probability}")
        if not 0.0 <= self.data.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {self.data.validation_fraction}")
        if "output_dir" in self.training:
            raise ValueError("set output_dir at the top level of the config, not in training")


def settings_from_config(config: dict[str, Any]) -> MNTPSettings:
    settings = config_to_dataclass(MNTPSettings, config)
    if isinstance(settings.data, dict):  # pragma: no cover - config_to_dataclass builds it
        settings.data = config_to_dataclass(MNTPDataSettings, settings.data)
    settings.validate()
    return settings


# ---------------------------------------------------------------------------------------------------------------
# Mask token and collator
# ---------------------------------------------------------------------------------------------------------------


def resolve_mask_token(tokenizer, mask_token_type: str) -> tuple[int, bool]:
    """Set ``tokenizer.mask_token`` as llm2vec's ``mask_token_type`` does; return (its id, whether it was added).

    ``blank``: the token ``_``; ``eos``: the eos token; ``mask``: a new ``<mask>`` token (the embedding matrix
    must then grow by one row). Raises ``ValueError`` when the tokenizer has no such single token.
    """
    if mask_token_type == "blank":
        token_id = tokenizer.convert_tokens_to_ids("_")
        unk = tokenizer.unk_token_id
        if token_id is None or (unk is not None and token_id == unk and tokenizer.unk_token != "_"):
            raise ValueError(
                "mask_token_type 'blank' needs '_' as a single token in the vocabulary, and this tokenizer has "
                "none; use mask_token_type 'eos' or 'mask'"
            )
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
    raise ValueError(f"mask_token_type must be one of {MASK_TOKEN_TYPES}, got {mask_token_type!r}")


@dataclass
class MNTPCollator:
    """Pads token blocks and masks them for MNTP.

    A fraction ``mask_probability`` of the tokens, never special or pad tokens, get their id as label (all
    other labels are ``ignore_index``) and are replaced: ``"default"`` 80% by the mask token, 10% by a random
    token, 10% unchanged (BERT's scheme, Hugging Face's ``DataCollatorForLanguageModeling``); ``"all_mask"``
    all by the mask token (llm2vec's ``DataCollatorForLanguageModelingWithFullMasking``).

    Features: dicts with ``input_ids`` and optionally ``attention_mask`` and ``special_tokens_mask``.
    Returns ``input_ids``, ``attention_mask`` and ``labels``, all ``(batch, longest)`` int64 (right padded).
    """

    mask_token_id: int
    pad_token_id: int
    vocab_size: int  # rows of the LM head: token ids must lie in [0, vocab_size)
    special_token_ids: tuple[int, ...] = ()
    mask_probability: float = 0.2
    replacement: str = "default"
    ignore_index: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    generator: torch.Generator | None = None
    # Random replacements are drawn from [0, random_token_count): the tokenizer's real tokens, not the padding
    # rows some models add to their vocabulary (Qwen2's 151,936 rows for 151,665 tokens); None: vocab_size.
    random_token_count: int | None = None

    def __post_init__(self):
        if not 0.0 < self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in (0, 1], got {self.mask_probability}")
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {self.replacement!r}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask token id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")
        if self.random_token_count is not None and not 0 < self.random_token_count <= self.vocab_size:
            raise ValueError(f"random_token_count must be in (0, vocab_size={self.vocab_size}], got "
                             f"{self.random_token_count}")

    @classmethod
    def from_tokenizer(cls, tokenizer, mask_token_id: int, vocab_size: int, **kwargs) -> "MNTPCollator":
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (set tokenizer.pad_token, e.g. to the eos token)")
        kwargs.setdefault("random_token_count", min(len(tokenizer), vocab_size))
        return cls(mask_token_id=mask_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size,
                   special_token_ids=tuple(tokenizer.all_special_ids), **kwargs)

    def _bernoulli(self, p: float, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator) < p

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("MNTPCollator got an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        longest = max(lengths)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, longest, dtype=torch.long)
        special = torch.ones(batch, longest, dtype=torch.bool)  # padding counts as special: never masked
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            mask = feature.get("attention_mask")
            attention_mask[row, :length] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
            given = feature.get("special_tokens_mask")
            special[row, :length] = False if given is None else torch.as_tensor(given, dtype=torch.bool)
        special |= attention_mask == 0
        if self.special_token_ids:
            special |= torch.isin(input_ids, torch.tensor(self.special_token_ids, dtype=torch.long))
        if (input_ids < 0).any() or (input_ids >= self.vocab_size).any():
            bad = input_ids[(input_ids < 0) | (input_ids >= self.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")

        masked = self._bernoulli(self.mask_probability, input_ids.shape) & ~special
        labels = torch.where(masked, input_ids, torch.full_like(input_ids, self.ignore_index))
        inputs = input_ids.clone()
        if self.replacement == "all_mask":
            inputs[masked] = self.mask_token_id
        else:
            to_mask = masked & self._bernoulli(0.8, input_ids.shape)
            inputs[to_mask] = self.mask_token_id
            to_random = masked & ~to_mask & self._bernoulli(0.5, input_ids.shape)
            inputs[to_random] = torch.randint(self.random_token_count or self.vocab_size, (int(to_random.sum()),),
                                              generator=self.generator)
        return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------
# Loss and Trainer
# ---------------------------------------------------------------------------------------------------------------


def _kernel_impl(setting: str) -> str:
    """The stage's ``"auto"``: our Triton kernels on CUDA, PyTorch elsewhere (never the slow Triton interpreter)."""
    if setting != "auto":
        return setting
    return "auto" if torch.cuda.is_available() else "torch"


class MNTPHead:
    """The LM head of a causal LM, applied inside the loss: weight ``(vocab, hidden)``, optional bias, softcap."""

    def __init__(self, causal_lm, *, loss: str = "fused", impl: str = "auto"):
        head = causal_lm.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(causal_lm).__name__} has no output embeddings (LM head) to train MNTP with")
        self.module = head
        self.module.requires_grad_(False)
        config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") \
            else causal_lm.config
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)
        self.loss = loss
        self.impl = impl

    @property
    def vocab_size(self) -> int:
        return self.module.weight.shape[0]

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        bias = getattr(self.module, "bias", None)
        if weight.device != hidden.device:
            self.module.to(hidden.device)
            weight, bias = self.module.weight, getattr(self.module, "bias", None)
        if self.loss == "full_logits":
            return masked_next_token_loss_reference(hidden, weight, labels, bias=bias, shift=1,
                                                    ignore_index=IGNORE_INDEX, logit_softcap=self.logit_softcap)
        return masked_next_token_loss(hidden, weight, labels, bias=bias, shift=1, ignore_index=IGNORE_INDEX,
                                      logit_softcap=self.logit_softcap, impl=self.impl)


def _make_trainer_class():
    from transformers import Trainer

    class MNTPTrainer(Trainer):
        """``Trainer`` whose model is the PEFT-wrapped body; the LM head is applied in the fused loss."""

        loss_is_scaled_for_ga = False  # per-micro-batch mean; Trainer divides by the accumulation steps

        def __init__(self, *args, mntp_head: MNTPHead, **kwargs):
            super().__init__(*args, **kwargs)
            self.mntp_head = mntp_head
            # compute_loss does not use num_items_in_batch: without this the Trainer would count the labelled
            # tokens (and all-gather the count under DDP) on every step for nothing.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
            loss = self.mntp_head(hidden, labels)
            return (loss, {"loss": loss}) if return_outputs else loss

    return MNTPTrainer


# ---------------------------------------------------------------------------------------------------------------
# Building and running
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MNTPRun:
    output_dir: str
    log_history: list[dict[str, Any]]
    trainer: Any


def _training_arguments(settings: MNTPSettings):
    from transformers import TrainingArguments

    values = dict(
        output_dir=settings.output_dir,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        report_to="none",
        gradient_checkpointing=False,  # enabled on the body before LoRA (see add_lora)
    )
    values.update(settings.training)
    try:
        return TrainingArguments(**values)
    except TypeError as error:
        raise ValueError(f"bad setting in the config's 'training' section (TrainingArguments): {error}") from None


def build_mntp_model(settings: MNTPSettings, tokenizer):
    """Base causal LM, patched bidirectional, the mask token resolved, LoRA on its body.

    Returns ``(peft_body, head, mask_token_id)``.
    """
    from transformers import AutoModelForCausalLM

    mask_token_id, added = resolve_mask_token(tokenizer, settings.mask_token_type)
    causal_lm = load_base_model(
        settings.model_name_or_path,
        model_class=AutoModelForCausalLM,
        dtype=resolve_dtype(settings.dtype),
        merge_adapters=settings.merge_adapters,
        attention_impl=_kernel_impl(settings.attention_impl),
    )
    if added:
        logger.info("Resizing the embeddings to %d tokens for the added mask token", len(tokenizer))
        causal_lm.resize_token_embeddings(len(tokenizer))
    head = MNTPHead(causal_lm, loss=settings.loss, impl=_kernel_impl(settings.loss_impl))
    vocab = head.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LM head only {vocab} rows: token ids "
                         f"would fall outside the vocabulary")
    body = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if body is None or body is causal_lm:
        body = getattr(causal_lm, causal_lm.base_model_prefix)
    peft_body = add_lora(body, settings.lora, gradient_checkpointing=settings.gradient_checkpointing)
    return peft_body, head, mask_token_id


def prepare_blocks(settings: MNTPSettings, tokenizer):
    data = settings.data
    dataset = load_text_dataset(
        files=data.train_files, dataset_name=data.dataset_name, dataset_config_name=data.dataset_config_name,
        split=data.dataset_split, text_column=data.text_column,
    )
    blocks = tokenize_into_blocks(dataset, tokenizer, data.block_size, num_proc=data.num_proc,
                                  max_blocks=data.max_train_blocks)
    if data.validation_fraction > 0:
        if len(blocks) < 2:
            raise ValueError(f"validation_fraction needs at least 2 blocks, the text gives {len(blocks)}")
        split = blocks.train_test_split(test_size=data.validation_fraction, seed=0)
        return split["train"], split["test"]
    return blocks, None


def _write_base_config(settings: MNTPSettings, output_dir: str) -> None:
    """The base model's own (unpatched) config beside the adapter, as llm2vec's ``-mntp`` repositories have it."""
    from transformers import AutoConfig

    from ..builtin_models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(settings.model_name_or_path))
    config.save_pretrained(output_dir)


def train_mntp(settings: MNTPSettings) -> MNTPRun:
    """Run the MNTP stage; returns the output directory and the Trainer's log history."""
    from transformers import set_seed

    settings.validate()
    args = _training_arguments(settings)
    set_seed(args.seed)
    tokenizer = load_tokenizer(settings.model_name_or_path)
    train_blocks, eval_blocks = prepare_blocks(settings, tokenizer)  # text errors before any model is loaded
    peft_body, head, mask_token_id = build_mntp_model(settings, tokenizer)
    collator = MNTPCollator.from_tokenizer(
        tokenizer, mask_token_id, head.vocab_size,
        mask_probability=settings.mask_probability, replacement=settings.replacement,
    )
    # Fail on bad token ids / mask settings before the first step, not in the middle of training.
    probe = collator([train_blocks[i] for i in range(min(len(train_blocks), 2))])
    if (probe["labels"] != IGNORE_INDEX).sum() == 0:
        logger.warning("the first batch has no masked token: mask_probability %.3g may be too low",
                       settings.mask_probability)
    trainable = sum(p.numel() for p in peft_body.parameters() if p.requires_grad)
    logger.info("MNTP: %d training blocks of %d tokens, %d trainable parameters, loss %s (impl %s)",
                len(train_blocks), settings.data.block_size, trainable, settings.loss, head.impl)

    trainer_class = _make_trainer_class()
    save_tokenizer = load_tokenizer(settings.model_name_or_path)  # saved without the training-only mask token
    trainer = trainer_class(
        model=peft_body, args=args, train_dataset=train_blocks, eval_dataset=eval_blocks,
        data_collator=collator, processing_class=save_tokenizer, mntp_head=head,
    )
    trainer.train(resume_from_checkpoint=settings.resume_from_checkpoint)
    trainer.save_model(settings.output_dir)
    if trainer.args.should_save:
        _write_base_config(settings, settings.output_dir)
        with open(os.path.join(settings.output_dir, "mntp_settings.json"), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(settings), handle, indent=2, default=str)
    logger.info("Saved the MNTP adapter and tokenizer to %s", settings.output_dir)
    return MNTPRun(output_dir=settings.output_dir, log_history=list(trainer.state.log_history), trainer=trainer)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def main(args) -> int:
    settings = settings_from_config(load_config(args.config, args.overrides))
    train_mntp(settings)
    return 0
