"""Corpus encoding: a large corpus into embedding shards, resumable, one process or many (torchrun).

``encode_corpus(source, output, CorpusSettings(model=...))`` is the library function (it returns the manifest);
``llm2vec-fast encode`` is a thin command line over it, its options ``CorpusSettings``' fields. Input (streamed):
``.txt``, ``.jsonl``, ``.parquet``, ``.txt.gz``, ``.jsonl.gz``; rows numbered from 0 in file order, a row without
an id gets its number. Output: ``run.json`` (the resolved settings and the input's SHA-256, pinned), per shard
``k`` (rows ``[k * shard_size, (k + 1) * shard_size)``) its embeddings (Parquet in ``data/``, or ``.npy``) and a
JSON record, written last, that marks it complete; ``quantization-ranges.npy`` for int8/uint8; ``manifest.json``
at the end. Killed and started again, a run redoes only the incomplete shards, and the result equals an
uninterrupted run byte for byte (each shard is always encoded in the same batches). Under torchrun rank ``r`` of
``W`` encodes the shards ``k % W == r``. Bad rows stop the run with the file and line, or are listed and counted
(``on_bad_row="skip"``); nothing is dropped silently. docs/encoding.md has the whole contract.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write, sha256
from .kernels._dispatch import IMPLEMENTATIONS
from .pooling import POOLING_MODES
from .dtypes import MODEL_DTYPES
from .prompts import default_prompts, resolve_prompt
from .quantization import check_precision, quantization_ranges, quantize_embeddings

logger = logging.getLogger(__name__)

# 2: run.json holds resolved settings and the input's SHA-256; bad rows keep their ids. 3: the format (npy or
# parquet), truncate_dim, precision (and calibration_rows), the ids' type of a Parquet run. A version-2 run.json
# is read as the version-3 one of the same run (npy, float32, no truncation), so such runs resume.
FORMAT_VERSION = 3
SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
BAD_ROW_POLICIES = ("error", "skip")


class CorpusError(ValueError):
    """A corpus run that cannot go on as asked; the message says what to change."""


class BadRowError(CorpusError):
    """A row of the input that cannot be encoded (undecodable, invalid JSON, no text field)."""


class TooManyBadRowsError(CorpusError):
    """More bad rows than allowed, or no good row at all."""


class SettingsConflictError(CorpusError):
    """The output folder holds complete shards of a run with other settings or another input."""


@dataclasses.dataclass
class Row:
    index: int  # row number in the input, from 0
    id: Any
    text: str | None  # None for a bad row
    problem: str | None = None


# ---------------------------------------------------------------------------------------------------------- input
def input_kind(path: str | Path) -> str:
    name = str(path).lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.replace(".gz", "")
    raise ValueError(f"unsupported input {path}: the input must be one of {', '.join(SUFFIXES)}")


def read_rows(path: str | Path, *, text_field: str = "text", id_field: str | None = "id",
              wanted=None, digest=None) -> Iterator[Row]:
    """Stream the rows of ``path``. ``wanted(index) -> bool`` lets rows be skipped cheaply (not parsed).

    Bad rows are yielded with ``text=None`` and ``problem`` saying what is wrong, so the caller decides.
    A whitespace-only line of a .jsonl file is not a row (it is logged); in a .txt file it is an empty text.
    ``digest`` (a ``hashlib`` object; not for .parquet) is fed every byte of the file as it is read, so that one
    pass both hashes and parses the input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    kind = input_kind(path)
    if kind == ".parquet":
        if digest is not None:
            raise ValueError(f"{path}: read_rows hashes text inputs only (pyarrow reads a .parquet file itself)")
        yield from _read_parquet(path, text_field, id_field, wanted)
        return
    index = 0
    with open(path, "rb") as handle:
        stream = handle if digest is None else io.BufferedReader(_Digesting(handle, digest))
        lines = gzip.GzipFile(fileobj=stream) if str(path).lower().endswith(".gz") else stream
        for number, raw in enumerate(lines, start=1):
            if kind == ".jsonl" and not raw.strip():
                logger.debug("%s:%d: blank line, not a row", path, number)
                continue
            if wanted is not None and not wanted(index):
                index += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield Row(index, index, None,
                          f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})")
            else:
                yield (Row(index, index, line.rstrip("\r\n")) if kind == ".txt"
                       else _json_row(line, path, number, index, text_field, id_field))
            index += 1
        while digest is not None and stream.read(1 << 22):  # whatever follows the last line, hashed too
            pass


class _Digesting(io.RawIOBase):
    """A binary file that feeds ``digest`` with every byte read from it."""

    def __init__(self, handle, digest):
        self.handle, self.digest = handle, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.handle.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        return n


