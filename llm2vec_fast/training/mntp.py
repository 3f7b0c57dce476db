"""Stage 1 of LLM2Vec: masked next-token prediction (MNTP) with a LoRA adapter on a bidirectional decoder.

Data flow: text rows -> tokens concatenated and cut into blocks (``data``) -> :class:`MNTPDataCollator` masks a
fraction of the tokens (labels = the original ids there, ``-100`` elsewhere) -> :class:`MNTPModel`: the base
model's body, patched bidirectional and wrapped with LoRA, gives the last hidden states, and the fused
``masked_next_token_loss`` applies the frozen LM head to the labelled rows only (hidden state at ``i - 1``
predicts the token at ``i``), never building ``(tokens, vocab)`` logits.

The runner is :class:`~llm2vec_fast.training.trainer.LLM2VecTrainer` (checkpoints, resume, logging; DDP and FSDP
as accelerate launches them: the head and loss live inside the module they wrap). The adapter it saves is the
PEFT body's, keyed like llm2vec's ``-mntp`` adapters: it loads with ``LLM2Vec.from_pretrained(base,
peft_model_name_or_path=output_dir)`` or ``LLM2Vec.from_pretrained(output_dir)`` (the directory also holds the
base config and the tokenizer).

``llm2vec-fast train mntp --config training/mntp/smollm2_135m.json [--learning_rate 1e-4 ...]``.
"""

from __future__ import annotations

import logging

from . import arguments
from .collators import IGNORE_INDEX, MNTPDataCollator, resolve_mask_token
from .data import load_text_dataset, tokenize_into_blocks
from .losses import MNTPLoss, MNTPModel
from .modeling import base_model_for, kernel_impl, load_tokenizer, lora_for
from .trainer import LLM2VecTrainer, TrainingRun, add_wall_clock_guard, check_torch_compile, run_training

logger = logging.getLogger(__name__)


def build_mntp_model(model_args, mntp_args, tokenizer) -> MNTPModel:
    """Base causal LM, patched bidirectional, the mask token resolved (set on ``tokenizer``), LoRA on its body,
    and the LM head in the loss."""
    from transformers import AutoModelForCausalLM

    _, added = resolve_mask_token(tokenizer, mntp_args.mask_token_type)
    causal_lm = base_model_for(model_args, model_class=AutoModelForCausalLM)
    if added:
        logger.info("Resizing the embeddings to %d tokens for the added mask token", len(tokenizer))
        causal_lm.resize_token_embeddings(len(tokenizer))
    loss = MNTPLoss.from_causal_lm(causal_lm, full_logits=mntp_args.loss == "full_logits",
                                   impl=kernel_impl(mntp_args.loss_impl))
    if len(tokenizer) > loss.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LM head only {loss.vocab_size} rows: "
                         "token ids would fall outside the vocabulary")
    body = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if body is None or body is causal_lm:
        body = getattr(causal_lm, causal_lm.base_model_prefix)
    return MNTPModel(lora_for(body, model_args), loss)


def prepare_blocks(data_args, mntp_args, tokenizer):
    blocks = tokenize_into_blocks(load_text_dataset(data_args), tokenizer, mntp_args.block_size,
                                  num_proc=data_args.num_proc, max_blocks=data_args.max_train_samples)
    if mntp_args.validation_fraction > 0:
        if len(blocks) < 2:
            raise ValueError(f"validation_fraction needs at least 2 blocks, the text gives {len(blocks)}")
        split = blocks.train_test_split(test_size=mntp_args.validation_fraction, seed=0)
        return split["train"], split["test"]
    return blocks, None


def _write_base_config(model_name_or_path: str, output_dir: str) -> None:
    """The base model's own (unpatched) config beside the adapter, as llm2vec's ``-mntp`` repositories have it."""
    from transformers import AutoConfig

    from ..builtin_models import resolve_model

    AutoConfig.from_pretrained(resolve_model(model_name_or_path)).save_pretrained(output_dir)


def train_mntp(model_args, data_args, mntp_args, training_args) -> TrainingRun:
    """Run the MNTP stage; returns the output directory, the Trainer's log history and the Trainer."""
    from transformers import set_seed

    set_seed(training_args.seed)
    check_torch_compile(training_args)  # before any data or model is loaded
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    train_blocks, eval_blocks = prepare_blocks(data_args, mntp_args, tokenizer)  # before any model is loaded
    model = build_mntp_model(model_args, mntp_args, tokenizer)
    collator = MNTPDataCollator.for_replacement(tokenizer, mntp_args.replacement, mntp_args.mask_probability,
                                                vocab_size=model.loss.vocab_size)
    # Bad token ids or mask settings fail before the first step, not in the middle of training.
    probe = collator([train_blocks[i] for i in range(min(len(train_blocks), 2))])
    if (probe["labels"] != IGNORE_INDEX).sum() == 0:
        logger.warning("the first batch has no masked token: mask_probability %.3g may be too low",
                       mntp_args.mask_probability)
    logger.info("MNTP: %d training blocks of %d tokens, %d trainable parameters, loss %s (impl %s)",
                len(train_blocks), mntp_args.block_size,
                sum(p.numel() for p in model.parameters() if p.requires_grad), mntp_args.loss, model.loss.impl)
    trainer = LLM2VecTrainer(model=model, args=training_args, train_dataset=train_blocks, eval_dataset=eval_blocks,
                             data_collator=collator,
                             processing_class=load_tokenizer(model_args.model_name_or_path))  # no mask token
    add_wall_clock_guard(trainer, mntp_args.max_wall_seconds)
    run = run_training(trainer, "mntp", (model_args, data_args, mntp_args, training_args))
    if training_args.should_save:
        _write_base_config(model_args.model_name_or_path, training_args.output_dir)
    return run


add_arguments, main = arguments.stage_command("mntp", train_mntp)
