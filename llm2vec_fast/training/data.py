"""Training data through ``datasets``: text, JSON lines and CSV files (optionally .gz) or a hub dataset, read by
``datasets``' own builders, then checked, limited and shaped for each stage.

- MNTP: every row tokenized (with the tokenizer's own special tokens), concatenated per map batch of 1000 rows
  and cut into blocks of ``block_size`` tokens, as llm2vec's ``run_mntp.py`` (after ``run_mlm.py``) does with
  ``line_by_line`` off; plain text keeps its newlines, as Hugging Face's ``wikitext`` rows do.
- SimCSE: one sentence per line, each its own positive (dataset ``simcse``).
- Supervised: E5-style JSON lines ``{"query", "positive", "negative", "dataset"}`` or SimCSE's NLI triplet CSV
  ``sent0,sent1,hard_neg``; the query's instruction drawn per row from its dataset's list (seeded).
"""

from __future__ import annotations

import logging
import os
import random
from itertools import chain
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", **dict.fromkeys(TEXT_SUFFIXES, "text")}
TRIPLET_COLUMNS = {"sent0": "query", "sent1": "positive", "hard_neg": "negative"}
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


class TextTooShortError(ValueError):
    """The tokenized text does not fill a single block."""


def read_file(raw: str | os.PathLike) -> datasets.Dataset:
    """One file as a ``datasets.Dataset``: text (a ``text`` row per line, newline kept), JSON lines or CSV."""
    path = Path(os.path.expanduser(str(raw))).absolute()
    if not path.is_file():
        raise FileNotFoundError(f"training file not found: {raw} (resolved to {path})")
    name = path.name.removesuffix(".gz")
    builder = next((BUILDERS[suffix] for suffix in BUILDERS if name.endswith(suffix)), None)
    if builder is None:
        raise ValueError(f"{path}: unsupported file type; use {', '.join(BUILDERS)} (optionally .gz) or a "
                         "`datasets` dataset")
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=[str(path)], split="train", **kwargs)


def valid_rows(rows: datasets.Dataset, fields: tuple[str, ...], *, where: str, skip_bad_rows: bool,
               first_row: int = 1) -> list[int]:
    """Indices of the rows whose ``fields`` are all non-empty text; a bad row raises (naming ``where:row``
    and what is wrong) unless ``skip_bad_rows``, then it is left out."""
    missing = [name for name in fields if name not in rows.column_names]
    if missing and not skip_bad_rows:
        raise ValueError(f"{where}: no {', '.join(map(repr, missing))} field in any row")
    keep = []
    for index, row in enumerate(rows.select_columns([f for f in fields if f not in missing])):
        problems = [f"missing {name!r}" for name in fields if row.get(name) is None]
        problems += [f"{name!r} is not text" for name in fields if row.get(name) is not None
                     and not isinstance(row[name], str)]
        problems += [f"empty {name!r}" for name in fields if isinstance(row.get(name), str) and not row[name].strip()]
        if not problems:
            keep.append(index)
        elif not skip_bad_rows:
            raise ValueError(f"{where}:{index + first_row}: {', '.join(problems)} (set skip_bad_rows to skip "
                             "such rows)")
    return keep


def _first(rows: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return rows if limit is None else rows.select(range(min(limit, len(rows))))


# --- MNTP -----------------------------------------------------------------------------------------------------
def load_text_dataset(data_args) -> datasets.Dataset:
    """A dataset with one ``text`` column, from ``train_files`` or ``datasets.load_dataset(dataset_name)``."""
    if bool(data_args.train_files) == bool(data_args.dataset_name):
        raise ValueError("give exactly one text source: train_files (a list of files) or dataset_name")
    column = data_args.text_column
    if data_args.train_files:
        parts = [read_file(path) for path in data_args.train_files]
        # a plain-text file's rows are its lines, whatever the text field of JSON lines is called
        parts = [part.rename_column("text", column) if part.column_names == ["text"] != [column] else part
                 for part in parts]
        where = ", ".join(map(str, data_args.train_files))
    else:
        parts = [datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name,
                                       split=data_args.dataset_split)]
        where = f"dataset {data_args.dataset_name!r}"
    for part in parts:
        if column not in part.column_names:
            raise ValueError(f"{where}: no {column!r} field (columns: {', '.join(part.column_names)})")
    rows = datasets.concatenate_datasets([part.select_columns([column]) for part in parts])
    return rows.rename_column(column, "text") if column != "text" else rows