def _json_row(line: str, path: Path, number: int, index: int, text_field: str, id_field: str | None) -> Row:
    """One .jsonl row; a bad one keeps its own id when the line parsed and has one."""
    where = f"{path}:{number}"
    try:
        # Without the line end, json's "line 1 column c" points into this row, not at a line 2 after it.
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        # str(error) is the whole message, with line and column: error.msg alone stops mid-phrase.
        return Row(index, index, None, f"{where}: invalid JSON ({error})")
    if not isinstance(record, dict):
        return Row(index, index, None, f"{where}: expected a JSON object, got {type(record).__name__}")
    row_id = record.get(id_field, index) if id_field else index
    if text_field not in record:
        return Row(index, row_id, None, f"{where}: no field {text_field!r} (fields: {sorted(record)[:10]})")
    text = record[text_field]
    if not isinstance(text, str):
        return Row(index, row_id, None, f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return Row(index, row_id, text)


def _read_parquet(path: Path, text_field: str, id_field: str | None, wanted) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet needs pyarrow: pip install 'llm2vec-fast[parquet]'") from None
    handle = pq.ParquetFile(path)
    names = handle.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {names})")
    columns = [text_field] + ([id_field] if id_field and id_field in names else [])
    index = 0
    for batch in handle.iter_batches(batch_size=4096, columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) == 2 else None
        for j, text in enumerate(texts):
            if wanted is None or wanted(index):
                row_id = ids[j] if ids is not None else index
                kind = "null" if text is None else type(text).__name__
                yield (Row(index, row_id, text) if isinstance(text, str)
                       else Row(index, row_id, None, f"{path}: row {index}: column {text_field!r} is {kind}"))
            index += 1


