"""Supervised contrastive training, LLM2Vec's fourth step: (query, positive, hard negative) rows, the query
with its dataset's instruction (left out of pooling), documents without; each batch from one dataset;
InfoNCE at scale 50 over in-batch and hard negatives; batch 512 through GradCache chunks.

Data: E5-style JSON lines ``{"query", "positive", "negative", "dataset"}`` (.jsonl or .jsonl.gz), or SimCSE's
NLI triplet CSV ``sent0,sent1,hard_neg`` (read as dataset ``data.csv_dataset``, "allnli" by default).

``llm2vec-fast train supervised --config training/supervised/smollm2_135m.json [--set key=value ...]``
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import add_config_arguments, config_to_dataclass, load_config
from .contrastive import ContrastiveExample, ContrastiveRun, ContrastiveSettings, train_contrastive

logger = logging.getLogger(__name__)

# llm2vec's supervised recipe (train_configs/supervised/*.json, run_supervised.py): lr 2e-4, warmup 300,
# 1000 steps, loss scale 50.
TRAINING_DEFAULTS = {"learning_rate": 2e-4, "warmup_steps": 300, "max_steps": 1000, "logging_steps": 50,
                     "save_steps": 200}

# The per-dataset instructions of the E5 mixture as llm2vec uses them; where there are several, each row
# draws one at random (seeded).
E5_INSTRUCTIONS: dict[str, list[str]] = {
    "allnli": ["Given a premise, retrieve a hypothesis that is entailed by the premise",
               "Retrieve semantically similar text"],
    "dureader": ["Given a Chinese search query, retrieve web passages that answer the question"],
    "eli5_question_answer": ["Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum"],
    "fever": ["Given a claim, retrieve documents that support or refute the claim"],
    "hotpot_qa": ["Given a multi-hop question, retrieve documents that can help answer the question"],
    "miracl": ["Given a question, retrieve Wikipedia passages that answer the question"],
    "mrtydi": ["Given a question, retrieve Wikipedia passages that answer the question"],
    "msmarco_passage": ["Given a web search query, retrieve relevant passages that answer the query"],
    "msmarco_document": ["Given a web search query, retrieve relevant documents that answer the query"],
    "nq": ["Given a question, retrieve Wikipedia passages that answer the question"],
    "quora_duplicates": ["Given a question, retrieve questions that are semantically equivalent to the given question",
                         "Find questions that have the same meaning as the input question"],
    "squad": ["Retrieve Wikipedia passages that answer the question"],
    "t2ranking": ["Given a Chinese search query, retrieve web passages that answer the question"],
    "trivia_qa": ["Retrieve Wikipedia passages that answer the question"],
}


@dataclass
class SupervisedDataSettings:
    train_files: list[str] = field(default_factory=list)  # .jsonl / .jsonl.gz rows, or .csv NLI triplets
    csv_dataset: str = "allnli"  # the dataset name given to rows of a triplet CSV
    dataset_from_file_name: bool = False  # rows without "dataset" take their file's name (llm2vec's echo-data layout)
    hard_negatives: bool = True  # every row must have a negative; false: in-batch negatives only, negatives ignored
    skip_bad_rows: bool = False  # false: a row missing a field or with an empty text is an error; true: skipped
    max_rows: int | None = None  # keep the first N valid rows (smoke runs)


@dataclass
class SupervisedSettings(ContrastiveSettings):
    data: SupervisedDataSettings = field(default_factory=SupervisedDataSettings)
    instructions: dict[str, Any] = field(default_factory=dict)  # dataset -> instruction (or list); adds to E5's
    batch_size: int = 512
    chunk_size: int | None = 64
    max_length: int = 512
    scale: float = 50.0

    def validate(self) -> None:
        super().validate()
        if not self.data.train_files:
            raise ValueError("data.train_files must list at least one .jsonl or .csv file")
        if self.data.max_rows is not None and self.data.max_rows < 1:
            raise ValueError(f"data.max_rows must be a positive integer or null, got {self.data.max_rows}")


def settings_from_config(config: dict[str, Any]) -> SupervisedSettings:
    settings = config_to_dataclass(SupervisedSettings, config)
    for key, value in TRAINING_DEFAULTS.items():
        settings.training.setdefault(key, value)
    settings.validate()
    return settings


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.suffix == ".gz" else open(
        path, "rt", encoding="utf-8", newline="")


def _raw_rows(path: Path, csv_dataset: str):
    """(location, row dict) for every row of a file."""
    name = path.name.removesuffix(".gz")
    with _open(path) as handle:
        if name.endswith(".csv"):
            reader = csv.DictReader(handle)
            missing = {"sent0", "sent1", "hard_neg"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: a triplet CSV needs the columns sent0,sent1,hard_neg; missing "
                                 f"{sorted(missing)}")
            for number, row in enumerate(reader, start=2):
                yield f"{path}:{number}", {"query": row.get("sent0"), "positive": row.get("sent1"),
                                           "negative": row.get("hard_neg"), "dataset": csv_dataset}
        elif name.endswith(".jsonl") or name.endswith(".json"):
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: each line must be a JSON object")
                yield f"{path}:{number}", row
        else:
            raise ValueError(f"{path}: supervised data must be .jsonl(.gz) rows or a .csv triplet file")


def read_supervised_rows(data: SupervisedDataSettings) -> list[dict[str, str]]:
    """Validated rows {query, positive, negative?, dataset}; bad rows raise, or are skipped and counted."""
    required = ("query", "positive", "negative", "dataset") if data.hard_negatives else ("query", "positive",
                                                                                         "dataset")
    rows, skipped = [], 0
    for file in data.train_files:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"supervised training file not found: {path}")
        file_dataset = path.name.removesuffix(".gz").rsplit(".", 1)[0]
        for location, row in _raw_rows(path, data.csv_dataset):
            if data.dataset_from_file_name and row.get("dataset") is None:
                row["dataset"] = file_dataset
            problems = [f"missing {key!r}" for key in required if key not in row or row[key] is None]
            problems += [f"{key!r} is not text" for key in required if key in row and row[key] is not None
                         and not isinstance(row[key], str)]
            problems += [f"empty {key!r}" for key in required if isinstance(row.get(key), str)
                         and not row[key].strip()]
            if problems:
                if not data.skip_bad_rows:
                    raise ValueError(f"{location}: {', '.join(problems)} (set data.skip_bad_rows to skip such rows)")
                skipped += 1
                continue
            rows.append({key: row[key] for key in required})
            if data.max_rows is not None and len(rows) >= data.max_rows:
                break
        if data.max_rows is not None and len(rows) >= data.max_rows:
            break
    if skipped:
        logger.warning("supervised data: skipped %d rows missing a field or with an empty text", skipped)
    if not rows:
        raise ValueError(f"no usable row in {data.train_files}")
    logger.info("supervised data: %d rows from %s", len(rows), ", ".join(map(str, data.train_files)))
    return rows


def supervised_examples(rows: list[dict[str, str]], instructions: dict[str, Any], *,
                        seed: int = 0) -> list[ContrastiveExample]:
    """Rows -> examples, the query's instruction drawn from the dataset's list; unknown datasets are an error."""
    table: dict[str, list[str]] = {name: list(values) for name, values in E5_INSTRUCTIONS.items()}
    for name, value in instructions.items():
        values = [value] if isinstance(value, str) else list(value)
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"instructions[{name!r}] must be a string or a non-empty list of strings")
        table[name] = values
    unknown = sorted({row["dataset"] for row in rows} - set(table))
    if unknown:
        raise ValueError(f"no instruction for dataset(s) {unknown}: add them under 'instructions' in the config "
                         "(an empty string means no instruction)")
    rng = random.Random(seed)
    return [ContrastiveExample(query=row["query"], positive=row["positive"], negative=row.get("negative"),
                               instruction=rng.choice(table[row["dataset"]]), dataset=row["dataset"])
            for row in rows]


def train_supervised(settings: SupervisedSettings) -> ContrastiveRun:
    settings.validate()
    rows = read_supervised_rows(settings.data)
    examples = supervised_examples(rows, settings.instructions, seed=settings.seed)
    return train_contrastive(settings, examples, stage="supervised")


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def main(args) -> int:
    train_supervised(settings_from_config(load_config(args.config, args.overrides)))
    return 0
