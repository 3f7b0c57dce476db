"""What the SimCSE and supervised contrastive stages share: examples, one-dataset batches, the tokenizing
collator with instruction-free pooling masks, the embedding step, and a ``Trainer`` that uses GradCache.

Data flow: rows -> :class:`ContrastiveExample` -> batches (each from one dataset) -> :class:`ContrastiveCollator`
(token ids, attention and embed masks per group: queries, positives, negatives) -> patched model with LoRA ->
``pool`` -> ``info_nce_loss``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..batching import PackedBatch, pack_batch, pad_batch
from ..builtin_models import resolve_model
from ..encoder import SEPARATOR, split_at_separator, wrap_for_model
from ..kernels import info_nce_loss
from ..kernels._dispatch import IMPLEMENTATIONS
from ..pooling import check_pooling_mode, pool, pool_packed
from .config import check_run_settings
from .gradcache import grad_cache_step, split_into_chunks
from .modeling import LoraSettings, add_lora, load_base_model, load_tokenizer, resolve_dtype

logger = logging.getLogger(__name__)

GROUPS = ("query", "positive", "negative")
LLM2VEC_CONFIG = "llm2vec_config.json"


# --------------------------------------------------------------------------------------------------------------------
# Examples and batches
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ContrastiveExample:
    """One training row: the query (with its instruction, possibly empty), its positive, an optional hard
    negative, and the dataset it comes from (batches never mix datasets)."""

    query: str
    positive: str
    negative: str | None = None
    instruction: str = ""
    dataset: str = "default"


def build_batches(examples: Sequence[ContrastiveExample], batch_size: int, *, seed: int = 0) -> list[list[ContrastiveExample]]:
    """Shuffle each dataset's rows, cut them into full batches of ``batch_size``, and shuffle the batches.

    A dataset's last rows that do not fill a batch are left out of this pass (their count is logged); a dataset
    smaller than one batch gives no batch. No dataset able to fill a batch is an error.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    by_dataset: dict[str, list[ContrastiveExample]] = defaultdict(list)
    for example in examples:
        by_dataset[example.dataset].append(example)
    rng = random.Random(seed)
    batches = []
    for name in sorted(by_dataset):
        rows = by_dataset[name]
        rng.shuffle(rows)
        full = len(rows) // batch_size
        batches.extend(rows[i * batch_size:(i + 1) * batch_size] for i in range(full))
        left = len(rows) - full * batch_size
        if full == 0:
            logger.warning("dataset %r has %d rows, fewer than one batch of %d: none of its rows are used",
                           name, len(rows), batch_size)
        elif left:
            logger.info("dataset %r: %d batches of %d; the %d remaining rows are left out", name, full, batch_size,
                        left)
    if not batches:
        sizes = {name: len(rows) for name, rows in by_dataset.items()}
        raise ValueError(f"no dataset fills one batch of {batch_size} rows (rows per dataset: {sizes}); "
                         "lower batch_size or add data")
    rng.shuffle(batches)
    mixed = {bool(ex.negative is not None) for batch in batches for ex in batch}
    if len(mixed) > 1:
        raise ValueError("some rows have a hard negative and others do not: give every row a negative, or none")
    return batches


def deal_to_ranks(batches: list[list[ContrastiveExample]], world_size: int) -> list[list[ContrastiveExample]]:
    """Global batches (``world_size`` x the per-process batch, each from one dataset) -> per-process batches in
    the order a sequential sampler deals them out under accelerate (item ``i`` goes to process
    ``i % world_size``): item ``g * world_size + r`` is process ``r``'s slice of global batch ``g``. So the
    batches the processes train on at one step, and gather for the loss, come from one dataset."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    dealt = []
    for batch in batches:
        if len(batch) % world_size:
            raise ValueError(f"a global batch of {len(batch)} rows does not split over {world_size} processes")
        size = len(batch) // world_size
        dealt.extend(batch[rank * size:(rank + 1) * size] for rank in range(world_size))
    return dealt


class BatchDataset(torch.utils.data.Dataset):
    """Each item is a whole batch (so that a batch never mixes datasets); use with a DataLoader batch size of 1."""

    def __init__(self, batches: list[list[ContrastiveExample]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[ContrastiveExample]:
        return self.batches[index]


# --------------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------------
def instruction_prefix(instruction: str) -> str:
    """How llm2vec's supervised data joins an instruction and a query: ``"{instruction}; {query}"``."""
    return f"{instruction.strip()}; " if instruction and instruction.strip() else ""