# ---------------------------------------------------------------------------------------------------------- output
def _json_safe(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _write_json(path: Path, value: Any, **dump_options) -> None:
    atomic_write(path, lambda h: h.write(json.dumps(value, **dump_options).encode("utf-8")))


FORMATS = ("parquet", "npy")
DEFAULT_FORMAT = "parquet"  # of a new run; an existing run keeps the format its run.json names
PARQUET_ROW_GROUP_ROWS = 4096  # fixed writer settings, so that a shard's bytes depend on its content only
PARQUET_COMPRESSION = "zstd"
RANGES_FILE = "quantization-ranges.npy"  # int8/uint8: the (2, dim) ranges every shard is quantized with


def shard_names(k: int, format: str = "npy") -> tuple[str, str]:
    """(embeddings file, record file) of shard ``k``, relative to the output folder. The record (a JSON file)
    is written last and marks the shard complete. Parquet shards live in ``data/``, which holds nothing else,
    so that ``pyarrow.parquet.read_table("OUT/data")`` reads them as one table."""
    if format == "parquet":
        return f"data/embeddings-{k:05d}.parquet", f"shard-{k:05d}.json"
    return f"embeddings-{k:05d}.npy", f"ids-{k:05d}.json"


def shard_complete(output: Path, k: int, format: str = "npy") -> bool:
    embeddings, record = shard_names(k, format)
    return (output / record).is_file() and (output / embeddings).is_file()


def _complete_shards(output: Path, format: str | None = None) -> list[int]:
    """Shards with their record written (of ``format``, else of any format)."""
    patterns = {"npy": "ids-*.json", "parquet": "shard-*.json"}
    numbers = [p.stem.split("-")[1] for name, pattern in patterns.items() if format in (None, name)
               for p in output.glob(pattern)]
    return sorted({int(n) for n in numbers if n.isdigit()})


def _id_type(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float"}.get(type(value), "str")


def _check_id(value: Any, row: int, id_type: str) -> None:
    """A Parquet column holds one type: every id (of a JSON-safe value) must have the first row's."""
    if value is not None and _id_type(value) != id_type:
        raise CorpusError(
            f"the id of row {row} is {value!r} ({_id_type(value)}), but this run's ids are {id_type}s (the type of "
            f"the first row's id): a Parquet column holds one type. Give every row an id of one type, or number the "
            f"rows (--id-field '').")


def embedding_column(array: np.ndarray):
    """A (rows, width) array as Arrow's fixed-size list column, the layout of the Parquet shards."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(array).reshape(-1)), int(array.shape[1]))


def parquet_shard_bytes(array: np.ndarray, ids: list, rows: list[int], id_type: str) -> bytes:
    """One shard as a Parquet file: columns ``id``, ``row`` (int64, the row number in the input) and
    ``embedding`` (a fixed-size list of the array's dtype), written with fixed settings (row-group size,
    compression; no timestamp is written), so that the same content gives the same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for value, row in zip(ids, rows):
        _check_id(value, row, id_type)
    types = {"int": pa.int64(), "str": pa.string(), "float": pa.float64(), "bool": pa.bool_()}
    table = pa.table({
        "id": pa.array(ids, type=types[id_type]),
        "row": pa.array(rows, type=pa.int64()),
        "embedding": embedding_column(array),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=PARQUET_ROW_GROUP_ROWS, compression=PARQUET_COMPRESSION,
                   use_dictionary=False, write_statistics=True, store_schema=True)
    return sink.getvalue().to_pybytes()


class ShardWriter:
    """Writes one shard's files into ``output``: the embeddings, then the record, which marks it complete.

    The one place shard files are written, so that a test that dies half way replaces only this.
    ``format``: ``npy`` (``embeddings-k.npy`` and ``ids-k.json`` with the ids) or ``parquet``
    (``data/embeddings-k.parquet`` with ids, row numbers and embeddings, and ``shard-k.json``)."""

    def __init__(self, output: str | Path, format: str = "npy", id_type: str | None = None):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.output, self.format, self.id_type = Path(output), format, id_type or "int"

    def embeddings_bytes(self, k: int, array: np.ndarray, record: dict[str, Any], rows: list[int]) -> bytes:
        if self.format == "parquet":
            return parquet_shard_bytes(array, record["ids"], rows, self.id_type)
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    def write_embeddings(self, k: int, array: np.ndarray, record: dict[str, Any], rows: list[int]) -> None:
        data = self.embeddings_bytes(k, array, record, rows)
        path = self.output / shard_names(k, self.format)[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda h: h.write(data))

    def write_shard(self, k: int, array: np.ndarray, record: dict[str, Any], rows: list[int]) -> None:
        """``record["ids"]`` and ``rows`` are the ids and input row numbers of the array's rows."""
        self.write_embeddings(k, array, record, rows)
        if self.format == "parquet":  # the ids are in the Parquet file
            record = {key: value for key, value in record.items() if key != "ids"}
        _write_json(self.output / shard_names(k, self.format)[1], record)


def load_output(output: str | Path) -> tuple[np.ndarray, list]:
    """Read a finished output folder: all embeddings ``(rows, dim)`` and ids, in input order (bad rows left out)."""
    output = Path(output)
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    arrays, ids = [], []
    for shard in manifest["shards"]:
        if manifest.get("format", "npy") == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(output / shard["embeddings"])
            column = table.column("embedding").combine_chunks()
            arrays.append(column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), manifest["dim"]))
            ids.extend(table.column("id").to_pylist())
        else:
            arrays.append(np.load(output / shard["embeddings"]))
            ids.extend(json.loads((output / shard["ids"]).read_text(encoding="utf-8"))["ids"])
    empty = np.zeros((0, manifest["dim"]), np.dtype(manifest["dtype"]))
    return np.concatenate(arrays) if arrays else empty, ids


# ---------------------------------------------------------------------------------------------------------- settings
def _setting(default: Any = dataclasses.MISSING, help: str | None = None, **cli: Any):
    """A ``CorpusSettings`` field and its ``llm2vec-fast encode`` option (``--name-with-dashes``, or ``flags``):
    ``help``, argparse's ``choices`` and ``metavar``, and the ``minimum`` of an integer (checked by ``validate``)."""
    metadata = {"help": help, **cli}
    if isinstance(default, list):
        return dataclasses.field(default_factory=list, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class CorpusSettings:
    """What to encode with and how; the command line's options are these fields. ``None`` means the encoder's own
    value (its ``llm2vec_config.json``, else llm2vec's defaults); run.json records the resolved values, so an
    explicit default equals an omitted one."""

    model: str = _setting(help="base model: built-in name (smollm2-135m), hub id or path")
    adapters: list[str] = _setting([], "LoRA adapter to merge, in order (repeatable)", flags=("--adapter",),
                                   metavar="PATH")
    text_field: str = _setting("text", "text field/column of .jsonl/.parquet (default text)")
    id_field: str | None = _setting("id", "id field/column (default id; the row number when absent, or with '')")
    instruction: str = _setting("", "instruction (sentence-transformers' prompt) put before every text, left out "
                                "of pooling", flags=("--instruction", "--prompt"))
    prompt_name: str | None = _setting(None, "a named instruction instead: an MTEB task name of LLM2Vec's, query "
                                       "or document")
    batch_size: int = _setting(32, minimum=1)
    max_batch_tokens: int | None = _setting(None, "token budget per batch", minimum=1)
    max_length: int | None = _setting(None, "max tokens per input (default 512)")
    doc_max_length: int | None = _setting(None, "llm2vec's word trimming (default 400)")
    pooling_mode: str | None = _setting(None, "default: the adapter's llm2vec_config.json, else mean",
                                        choices=POOLING_MODES)
    dtype: str = _setting("float32", "stored embeddings, with precision float32", choices=("float16", "float32"))
    truncate_dim: int | None = _setting(None, "keep the first N dimensions (Matryoshka), before --normalize and "
                                        "--precision", minimum=1, metavar="N")
    # Checked by validate (no argparse choices), so that a wrong value is one line and exit code 1.
    precision: str = _setting("float32", "float32 (then --dtype), int8, uint8 (ranges from the first "
                              "--calibration-rows rows), binary, ubinary (8 dimensions a byte), as "
                              "sentence-transformers' quantize_embeddings")
    calibration_rows: int = _setting(1000, "int8/uint8: rows whose embeddings give the ranges (default 1000)",
                                     minimum=2, metavar="N")
    format: str | None = _setting(None, "shards: parquet (default for a new run) or npy; a run being resumed keeps "
                                  "its own", choices=FORMATS)
    model_dtype: str = _setting("auto", "compute dtype (default auto: bf16 on CUDA, fp32 on the CPU)",
                                choices=MODEL_DTYPES)
    shard_size: int = _setting(10000, "rows per shard (default 10000)", minimum=1)
    normalize: bool = _setting(False, "L2-normalize the embeddings")
    device: str | None = _setting(None, "default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    attention_impl: str = _setting("auto", "our attention kernel: auto (Triton on CUDA), triton, or torch (the "
                                   "PyTorch path)", choices=IMPLEMENTATIONS)
    # Not pinned in run.json: compiling changes results by rounding only.
    compile: bool = _setting(False, "torch.compile the model (inductor; the first batch pays the compile, its "
                             "time is logged)")
    on_bad_row: str = _setting("error", "stop at a bad row (default), or skip it and list it in the shard and "
                               "manifest", choices=BAD_ROW_POLICIES)
    max_bad_rows: int | None = _setting(None, "with --on-bad-row skip: fail when more than N rows are bad "
                                        "(default: fail only when every row is bad)", minimum=0, metavar="N")

    def __post_init__(self):
        self.adapters = list(self.adapters)
        self.id_field = self.id_field or None

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value, minimum = getattr(self, field.name), field.metadata.get("minimum")
            allowed = field.metadata.get("choices")
            if minimum is not None and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                               or value < minimum):
                wanted = "a positive integer" if minimum == 1 else f"an integer of {minimum} or more"
                raise ValueError(f"{field.name} must be {wanted}, got {value!r}")
            if allowed is not None and value not in allowed and not (value is None and field.default is None):
                raise ValueError(f"{field.name} must be one of {list(allowed)}, got {value!r}")
        check_precision(self.precision)
        if self.precision != "float32" and self.dtype != "float32":
            raise ValueError(f"dtype {self.dtype!r} is for float embeddings; with precision {self.precision!r} the "
                             f"embeddings are stored as {self.precision} (leave dtype at float32)")
        if self.instruction and self.prompt_name is not None:
            raise ValueError(f"give an instruction (prompt) or a prompt_name, not both (got {self.instruction!r} "
                             f"and {self.prompt_name!r})")


def _resolved_name(name_or_path: str) -> str:
    """A local path as an absolute path (``runs/mntp`` and ``/abs/runs/mntp`` are one adapter); names as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def _stored_run(output: Path) -> dict[str, Any] | None:
    """``output``'s run.json: None when there is none, ``{}`` when unreadable (it differs from any settings and
    is replaced while no shard is complete); a version-2 one as the version-3 settings of the same run (it could
    only be that)."""
    try:
        stored = json.loads((output / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if stored and stored.get("format_version") == 2:
        stored = {**stored, "format_version": 3, "format": "npy", "truncate_dim": None, "precision": "float32",
                  "calibration_rows": None, "id_type": None}
    return stored


def _resolve_format(settings: CorpusSettings, output: Path) -> str:
    """The output format: the existing run's where the folder holds one (a complete shard or the manifest),
    which an explicit other ``format`` may not change; else ``settings.format`` or parquet."""
    stored = _stored_run(output) if output.is_dir() else None
    if stored is not None and (_complete_shards(output) or (output / "manifest.json").is_file()):
        existing = stored.get("format")
        if existing in FORMATS:
            if settings.format not in (None, existing):
                raise SettingsConflictError(
                    f"{output} holds a run in the {existing} format; it cannot continue as {settings.format}. Leave "
                    f"out --format (the run keeps {existing}), or start over: delete {output} or choose another "
                    f"output folder.")
            return existing
    return settings.format or DEFAULT_FORMAT


def _scan_input(source: Path, settings: CorpusSettings, *, ids: bool) -> tuple[dict[str, Any], str | None]:
    """(the input by content: size and SHA-256, so that a ``touch`` or a copy elsewhere changes nothing; with
    ``ids``, a Parquet run's id type). The id type is the first good row's, which every id must have (one column,
    one type): every row is read, so that a mixed input fails before any encoding, in the pass that hashes a text
    input (a Parquet input is hashed apart: pyarrow reads it)."""
    if not ids:
        return {"size": source.stat().st_size, "sha256": sha256(source)}, None
    digest = hashlib.sha256() if input_kind(source) != ".parquet" else None
    id_type = None
    for row in read_rows(source, text_field=settings.text_field, id_field=settings.id_field, digest=digest):
        if row.text is not None and row.id is not None:
            id_type = id_type or _id_type(_json_safe(row.id))
            _check_id(_json_safe(row.id), row.index, id_type)
    return {"size": source.stat().st_size, "sha256": digest.hexdigest() if digest else sha256(source)}, id_type or "int"


def _pinned_settings(settings: CorpusSettings, encoder, device, instruction: str, fingerprint: dict[str, Any],
                     format: str, id_type: str | None) -> dict[str, Any]:
    """Everything that decides the output's bytes, resolved: what run.json pins and a resume must repeat.
    The bad-row policy is not here: it decides whether the run may finish, not what a shard holds. A prompt
    name is pinned as the instruction it names."""
    budget = next((b for b in (settings.max_batch_tokens, encoder.max_batch_tokens) if b is not None),
                  settings.batch_size * encoder.max_length)
    parameter = next(encoder.model.parameters(), None)
    return {"format_version": FORMAT_VERSION, "model": _resolved_name(settings.model),
            "adapters": [_resolved_name(str(a)) for a in settings.adapters], "input": fingerprint,
            "text_field": settings.text_field, "id_field": settings.id_field, "instruction": instruction,
            "batch_size": settings.batch_size, "max_batch_tokens": budget,
            **{key: getattr(encoder, key) for key in ("max_length", "doc_max_length", "pooling_mode",
                                                      "skip_instruction", "max_padding")},
            "dtype": settings.dtype if settings.precision == "float32" else None,
            "truncate_dim": settings.truncate_dim, "precision": settings.precision,
            "calibration_rows": settings.calibration_rows if settings.precision in ("int8", "uint8") else None,
            "format": format, "id_type": id_type,
            "model_dtype": str(parameter.dtype).replace("torch.", "") if parameter is not None else None,
            "shard_size": settings.shard_size, "normalize": bool(settings.normalize), "device_type": device.type,
            "attention_impl": settings.attention_impl}


def _claim_output(output: Path, pinned: dict[str, Any]) -> bool:
    """Make ``output`` hold a run with exactly ``pinned`` settings, or refuse (rank 0 only). True when run.json
    was (re)written: what the folder held before belongs to no run."""
    output.mkdir(parents=True, exist_ok=True)
    stored = _stored_run(output)
    if stored == pinned:
        return False
    if stored is not None:
        done = _complete_shards(output)
        if done or (output / "manifest.json").is_file():
            changed = sorted(k for k in set(stored) | set(pinned) if stored.get(k) != pinned.get(k))
            details = "; ".join(f"{k}: was {stored.get(k)!r}, now {pinned.get(k)!r}" for k in changed)
            raise SettingsConflictError(
                f"{output} holds {len(done)} complete shard(s) of a run with other settings ({details}). Resume "
                f"with the same settings and input, or start over: delete {output} or choose another output folder.")
        logger.info("%s holds an earlier run that completed no shard; starting it again with these settings", output)
    _write_json(output / "run.json", pinned, indent=2)
    return True


_RUNS_IN_THIS_PROCESS = itertools.count(1)  # every rank runs encode_corpus as often, so a number names one run


def _distributed() -> tuple[int, int, Callable[[str | None], list[str | None]] | None]:
    """(rank, world_size, gather) from torchrun's environment: ``gather(message)`` returns every rank's message in
    rank order (None for one process).

    Only error messages cross ranks. Under torchrun they go through its rendezvous store, the TCP key-value store
    that every rank already reaches, and not through a process group of our own: a gloo group's worker threads and
    sockets, torn down by each rank as it finished, now and then aborted a rank at exit ("terminate called without
    an active exception"). A process group the program initialized itself is used as it is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1:
        return rank, world, None
    import torch.distributed as dist

    if dist.is_initialized():
        def gather(message: str | None) -> list[str | None]:
            gathered: list[str | None] = [None] * world
            dist.all_gather_object(gathered, message)
            return gathered

        return rank, world, gather
    from torch.distributed.constants import default_pg_timeout
    from torch.distributed.elastic.utils.store import synchronize

    run = next(_RUNS_IN_THIS_PROCESS)
    store = next(dist.rendezvous("env://"))[0]
    steps = itertools.count()

    def gather(message: str | None) -> list[str | None]:
        key = f"llm2vec_fast/encode_corpus/{run}/{next(steps)}/"
        sent = json.dumps(message).encode()
        return [json.loads(data) for data in synchronize(store, sent, rank, world, key,
                                                         timeout=default_pg_timeout.total_seconds())]

    return rank, world, gather


class OtherRankError(CorpusError):
    """Under torchrun: another rank stopped with an error, so this one stops too."""


@contextlib.contextmanager
def _together(rank: int, world: int, gather: Callable[[str | None], list[str | None]] | None):
    """A step that all ranks finish together: its end is a barrier that also carries each rank's error, so that
    a rank that fails (a bad row, other settings) stops every rank instead of leaving them at a barrier."""
    try:
        yield
    except BaseException as error:
        if gather is not None:
            with contextlib.suppress(Exception):  # the rank's own error is the one to raise
                gather(f"{type(error).__name__}: {error}")
        raise
    if gather is not None:
        failed = [(r, message) for r, message in enumerate(gather(None)) if message is not None]
        if failed:
            r, message = failed[0]
            raise OtherRankError(f"rank {r} of {world} stopped, so rank {rank} stops too: {message}")


def _check_source_and_output(source: Path, output: Path) -> None:
    """The mistakes that need no model to find, found before one loads."""
    if not source.is_file():
        raise FileNotFoundError(f"input file {source} does not exist" if not source.exists()
                                else f"input {source} is not a file")
    input_kind(source)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"output {output} is a file; the output must be a folder (it is created)")


def check_truncate_dim(settings: CorpusSettings, dimension: int) -> None:
    """ValueError when ``settings.truncate_dim`` exceeds the model's embedding size ``dimension``."""
    if settings.truncate_dim is not None and settings.truncate_dim > dimension:
        raise ValueError(f"truncate_dim {settings.truncate_dim} is larger than the embedding size {dimension} of "
                         f"{settings.model}: choose at most {dimension}")


def check_model(settings: CorpusSettings) -> None:
    """The model and adapters ``settings`` names resolve (``ModelNotFoundError`` in one line, without hub
    retries) and ``truncate_dim`` fits the model's config: found before anything heavy happens."""
    from .builtin_models import locate_model

    located = locate_model(settings.model)
    for adapter in settings.adapters:
        if not Path(adapter).expanduser().exists():
            locate_model(adapter)
    if settings.truncate_dim is not None:
        try:
            from transformers import AutoConfig

            check_truncate_dim(settings, int(AutoConfig.from_pretrained(located).hidden_size))
        except (OSError, AttributeError, KeyError):
            pass  # e.g. an adapter folder as the model: checked once the encoder is loaded


def load_encoder(settings: CorpusSettings, device):
    """The ``LLM2Vec`` that ``settings`` names (model, adapters merged, pooling, lengths, dtype), on ``device``,
    compiled with ``settings.compile``. Callers run ``check_model`` first, once, before anything heavy."""
    from .encoder import LLM2Vec
    from .dtypes import resolve_dtype

    model_dtype = settings.model_dtype if settings.model_dtype != "auto" or device.type == "cuda" else "float32"
    encoder = LLM2Vec.from_pretrained(
        settings.model, peft_model_name_or_path=list(settings.adapters) or None, merge_peft=True,
        dtype=resolve_dtype(model_dtype), pooling_mode=settings.pooling_mode, max_length=settings.max_length,
        doc_max_length=settings.doc_max_length, attention_impl=settings.attention_impl,
    )
    encoder.model.to(device)
    if settings.compile:
        encoder.compile_model()
    return encoder


def prepare_encoder(settings: CorpusSettings, encoder=None):
    """The setup that ``encode_corpus`` and the Ray callable share: (the encoder on its device, the device, the
    instruction of every text). ``encoder`` is moved to the device when given, else loaded (``load_encoder``).
    The device is ``settings.device``, else ``cuda:LOCAL_RANK`` where CUDA is, else the CPU."""
    import torch

    default = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    device = torch.device(settings.device or default)
    if encoder is None:
        encoder = load_encoder(settings, device)
    else:
        encoder.model.to(device)
    check_truncate_dim(settings, int(encoder.model.config.hidden_size))
    return encoder, device, resolve_prompt(encoder.prompts, settings.instruction or None, settings.prompt_name)


class _BatchProgress:
    """The ``progress`` that ``LLM2Vec.encode_tokenized`` updates once per batch: texts on the bar (tqdm shows
    texts/s) and tokens/s beside it. Batches take a shard's texts longest first, so the next ``n`` texts done
    are the next ``n`` of its lengths sorted that way."""

    def __init__(self, bar):
        self.bar, self.tokens, self.bad, self.started = bar, 0, 0, time.perf_counter()
        self._lengths: list[int] = []

    def start_shard(self, lengths: list[int]) -> None:
        self._lengths = sorted(lengths, reverse=True)

    def update(self, n: int) -> None:
        self.tokens += sum(self._lengths[:n])
        del self._lengths[:n]
        self.bar.update(n)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        postfix = {"tokens/s": f"{self.tokens / elapsed:.0f}"}
        if self.bad:
            postfix["bad"] = self.bad
        self.bar.set_postfix(postfix, refresh=False)


def embed_texts(encoder, settings: CorpusSettings, instruction: str, texts: list[str], device, progress=None):
    """Texts -> float32 ``(n, dim)`` numpy embeddings, truncated (``truncate_dim``) and normalized as asked, in
    the batches ``encode_tokenized`` makes of exactly these texts. Returns (embeddings, encoded texts)."""
    import torch

    encoded = encoder.tokenize_texts([(instruction, text) for text in texts])
    if progress is not None:
        progress.start_shard([len(e.input_ids) for e in encoded])
    vectors = encoder.encode_tokenized(encoded, batch_size=settings.batch_size, device=device,
                                       max_batch_tokens=settings.max_batch_tokens, progress=progress)
    if settings.truncate_dim is not None:
        vectors = vectors[:, :settings.truncate_dim]
    if settings.normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return vectors.numpy(), encoded


def stored_embeddings(vectors: np.ndarray, settings: CorpusSettings, ranges: np.ndarray | None) -> np.ndarray:
    """float32 embeddings -> what a shard stores: float16/float32 (``dtype``) or quantized (``precision``)."""
    if settings.precision != "float32":
        return quantize_embeddings(vectors, settings.precision, ranges=ranges)
    return vectors.astype(np.float16 if settings.dtype == "float16" else np.float32)


def _no_rows_stored(settings: CorpusSettings, dim: int) -> np.ndarray:
    """What a shard stores for no embedding of ``dim`` dimensions: its width and dtype, from the conversion itself."""
    return stored_embeddings(np.zeros((0, dim), np.float32), settings, np.zeros((2, dim), np.float32))


class _Shards:
    """Reads, encodes and writes shards: the input's rows grouped by shard (the bad-row policy applied as they are
    read), each shard's good rows encoded in the batches ``encode_tokenized`` makes of exactly them (so that a
    shard's bytes never depend on which run wrote it), and written with ``writer``."""

    def __init__(self, source: Path, settings: CorpusSettings, encoder, device, instruction: str, writer, progress):
        self.source, self.settings, self.writer, self.progress = source, settings, writer, progress
        self.encoder, self.device, self.instruction = encoder, device, instruction
        self.first_problem = None

    def rows(self, wanted=None) -> Iterator[list[Row]]:
        current: list[Row] = []
        for row in read_rows(self.source, text_field=self.settings.text_field, id_field=self.settings.id_field,
                             wanted=wanted):
            if row.text is None:
                self.progress.bad += 1
                self.first_problem = self.first_problem or row.problem
                # This rank's count is a lower bound of the run's: stop as soon as the policy is broken.
                _check_bad_rows(self.settings, self.progress.bad, 0, 0, self.first_problem)
            if current and row.index // self.settings.shard_size != current[0].index // self.settings.shard_size:
                yield current
                current = []
            current.append(row)
        if current:
            yield current

    def encode(self, rows: list[Row]) -> tuple[np.ndarray | None, dict[str, Any], list[int]]:
        """(float32 embeddings of the good rows, None when there is none; the shard's record; their row numbers)."""
        good = [r for r in rows if r.text is not None]
        # In the order the record file has; "dim" is set when the shard is written.
        record = {"shard": rows[0].index // self.settings.shard_size, "first_row": rows[0].index,
                  "last_row": rows[-1].index, "ids": [_json_safe(r.id) for r in good],
                  "bad_rows": [{"row": r.index, "id": _json_safe(r.id), "problem": r.problem}
                               for r in rows if r.text is None],
                  "dim": None, "rows": len(rows), "encoded": len(good), "bad": len(rows) - len(good), "truncated": 0,
                  "empty": 0, "tokens": 0}
        numbers = [r.index for r in good]
        if not good:
            return None, record, numbers
        vectors, encoded = embed_texts(self.encoder, self.settings, self.instruction, [r.text for r in good],
                                       self.device, self.progress)
        record.update(truncated=sum(e.truncated for e in encoded), empty=sum(1 for r in good if not r.text.strip()),
                      tokens=sum(len(e.input_ids) for e in encoded))
        return vectors, record, numbers

    def write(self, vectors: np.ndarray | None, record: dict[str, Any], numbers: list[int],
              ranges: np.ndarray | None) -> None:
        array = (_no_rows_stored(self.settings, self.settings.truncate_dim or self.encoder.model.config.hidden_size)
                 if vectors is None else stored_embeddings(vectors, self.settings, ranges))
        self.writer.write_shard(record["shard"], array, {**record, "dim": int(array.shape[1])}, numbers)

    def calibrate(self, ranges_file: Path) -> None:
        """int8/uint8: ``(2, dim)`` ranges from the embeddings of the input's first ``calibration_rows`` good rows,
        so that every shard (and every rank) quantizes with the same buckets. Those rows are encoded once: as
        parts of their shards, which are written here, with the ranges."""
        encoded, good = [], 0
        for rows in self.rows():
            encoded.append(self.encode(rows))
            good += encoded[-1][1]["encoded"]
            if good >= self.settings.calibration_rows:
                break
        if good < 2:
            raise CorpusError(f"precision {self.settings.precision!r} needs at least 2 good rows to calibrate its "
                              f"ranges; {self.source} has {good}")
        logger.info("Calibrating %s ranges on the first %d rows", self.settings.precision,
                    min(good, self.settings.calibration_rows))
        vectors = np.concatenate([v for v, _, _ in encoded if v is not None])[: self.settings.calibration_rows]
        ranges = quantization_ranges(vectors)
        atomic_write(ranges_file, lambda h: np.save(h, ranges))
        for shard in encoded:
            self.write(*shard, ranges)


def _check_bad_rows(settings: CorpusSettings, bad: int, rows: int, encoded: int, first_problem: str | None) -> None:
    """The bad-row policy on counts so far (one rank's while streaming, the whole run's at the end)."""
    if not bad:
        return
    if settings.on_bad_row == "error":
        raise BadRowError(f"bad input row: {first_problem}. Fix the input, or skip such rows (--on-bad-row skip) "
                          f"to list them in the manifest and go on.")
    if settings.max_bad_rows is not None and bad > settings.max_bad_rows:
        raise TooManyBadRowsError(f"{bad} bad rows, more than the {settings.max_bad_rows} allowed (max_bad_rows; "
                                  f"first: {first_problem}). Fix the input, or allow more.")
    if rows and not encoded and bad == rows:
        raise TooManyBadRowsError(f"every one of the {rows} rows is bad (first: {first_problem}): check the text "
                                  f"field ({settings.text_field!r}) and the input's format.")


def encode_corpus(source: str | Path, output: str | Path, settings: CorpusSettings, *, encoder=None,
                  writer: ShardWriter | None = None, show_progress_bar: bool | None = None) -> dict[str, Any]:
    """Encode ``source`` into shards in ``output`` (resuming what is there) and return the manifest.

    ``encoder`` (an ``LLM2Vec``) is used as given when passed (``settings.model``/``adapters`` then only say
    what it is, for run.json); otherwise it is loaded from ``settings``. ``writer`` writes the shard files
    (default ``ShardWriter(output, format, id_type)``). Under torchrun each rank encodes its share; rank 0
    returns the manifest, the others ``{}``; a rank that fails stops the others too (they raise ``OtherRankError``
    with its message). Raises ``CorpusError`` (a ``ValueError``) for bad rows, conflicting settings or too many bad
    rows, ``FileNotFoundError``/``NotADirectoryError`` for paths, ``ModelNotFoundError`` for a model that resolves
    nowhere, ``ValueError`` for an unknown ``prompt_name``, a ``truncate_dim`` larger than the embedding size or an
    unknown ``precision``."""
    from tqdm.auto import tqdm

    settings.validate()
    source, output = Path(source), Path(output)
    _check_source_and_output(source, output)
    if encoder is None:  # a model or prompt name that names nothing fails before anything heavy
        check_model(settings)
        resolve_prompt(default_prompts(), settings.instruction or None, settings.prompt_name)
    format = _resolve_format(settings, output)
    if format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ImportError("the parquet format (the default) needs pyarrow: pip install pyarrow, or write .npy "
                              "shards with --format npy (format='npy')") from None
    rank, world, gather = _distributed()
    disable = not logger.isEnabledFor(logging.INFO) if show_progress_bar is None else not show_progress_bar
    bar = tqdm(desc=f"Encoding (rank {rank})" if world > 1 else "Encoding", unit="text", disable=disable,
               position=rank if world > 1 else None)
    try:
        with _together(rank, world, gather):
            encoder, device, instruction = prepare_encoder(settings, encoder)
            fingerprint, id_type = _scan_input(source, settings, ids=format == "parquet")
            pinned = _pinned_settings(settings, encoder, device, instruction, fingerprint, format, id_type)
            if writer is None:
                writer = ShardWriter(output, format, id_type)
            elif writer.format != format:
                raise ValueError(f"the writer writes {writer.format} shards, but this run's format is {format}")
            shards = _Shards(source, settings, encoder, device, instruction, writer, _BatchProgress(bar))
            ranges_file = output / RANGES_FILE
            if rank == 0:
                fresh = _claim_output(output, pinned)
                if fresh and ranges_file.is_file():
                    ranges_file.unlink()  # an earlier run's that completed no shard
                if settings.precision in ("int8", "uint8") and not ranges_file.is_file():
                    shards.calibrate(ranges_file)
        with _together(rank, world, gather):
            if rank != 0 and _stored_run(output) != pinned:
                raise SettingsConflictError(f"rank {rank} resolved other settings than rank 0 "
                                            f"(see {output / 'run.json'})")
            complete = (output / "manifest.json").is_file()
            if not complete:
                ranges = np.load(ranges_file) if settings.precision in ("int8", "uint8") else None
                _encode_shards(shards, output, ranges, rank, world)
        if complete:
            logger.info("%s is already complete (manifest.json present); nothing to do", output)
            return json.loads((output / "manifest.json").read_text(encoding="utf-8")) if rank == 0 else {}
        if rank == 0:
            return _write_manifest(output, settings, pinned, encoder, source, int(encoder.model.config.hidden_size))
        return {}
    finally:
        bar.close()


def _encode_shards(shards: _Shards, output: Path, ranges: np.ndarray | None, rank: int, world: int) -> None:
    """This rank's shards (``k % world == rank``) that are not complete, after removing their stale temporary files."""
    format, shard_size = shards.writer.format, shards.settings.shard_size
    for stale in [*output.glob("*.tmp"), *output.glob("data/*.tmp")]:
        shard = stale.name.split("-")[-1].split(".")[0]
        if shard.isdigit() and int(shard) % world == rank:
            stale.unlink()
    done_before = [k for k in _complete_shards(output, format) if k % world == rank]
    if done_before:
        logger.info("Resuming: %d shard(s) of this rank are already complete", len(done_before))

    @functools.cache  # asked once per row, answered once per shard
    def wanted_shard(k: int) -> bool:
        return k % world == rank and not shard_complete(output, k, format)

    for rows in shards.rows(lambda index: wanted_shard(index // shard_size)):
        shards.write(*shards.encode(rows), ranges)


def _write_manifest(output: Path, settings: CorpusSettings, pinned: dict, encoder, source: Path,
                    dimension: int) -> dict:
    from .encoder import ENCODER_KEYS

    format = pinned["format"]
    shards = []
    totals = {"rows": 0, "encoded": 0, "bad": 0, "truncated": 0, "empty": 0, "tokens": 0}
    bad_rows = []
    embedding_dim = settings.truncate_dim or dimension
    stored = _no_rows_stored(settings, embedding_dim)
    records = [json.loads((output / shard_names(k, format)[1]).read_text(encoding="utf-8"))
               for k in _complete_shards(output, format)]
    # By shard number, not file name: past 99,999 shards the names no longer sort in shard order.
    for record in sorted(records, key=lambda r: r["shard"]):
        k = record["shard"]
        # The shards must cover rows 0..rows-1 without a gap: a gap means a shard is missing.
        if record["first_row"] != totals["rows"]:
            raise RuntimeError(f"shard {k} starts at row {record['first_row']}, expected {totals['rows']}: a shard "
                               f"is missing in {output}")
        embeddings_name, record_name = shard_names(k, format)
        shards.append({"shard": k, "embeddings": embeddings_name, "ids" if format == "npy" else "record": record_name,
                       **{key: record[key] for key in ("first_row", "last_row", "rows", "encoded")}})
        for key in totals:
            totals[key] += record[key]
        bad_rows.extend(record["bad_rows"])
    # The whole run's counts (a resumed run's shards may come from an earlier, more lenient run).
    _check_bad_rows(settings, totals["bad"], totals["rows"], totals["encoded"],
                    bad_rows[0]["problem"] if bad_rows else None)
    if totals["bad"]:
        logger.warning("%d bad row(s) were skipped; they are listed in manifest.json", totals["bad"])
    if totals["truncated"]:
        logger.info("%d text(s) were longer than the limits and truncated", totals["truncated"])
    manifest = {
        "format_version": FORMAT_VERSION, "complete": True, "model": pinned["model"], "adapters": pinned["adapters"],
        "input_path": str(source.resolve()),
        "encoder": {k: getattr(encoder, k) for k in ENCODER_KEYS},
        "settings": pinned,
        "bad_row_policy": {"on_bad_row": settings.on_bad_row, "max_bad_rows": settings.max_bad_rows},
        "format": format,
        "dim": stored.shape[1],  # columns of the stored embeddings (bytes per row for binary/ubinary)
        "embedding_dim": embedding_dim,  # dimensions (after truncate_dim)
        "dtype": stored.dtype.name, "precision": settings.precision,
        "quantization_ranges": RANGES_FILE if settings.precision in ("int8", "uint8") else None,
        "counts": totals, "bad_rows": bad_rows, "shards": shards,
        "settings_sha256": hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest(),
    }
    _write_json(output / "manifest.json", manifest, indent=2)
    logger.info("Wrote %d embeddings in %d shard(s) to %s", totals["encoded"], len(shards), output)
    return manifest


# ---------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``llm2vec-fast encode``'s options: ``--input``, ``--output`` and every ``CorpusSettings`` field."""
    parser.add_argument("--input", required=True, help="input file: " + ", ".join(SUFFIXES))
    parser.add_argument("--output", required=True, help="output folder (created; resumed if it holds a run)")
    for field in dataclasses.fields(CorpusSettings):
        options = {key: value for key, value in field.metadata.items() if key not in ("flags", "minimum")}
        if field.type == "bool":
            options["action"] = "store_true"
        elif field.type == "list[str]":
            options.update(action="append", default=[])
        elif field.default is dataclasses.MISSING:
            options["required"] = True
        else:
            options.update(default=field.default, type=int if field.type.startswith("int") else str)
        parser.add_argument(*field.metadata.get("flags", [f"--{field.name.replace('_', '-')}"]), dest=field.name,
                            **options)


def main(args) -> int:
    settings = CorpusSettings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(CorpusSettings)})
    encode_corpus(args.input, args.output, settings)
    return 0