def tokenize_into_blocks(dataset, tokenizer, block_size: int, *, num_proc: int | None = None,
                         max_blocks: int | None = None):
    """Tokenize the ``text`` column, concatenate (per map batch of 1000 rows), cut into ``block_size`` blocks.

    Returns a dataset with ``input_ids``, ``attention_mask`` and ``special_tokens_mask`` (all ``block_size``
    long). Raises ``TextTooShortError`` when the text does not fill one block."""
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 10**9 and block_size > model_max:
        logger.warning("block_size %d is larger than the tokenizer's model_max_length %d", block_size, model_max)

    def tokenize(batch):
        return tokenizer(batch["text"], return_special_tokens_mask=True, return_attention_mask=True)

    def group(batch):
        concatenated = {key: list(chain.from_iterable(batch[key])) for key in batch}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        return {key: [values[i:i + block_size] for i in range(0, total, block_size)]
                for key, values in concatenated.items()}

    tokenized = dataset.map(tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
                            desc="Tokenizing")
    blocks = tokenized.map(group, batched=True, num_proc=num_proc, desc=f"Grouping into blocks of {block_size}")
    if len(blocks) == 0:
        n_tokens = sum(len(ids) for ids in tokenized["input_ids"])
        if n_tokens >= block_size:  # short rows: no batch of 1000 fills a block, all of them together do
            blocks = tokenized.map(group, batched=True, batch_size=None, desc="Grouping into blocks")
        else:
            raise TextTooShortError(f"the text has {n_tokens} tokens, fewer than one block of block_size="
                                    f"{block_size}: give more text or a smaller block_size")
    logger.info("%d rows of text -> %d blocks of %d tokens", len(dataset), len(blocks), block_size)
    return _first(blocks, max_blocks)


# --- SimCSE and supervised ------------------------------------------------------------------------------------
def load_sentences(data_args) -> datasets.Dataset:
    """SimCSE rows: every non-empty line (stripped) as its own query and positive; empty lines are counted."""
    if not data_args.train_files:
        raise ValueError("train_files must list at least one text file (one sentence per line)")
    parts = []
    for path in data_args.train_files:
        lines = read_file(path).map(lambda row: {"text": (row["text"] or "").strip()})
        parts.append(lines.select(valid_rows(lines, ("text",), where=str(path), skip_bad_rows=True)))
    sentences = _first(datasets.concatenate_datasets(parts), data_args.max_train_samples)
    if not len(sentences):
        raise ValueError(f"no sentence in {data_args.train_files}")
    logger.info("SimCSE data: %d sentences from %s", len(sentences), ", ".join(data_args.train_files))
    text = sentences["text"]
    return datasets.Dataset.from_dict({"query": text, "positive": text, "dataset": ["simcse"] * len(text)})


def load_triplets(data_args, args) -> datasets.Dataset:
    """Supervised rows ``query, positive, negative (with hard_negatives), dataset, instruction``, checked
    (a bad row raises, or is skipped and counted with ``skip_bad_rows``)."""
    if not data_args.train_files:
        raise ValueError("train_files must list at least one .jsonl or .csv file")
    fields = ("query", "positive", "negative", "dataset") if args.hard_negatives else ("query", "positive", "dataset")
    parts, skipped = [], 0
    for path in data_args.train_files:
        rows = read_file(path)
        is_csv = "sent0" in rows.column_names
        if is_csv:
            missing = set(TRIPLET_COLUMNS) - set(rows.column_names)
            if missing:
                raise ValueError(f"{path}: a triplet CSV needs the columns sent0,sent1,hard_neg; missing "
                                 f"{sorted(missing)}")
            rows = rows.rename_columns(TRIPLET_COLUMNS)
        if is_csv or args.dataset_from_file_name:
            fallback = args.csv_dataset if is_csv else Path(path).name.removesuffix(".gz").rsplit(".", 1)[0]
            names = rows["dataset"] if "dataset" in rows.column_names else [None] * len(rows)
            rows = rows.remove_columns([c for c in ["dataset"] if c in rows.column_names]).add_column(
                "dataset", [name if name is not None else fallback for name in names])
        keep = valid_rows(rows, fields, where=str(path), skip_bad_rows=args.skip_bad_rows,
                          first_row=2 if is_csv else 1)
        skipped += len(rows) - len(keep)
        parts.append(rows.select(keep).select_columns(list(fields)))
    if skipped:
        logger.warning("supervised data: skipped %d rows missing a field or with an empty text", skipped)
    rows = _first(datasets.concatenate_datasets(parts), data_args.max_train_samples)
    if not len(rows):
        raise ValueError(f"no usable row in {data_args.train_files}")
    logger.info("supervised data: %d rows from %s", len(rows), ", ".join(data_args.train_files))
    return rows


def add_instructions(rows: datasets.Dataset, instructions: dict[str, Any] | None, *, seed: int = 0):
    """Each row's query instruction drawn from its dataset's list (E5's, extended or replaced by
    ``instructions``); a dataset without one is an error."""
    table: dict[str, list[str]] = {name: list(values) for name, values in E5_INSTRUCTIONS.items()}
    for name, value in (instructions or {}).items():
        values = [value] if isinstance(value, str) else list(value)
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"instructions[{name!r}] must be a string or a non-empty list of strings")
        table[name] = values
    unknown = sorted(set(rows["dataset"]) - set(table))
    if unknown:
        raise ValueError(f"no instruction for dataset(s) {unknown}: add them to the instructions setting "
                         "(an empty string means no instruction)")
    rng = random.Random(seed)
    return rows.add_column("instruction", [rng.choice(table[name]) for name in rows["dataset"]])
