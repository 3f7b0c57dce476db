"""Unsupervised SimCSE, LLM2Vec's third step: each sentence twice through the model with dropout (attention
dropout 0.3 by default, as llm2vec), the two views as query and positive, InfoNCE over in-batch negatives.

``llm2vec-fast train simcse --config training/simcse/smollm2_135m.json [--set key=value ...]``
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import add_config_arguments, config_to_dataclass, load_config
from .contrastive import ContrastiveExample, ContrastiveRun, ContrastiveSettings, train_contrastive

logger = logging.getLogger(__name__)

# llm2vec's SimCSE recipe (train_configs/simcse/*.json): lr 3e-5, 1000 steps.
TRAINING_DEFAULTS = {"learning_rate": 3e-5, "max_steps": 1000, "logging_steps": 50, "save_steps": 200}


@dataclass
class SimCSEDataSettings:
    train_files: list[str] = field(default_factory=list)  # one sentence per line; .txt or .txt.gz
    max_sentences: int | None = None  # keep the first N sentences (after dropping empty lines)


@dataclass
class SimCSESettings(ContrastiveSettings):
    data: SimCSEDataSettings = field(default_factory=SimCSEDataSettings)
    batch_size: int = 128
    max_length: int = 128
    scale: float = 20.0
    attention_dropout: float | None = 0.3

    def validate(self) -> None:
        super().validate()
        if not self.data.train_files:
            raise ValueError("data.train_files must list at least one text file (one sentence per line)")
        if self.data.max_sentences is not None and self.data.max_sentences < 1:
            raise ValueError(f"data.max_sentences must be a positive integer or null, got {self.data.max_sentences}")


def settings_from_config(config: dict[str, Any]) -> SimCSESettings:
    settings = config_to_dataclass(SimCSESettings, config)
    for key, value in TRAINING_DEFAULTS.items():
        settings.training.setdefault(key, value)
    settings.validate()
    return settings


def read_sentences(paths: list[str], max_sentences: int | None = None) -> list[str]:
    """Lines of the files, stripped; empty lines are dropped and counted in the log."""
    sentences: list[str] = []
    empty = 0
    for path in paths:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SimCSE training file not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                text = line.strip()
                if not text:
                    empty += 1
                    continue
                sentences.append(text)
                if max_sentences is not None and len(sentences) >= max_sentences:
                    break
        if max_sentences is not None and len(sentences) >= max_sentences:
            break
    if empty:
        logger.info("SimCSE data: dropped %d empty lines", empty)
    if not sentences:
        raise ValueError(f"no sentence in {paths}")
    logger.info("SimCSE data: %d sentences from %s", len(sentences), ", ".join(map(str, paths)))
    return sentences


def simcse_examples(sentences: list[str]) -> list[ContrastiveExample]:
    return [ContrastiveExample(query=s, positive=s, dataset="simcse") for s in sentences]


def train_simcse(settings: SimCSESettings) -> ContrastiveRun:
    settings.validate()
    sentences = read_sentences(settings.data.train_files, settings.data.max_sentences)
    return train_contrastive(settings, simcse_examples(sentences), stage="simcse")


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def main(args) -> int:
    train_simcse(settings_from_config(load_config(args.config, args.overrides)))
    return 0
