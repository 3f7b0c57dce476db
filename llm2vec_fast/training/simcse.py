"""Unsupervised SimCSE, LLM2Vec's third step: each sentence twice through the model with dropout (attention
dropout 0.3 by default, as llm2vec), the two views as query and positive, InfoNCE over in-batch negatives.

``llm2vec-fast train simcse --config training/simcse/smollm2_135m.json [--learning_rate 3e-4 ...]``
"""

from __future__ import annotations

from . import arguments
from .contrastive import train_contrastive
from .data import load_sentences
from .trainer import TrainingRun


def train_simcse(model_args, data_args, args, training_args) -> TrainingRun:
    rows = load_sentences(data_args)
    return train_contrastive(model_args, data_args, args, training_args, rows, stage="simcse")


add_arguments, main = arguments.stage_command("simcse", train_simcse)