class ContrastiveCollator:
    """``[[example, ...]]`` -> per group (query, positive, negative) the fields of a
    :class:`~llm2vec_fast.batching.PaddedBatch` (``(batch, seq)``, padded on the left as the encoder pads) or,
    with ``packed``, of a :class:`~llm2vec_fast.batching.PackedBatch` (texts back to back, no padding).

    The embed mask marks the text's own tokens: a token counts when its characters reach past the end of the
    instruction prefix; tokens added by the tokenizer (BOS) do not. If truncation leaves a text no token of its
    own, the whole input is pooled (counted in ``self.stats``). ``wrap`` is the encoder's wrapping of the joined
    text (chat template of an instruct model, end marker for ``eos_token`` pooling), so that training pools the
    tokens encoding will pool.
    """

    def __init__(self, tokenizer, max_length: int, *, packed: bool = False, wrap: Callable[[str], str] | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the contrastive collator needs a fast tokenizer (character offsets)")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.packed = bool(packed)
        self.wrap = wrap or (lambda text: text)  # the encoder's per-model wrapping (``wrap_for_model``)
        self.stats = {"texts": 0, "truncated": 0, "instruction_filled_input": 0}

    def tokenize(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """(instruction, text) pairs -> one group's tensors, padded or packed."""
        joined = [split_at_separator(instruction_prefix(instruction) + SEPARATOR + text, self.wrap)
                  for instruction, text in pairs]
        texts = [full for full, _ in joined]
        boundaries = [boundary for _, boundary in joined]
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length,
                                 return_offsets_mapping=True)
        sequences, embed_masks = [], []
        for i, boundary in enumerate(boundaries):
            ids = list(encoded["input_ids"][i])
            offsets, sequence_ids = encoded["offset_mapping"][i], encoded.sequence_ids(i)
            mask = [int(seq is not None and (end > boundary or (start == end and start >= boundary)))
                    for (start, end), seq in zip(offsets, sequence_ids)]
            if not any(mask):
                self.stats["instruction_filled_input"] += 1
                mask = [1] * len(ids)
            if offsets and offsets[-1][1] < len(texts[i]) and sequence_ids[-1] is not None:
                self.stats["truncated"] += 1
            sequences.append(ids)
            embed_masks.append(mask)
        self.stats["texts"] += len(sequences)
        if self.packed:
            return dataclasses.asdict(pack_batch(sequences, embed_masks))
        return dataclasses.asdict(pad_batch(sequences, embed_masks, pad_id=self.tokenizer.pad_token_id))

    def __call__(self, items: list[list[ContrastiveExample]]) -> dict[str, dict[str, torch.Tensor]]:
        examples = [example for batch in items for example in batch]
        if not examples:
            raise ValueError("the contrastive collator got an empty batch")
        out = {
            "query": self.tokenize([(ex.instruction, ex.query) for ex in examples]),
            "positive": self.tokenize([("", ex.positive) for ex in examples]),
        }
        negatives = [ex.negative for ex in examples]
        if any(n is not None for n in negatives):
            if any(n is None for n in negatives):
                raise ValueError("a batch mixes rows with and without a hard negative")
            out["negative"] = self.tokenize([("", n) for n in negatives])
        return out


# --------------------------------------------------------------------------------------------------------------------
# Embedding and loss
# --------------------------------------------------------------------------------------------------------------------
def embed(model, inputs: dict[str, Any], pooling_mode: str) -> torch.Tensor:
    """A padded or packed group (the collator's output) -> pooled fp32 embeddings ``(texts, hidden)`` over the
    embed mask, exactly as :class:`~llm2vec_fast.LLM2Vec` encodes them."""
    if "cu_seqlens" in inputs:
        batch = _as_packed(inputs)
        hidden = _last_hidden_state(model(**batch.model_inputs()))
        return pool_packed(hidden, batch.cu_seqlens, pooling_mode, embed_mask=batch.embed_mask)
    hidden = _last_hidden_state(model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      position_ids=inputs.get("position_ids")))
    return pool(hidden, inputs["attention_mask"], pooling_mode, embed_mask=inputs["embed_mask"])


def texts_in_group(inputs: dict[str, Any]) -> int:
    """How many texts a padded or packed group holds."""
    return inputs["cu_seqlens"].shape[0] - 1 if "cu_seqlens" in inputs else inputs["input_ids"].shape[0]


