"""Raw text -> token blocks: read text files or a ``datasets`` dataset, tokenize, concatenate, cut into blocks.

This is what llm2vec's ``run_mntp.py`` (after Hugging Face's ``run_mlm.py``) does with ``line_by_line`` off:
every row is tokenized (with the tokenizer's own special tokens), all rows are concatenated, and the stream
is cut into blocks of ``block_size`` tokens; the remainder shorter than one block is dropped.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")


class TextTooShortError(ValueError):
    """The tokenized text does not fill a single block."""


def resolve_path(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Path:
    """``~`` expanded; a relative path is taken against ``base_dir`` (default: the current directory)."""
    resolved = Path(os.path.expanduser(str(path)))
    if not resolved.is_absolute():
        resolved = Path(base_dir or os.getcwd()) / resolved
    return resolved


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _kind(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(f"{path}: unsupported text file type; use one of {', '.join(TEXT_SUFFIXES)}, .jsonl or .json "
                     "(optionally .gz), or a `datasets` dataset")


def read_text_rows(paths: Iterable[str | os.PathLike], *, text_field: str = "text",
                   base_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Rows of text from files: plain text (one row per line, newline kept, as HF ``wikitext`` rows are) or
    JSON lines (the ``text_field`` of every object). ``.gz`` files are read through gzip."""
    for raw in paths:
        path = resolve_path(raw, base_dir)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {raw} (resolved to {path})")
        kind = _kind(path)
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if kind == "text":
                    yield line
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}:{number}: no {text_field!r} field in this JSON line")
                yield str(record[text_field])


def load_text_dataset(
    *,
    files: list[str] | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    base_dir: str | os.PathLike | None = None,
):
    """A ``datasets.Dataset`` with one ``text`` column, from ``files`` or from ``datasets.load_dataset``."""
    import datasets

    if bool(files) == bool(dataset_name):
        raise ValueError("give exactly one text source: data.train_files (a list of files) or data.dataset_name")
    if files:
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        rows = list(read_text_rows(files, text_field=text_column, base_dir=base_dir))
        logger.info("Read %d rows of text from %d file(s)", len(rows), len(files))
        return datasets.Dataset.from_dict({"text": rows})
    dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(
            f"dataset {dataset_name!r} has no column {text_column!r}; columns: {', '.join(dataset.column_names)}"
        )
    return dataset.select_columns([text_column]).rename_column(text_column, "text") if text_column != "text" \
        else dataset.select_columns(["text"])


def tokenize_into_blocks(dataset, tokenizer, block_size: int, *, num_proc: int | None = None,
                         max_blocks: int | None = None):
    """Tokenize the ``text`` column, concatenate (per map batch of 1000 rows), cut into ``block_size`` blocks.

    Returns a dataset with ``input_ids``, ``attention_mask`` and ``special_tokens_mask`` (all ``block_size``
    long). Raises ``TextTooShortError`` when the text does not fill one block.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
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
    # Grouped per map batch of 1000 rows, as run_mlm.py / run_mntp.py do: each batch drops its own remainder.
    blocks = tokenized.map(group, batched=True, num_proc=num_proc, desc=f"Grouping into blocks of {block_size}")
    if len(blocks) == 0:
        n_tokens = sum(len(ids) for ids in tokenized["input_ids"])
        if n_tokens >= block_size:  # short rows: no batch of 1000 fills a block, all of them together do
            blocks = tokenized.map(group, batched=True, batch_size=None, desc="Grouping into blocks")
    if len(blocks) == 0:
        raise TextTooShortError(
            f"the text has {n_tokens} tokens, fewer than one block of block_size={block_size}: give more text "
            f"or a smaller block_size"
        )
    logger.info("%d rows of text -> %d blocks of %d tokens", len(dataset), len(blocks), block_size)
    if max_blocks is not None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        blocks = blocks.select(range(min(max_blocks, len(blocks))))
    return blocks
