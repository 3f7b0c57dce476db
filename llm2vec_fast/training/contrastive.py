"""What the SimCSE and supervised contrastive stages share: the model, the run, and the encoder config.

Data flow: rows (``datasets``) -> :class:`~llm2vec_fast.training.samplers.OneDatasetBatchSampler` (every global
batch from one dataset) -> :class:`~llm2vec_fast.training.collators.ContrastiveCollator` (token ids, attention and
embed masks per group and chunk) -> patched model with LoRA -> ``pool`` ->
:class:`~llm2vec_fast.training.losses.InfoNCELoss` (or, with ``chunk_size`` below the batch,
:class:`~llm2vec_fast.training.losses.CachedInfoNCELoss`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Callable

from ..builtin_models import resolve_model
from ..encoder import ENCODER_KEYS, LLM2VEC_CONFIG
from ..pipeline import wrap_for_model
from .collators import ContrastiveCollator
from .losses import CachedInfoNCELoss, InfoNCELoss, check_matryoshka
from .modeling import base_model_for, kernel_impl, load_tokenizer, lora_for
from .samplers import OneDatasetBatchSampler
from .trainer import LLM2VecTrainer, TrainingRun, add_wall_clock_guard, check_torch_compile, run_training

logger = logging.getLogger(__name__)


def model_wrapping(model_name_or_path: str, pooling_mode: str) -> Callable[[str], str]:
    """The encoder's text wrapping for this model and pooling mode (see ``wrap_for_model``)."""
    from transformers import AutoConfig

    model_type = getattr(AutoConfig.from_pretrained(resolve_model(model_name_or_path)), "model_type", None)
    return functools.partial(wrap_for_model, name_or_path=model_name_or_path, model_type=model_type,
                             pooling_mode=pooling_mode)


def build_model(model_args):
    """Base model, earlier adapters merged, patched bidirectional (with the stage's attention dropout), new LoRA."""
    return lora_for(base_model_for(model_args), model_args)


def contrastive_loss(args, batch_size: int) -> InfoNCELoss:
    """InfoNCE, through GradCache when ``chunk_size`` is below the per-process batch."""
    cached = args.chunk_size is not None and args.chunk_size < batch_size
    return (CachedInfoNCELoss if cached else InfoNCELoss)(
        args.pooling_mode, scale=args.scale, gather_across_ranks=args.gather_across_ranks,
        impl=kernel_impl(args.loss_impl), matryoshka_dims=args.matryoshka_dims,
        matryoshka_weights=args.matryoshka_weights)


def check_matryoshka_fits(model_name_or_path: str, args) -> None:
    """``matryoshka_dims`` within the model's embedding size (its ``hidden_size``), before any weight loads."""
    if args.matryoshka_dims is None:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model_name_or_path)).get_text_config()
    check_matryoshka(args.matryoshka_dims, args.matryoshka_weights, embedding_dim=config.hidden_size)


def train_contrastive(model_args, data_args, args, training_args, rows, *, stage: str) -> TrainingRun:
    """Train a new LoRA adapter with InfoNCE on ``rows`` (a ``datasets.Dataset`` with query, positive,
    optional negative, instruction and dataset); save it, the tokenizer and ``llm2vec_config.json``."""
    from transformers import set_seed

    set_seed(training_args.seed)
    check_matryoshka_fits(model_args.model_name_or_path, args)
    check_torch_compile(training_args)  # before any model is loaded
    if training_args.per_device_train_batch_size < 2:
        raise ValueError("per_device_train_batch_size must be at least 2 (in-batch negatives), got "
                         f"{training_args.per_device_train_batch_size}")
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    tokenizer.padding_side = "left"
    batch_size = training_args.per_device_train_batch_size
    texts = None
    if args.no_duplicates:
        negatives = rows["negative"] if "negative" in rows.column_names else [None] * len(rows)
        texts = list(zip(rows["query"], rows["positive"], negatives))
    sampler = OneDatasetBatchSampler(rows["dataset"], batch_size, world_size=max(1, training_args.world_size),
                                     seed=training_args.seed, texts=texts)
    collator = ContrastiveCollator(tokenizer, args.max_length, packed=args.packed, chunk_size=args.chunk_size,
                                   wrap=model_wrapping(model_args.model_name_or_path, args.pooling_mode),
                                   text_ids=args.mask_false_negatives)
    collator([rows[i] for i in next(iter(sampler))])  # tokenizer problems show before any model is loaded
    collator.stats = dict.fromkeys(collator.stats, 0)  # count what training tokenizes, not this probe
    model = build_model(model_args)
    loss = contrastive_loss(args, batch_size)
    logger.info("%s: %d batches of %d rows%s, %d trainable parameters, scale %g, loss impl %s%s", stage, len(sampler),
                batch_size, f" (GradCache chunks of {args.chunk_size})" if isinstance(loss, CachedInfoNCELoss) else "",
                sum(p.numel() for p in model.parameters() if p.requires_grad), args.scale, loss.impl,
                f", Matryoshka dims {list(loss.matryoshka_dims)} weights {list(loss.matryoshka_weights)}"
                if loss.matryoshka_dims else "")
    trainer = LLM2VecTrainer(model=model, args=training_args, train_dataset=rows, data_collator=collator,
                             processing_class=tokenizer, loss=loss, batch_sampler=sampler)
    add_wall_clock_guard(trainer, args.max_wall_seconds)
    run = run_training(trainer, stage, (model_args, data_args, args, training_args))
    stats = collator.stats
    if args.mask_false_negatives:
        logger.info("%s: %d (query, document) pairs were false negatives (the same text as the query's positive) "
                    "and left out of the loss%s", stage, stats["false_negatives"],
                    "" if args.no_duplicates else " (no_duplicates is off)")
    if stats["truncated"] or stats["instruction_filled_input"]:
        logger.info("%s: of %d texts tokenized, %d were cut at max_length %d; %d kept no token of their own after "
                    "the instruction and were pooled whole", stage, stats["texts"], stats["truncated"],
                    args.max_length, stats["instruction_filled_input"])
    if training_args.should_save:
        encoder_config = {"pooling_mode": args.pooling_mode, "max_length": args.max_length,
                          "doc_max_length": args.doc_max_length, "skip_instruction": True}
        with open(os.path.join(training_args.output_dir, LLM2VEC_CONFIG), "w", encoding="utf-8") as handle:
            json.dump({key: encoder_config[key] for key in ENCODER_KEYS}, handle, indent=4)
    return run
