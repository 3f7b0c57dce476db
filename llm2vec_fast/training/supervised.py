"""Supervised contrastive training, LLM2Vec's fourth step: (query, positive, hard negative) rows, the query
with its dataset's instruction (left out of pooling), documents without; each batch from one dataset;
InfoNCE at scale 50 over in-batch and hard negatives; batch 512 through GradCache chunks.

Data: E5-style JSON lines ``{"query", "positive", "negative", "dataset"}`` (.jsonl or .jsonl.gz), or SimCSE's
NLI triplet CSV ``sent0,sent1,hard_neg`` (read as dataset ``csv_dataset``, "allnli" by default).

``llm2vec-fast train supervised --config training/supervised/smollm2_135m.json [--learning_rate 2e-4 ...]``
"""

from __future__ import annotations

from . import arguments
from .contrastive import train_contrastive
from .data import add_instructions, load_triplets
from .trainer import TrainingRun


def train_supervised(model_args, data_args, args, training_args) -> TrainingRun:
    rows = add_instructions(load_triplets(data_args, args), args.instructions, seed=training_args.seed)
    return train_contrastive(model_args, data_args, args, training_args, rows, stage="supervised")


add_arguments, main = arguments.stage_command("supervised", train_supervised)