def split_group(inputs: dict[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """A padded or packed group in chunks of at most ``chunk_size`` texts (for GradCache)."""
    if "cu_seqlens" not in inputs:
        return split_into_chunks(inputs, chunk_size)
    return [dataclasses.asdict(chunk) for chunk in _as_packed(inputs).split(chunk_size)]


def _as_packed(inputs: dict[str, Any]) -> PackedBatch:
    """The collator's packed group (a dict, so that the Trainer moves its tensors) as a :class:`PackedBatch`."""
    return PackedBatch(**{f.name: inputs[f.name] for f in dataclasses.fields(PackedBatch)})


def _last_hidden_state(outputs) -> torch.Tensor:
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


@dataclass
class LossSettings:
    scale: float = 20.0
    impl: str = "auto"
    gather_across_ranks: bool = True  # with several processes, score every query against the global batch


def _make_trainer_class():
    from transformers import Trainer

    class ContrastiveTrainer(Trainer):
        """``Trainer`` for InfoNCE on pooled embeddings. With ``chunk_size`` smaller than the batch, each step
        is a GradCache step (``training.gradcache``): the batch's activations never live at once."""

        def __init__(self, *args, pooling_mode: str, loss_settings: LossSettings, chunk_size: int | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.pooling_mode = pooling_mode
            self.loss_settings = loss_settings
            self.chunk_size = chunk_size

        def _loss(self, queries, positives, negatives=None):
            gather = self.loss_settings.gather_across_ranks and self.args.world_size > 1
            return info_nce_loss(queries, positives, negatives, scale=self.loss_settings.scale,
                                 gather_across_ranks=gather, impl=self.loss_settings.impl)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            reps = [embed(model, inputs[group], self.pooling_mode) for group in GROUPS if group in inputs]
            loss = self._loss(*reps)
            return (loss, {"loss": loss}) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            rows = texts_in_group(inputs["query"])
            if not self.chunk_size or self.chunk_size >= rows:
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            # Split on the host, then move each chunk: a packed group is cut at its cu_seqlens, which would
            # otherwise be read back from the device.
            groups = [[self._prepare_inputs(chunk) for chunk in split_group(inputs[group], self.chunk_size)]
                      for group in GROUPS if group in inputs]
            accumulation = self.current_gradient_accumulation_steps

            def loss_fn(*reps):
                return self._loss(*reps) / accumulation

            with self.compute_loss_context_manager():
                loss = grad_cache_step(lambda chunk: embed(model, chunk, self.pooling_mode), groups, loss_fn,
                                       backward=self.accelerator.backward,
                                       no_sync=getattr(model, "no_sync", None))
            return loss

    return ContrastiveTrainer


# --------------------------------------------------------------------------------------------------------------------
# Settings and the run shared by both stages
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ContrastiveSettings:
    """Settings both stages share; each stage's dataclass adds its data section and defaults."""

    model_name_or_path: str = ""
    output_dir: str = ""
    merge_adapters: list[str] = field(default_factory=list)  # e.g. the MNTP adapter, merged before the new LoRA
    lora: LoraSettings = field(default_factory=LoraSettings)
    pooling_mode: str = "mean"
    max_length: int = 128
    batch_size: int = 128  # rows per step on each process (queries; positives and negatives alike)
    chunk_size: int | None = None  # GradCache chunk (rows per forward); None: the whole batch at once
    packed: bool = True  # texts back to back without padding (varlen attention); false: left-padded batches
    scale: float = 20.0
    loss_impl: str = "auto"  # InfoNCE impl; "auto": Triton on CUDA, PyTorch elsewhere
    gather_across_ranks: bool = True
    attention_impl: str = "auto"  # attention kernel impl; "auto": Triton on CUDA, PyTorch SDPA elsewhere
    attention_dropout: float | None = None
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    training: dict[str, Any] = field(default_factory=dict)  # Hugging Face TrainingArguments

    def validate(self) -> None:
        check_run_settings(self, {"loss_impl": IMPLEMENTATIONS, "attention_impl": IMPLEMENTATIONS})
        check_pooling_mode(self.pooling_mode)
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (in-batch negatives), got {self.batch_size}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows or null, got {self.chunk_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        for key in ("output_dir", "per_device_train_batch_size", "seed"):
            if key in self.training:
                raise ValueError(f"set {key!r} at the top level of the config (batch_size for the batch), "
                                 "not in training")


def model_wrapping(model_name_or_path: str, pooling_mode: str) -> Callable[[str], str]:
    """The encoder's text wrapping for this model and pooling mode (see ``wrap_for_model``)."""
    from transformers import AutoConfig

    model_type = getattr(AutoConfig.from_pretrained(resolve_model(model_name_or_path)), "model_type", None)
    return functools.partial(wrap_for_model, name_or_path=model_name_or_path, model_type=model_type,
                             pooling_mode=pooling_mode)


def _kernel_impl(setting: str) -> str:
    """A stage's ``"auto"``: our Triton kernels on CUDA, PyTorch elsewhere (never the slow Triton interpreter)."""
    if setting != "auto":
        return setting
    return "auto" if torch.cuda.is_available() else "torch"


def _training_arguments(settings: ContrastiveSettings):
    from transformers import TrainingArguments

    values = dict(
        output_dir=settings.output_dir,
        per_device_train_batch_size=1,  # one item = one whole batch (BatchDataset)
        remove_unused_columns=False,
        label_names=[],
        prediction_loss_only=True,
        report_to="none",
        seed=settings.seed,
        dataloader_drop_last=False,
    )
    values.update(settings.training)
    try:
        return TrainingArguments(**values)
    except TypeError as error:
        raise ValueError(f"bad setting in the config's 'training' section (TrainingArguments): {error}") from None


def build_model(settings: ContrastiveSettings):
    """Base model, earlier adapters merged, patched bidirectional (with the stage's attention dropout), new LoRA."""
    model = load_base_model(
        settings.model_name_or_path,
        dtype=resolve_dtype(settings.dtype),
        merge_adapters=settings.merge_adapters,
        attention_dropout=settings.attention_dropout,
        attention_impl=_kernel_impl(settings.attention_impl),
    )
    return add_lora(model, settings.lora, gradient_checkpointing=settings.gradient_checkpointing)


@dataclass
class ContrastiveRun:
    output_dir: str
    log_history: list[dict[str, Any]]
    trainer: Any


def train_contrastive(settings: ContrastiveSettings, examples: list[ContrastiveExample], *,
                      stage: str) -> ContrastiveRun:
    """Train a new LoRA adapter with InfoNCE on ``examples``; save it, the tokenizer and ``llm2vec_config.json``."""
    from transformers import set_seed

    settings.validate()
    args = _training_arguments(settings)
    set_seed(settings.seed)
    tokenizer = load_tokenizer(settings.model_name_or_path)
    tokenizer.padding_side = "left"
    world_size = max(1, args.world_size)
    batches = build_batches(examples, settings.batch_size * world_size, seed=settings.seed)
    if world_size > 1:
        # Batches are drawn at the global size and each process takes its slice, in step: with a random
        # sampler the processes would each draw a batch of their own, from different datasets, and the
        # gathered loss would score queries against another dataset's documents.
        if args.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(f"train_sampling_strategy {args.train_sampling_strategy!r} cannot keep the processes' "
                             "batches in step; the contrastive stages shuffle their batches themselves")
        args.train_sampling_strategy = "sequential"
        batches = deal_to_ranks(batches, world_size)
    collator = ContrastiveCollator(tokenizer, settings.max_length, packed=settings.packed,
                                   wrap=model_wrapping(settings.model_name_or_path, settings.pooling_mode))
    collator(batches[:1])  # tokenizer problems show before any model is loaded
    collator.stats = dict.fromkeys(collator.stats, 0)  # count what training tokenizes, not this probe
    model = build_model(settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s: %d batches of %d rows%s, %d trainable parameters, scale %g, loss impl %s", stage, len(batches),
                settings.batch_size, f" (GradCache chunks of {settings.chunk_size})" if settings.chunk_size else "",
                trainable, settings.scale, _kernel_impl(settings.loss_impl))
    trainer = _make_trainer_class()(
        model=model, args=args, train_dataset=BatchDataset(batches), data_collator=collator,
        processing_class=tokenizer, pooling_mode=settings.pooling_mode, chunk_size=settings.chunk_size,
        loss_settings=LossSettings(scale=settings.scale, impl=_kernel_impl(settings.loss_impl),
                                   gather_across_ranks=settings.gather_across_ranks),
    )
    trainer.train()
    stats = collator.stats
    if stats["truncated"] or stats["instruction_filled_input"]:
        logger.info("%s: of %d texts tokenized, %d were cut at max_length %d; %d kept no token of their own after "
                    "the instruction and were pooled whole", stage, stats["texts"], stats["truncated"],
                    settings.max_length, stats["instruction_filled_input"])
    trainer.save_model(settings.output_dir)
    trainer.save_state()  # trainer_state.json, with the loss history
    if trainer.args.should_save:
        encoder_config = {"pooling_mode": settings.pooling_mode, "max_length": settings.max_length,
                          "doc_max_length": 400, "skip_instruction": True}
        with open(os.path.join(settings.output_dir, LLM2VEC_CONFIG), "w", encoding="utf-8") as handle:
            json.dump(encoder_config, handle, indent=4)
        with open(os.path.join(settings.output_dir, f"{stage}_settings.json"), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(settings), handle, indent=2, default=str)
    logger.info("Saved the %s adapter and tokenizer to %s", stage, settings.output_dir)
    return ContrastiveRun(output_dir=settings.output_dir, log_history=list(trainer.state.log_history),
                          trainer=trainer)
