"""``llm2vec-fast encode``: a large corpus into embedding shards, resumable, one process or many (torchrun).

Input (streamed, memory constant in the corpus size): ``.txt`` (one text per line; an empty line is an empty
text), ``.jsonl`` (one object per line, text in ``--text-field``, id in ``--id-field``), ``.parquet`` (columns
``--text-field``/``--id-field``); ``.txt.gz``/``.jsonl.gz`` too. Rows are numbered from 0 in file order; a row
without an id gets its row number as id.

Output in ``--output``:

- ``run.json``: the settings, written first; a later run with other settings refuses to continue.
- per shard ``k`` (input rows ``[k * shard_size, (k + 1) * shard_size)``): ``embeddings-0000k.npy``
  ``(rows, dim)`` float16/float32 and ``ids-0000k.json`` (ids in order, row range, bad rows, truncated count).
  Each file is written to a temporary name, fsynced and renamed; the ids file is renamed last and is what marks
  the shard complete, so a shard is never taken as complete while half written.
- ``manifest.json``, written when every shard is complete: counts (rows, encoded, bad, empty, truncated),
  model, settings and the shard list.

Killed at any moment and started again with the same command, the run redoes only the shards that are not
complete; the result equals an uninterrupted run, byte for byte, since each shard is always encoded in the
same batches. Under torchrun, rank ``r`` of ``W`` encodes the shards ``k`` with ``k % W == r``: the files are
the same as a one-process run's. Bad rows (undecodable line, invalid JSON, missing or non-string text field)
stop the run with the file and line, or with ``--on-bad-row skip`` are listed in the shard's ids file and
counted in the manifest; nothing is dropped silently. Texts longer than ``--max-length`` tokens are cut there
(after llm2vec's ``doc_max_length`` word trimming) and counted as truncated.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .kernels._dispatch import IMPLEMENTATIONS
from .pooling import POOLING_MODES
from .training.modeling import MODEL_DTYPES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
_CRASH_AFTER_ENV = "LLM2VEC_FAST_TEST_CRASH_AFTER_SHARDS"  # test hook: die mid-write after this many shards


class BadRowError(ValueError):
    """A row of the input that cannot be encoded (undecodable, invalid JSON, no text field)."""


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
    raise ValueError(f"unsupported input {path}: use one of {', '.join(SUFFIXES)}")


def _open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        for line in handle:
            yield line


def _line_text(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRowError(f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def read_rows(path: str | Path, *, text_field: str = "text", id_field: str | None = "id",
              wanted=None) -> Iterator[Row]:
    """Stream the rows of ``path``. ``wanted(index) -> bool`` lets rows be skipped cheaply (not parsed).

    Bad rows are yielded with ``text=None`` and ``problem`` saying what is wrong, so the caller decides.
    A whitespace-only line of a .jsonl file is not a row (it is logged); in a .txt file it is an empty text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    kind = input_kind(path)
    if kind == ".parquet":
        yield from _read_parquet(path, text_field, id_field, wanted)
        return
    index = 0
    for number, raw in enumerate(_open_lines(path), start=1):
        if kind == ".jsonl" and not raw.strip():
            logger.debug("%s:%d: blank line, not a row", path, number)
            continue
        if wanted is not None and not wanted(index):
            index += 1
            continue
        try:
            line = _line_text(raw, path, number)
            if kind == ".txt":
                yield Row(index, index, line.rstrip("\r\n"))
            else:
                yield _json_row(line, path, number, index, text_field, id_field)
        except BadRowError as error:
            yield Row(index, index, None, str(error))
        index += 1


def _json_row(line: str, path: Path, number: int, index: int, text_field: str, id_field: str | None) -> Row:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadRowError(f"{path}:{number}: invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise BadRowError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise BadRowError(f"{path}:{number}: no field {text_field!r} (fields: {sorted(record)[:10]})")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadRowError(f"{path}:{number}: field {text_field!r} is {type(text).__name__}, not a string")
    row_id = record.get(id_field, index) if id_field else index
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
                if isinstance(text, str):
                    yield Row(index, row_id, text)
                else:
                    problem = f"{path}: row {index}: column {text_field!r} is {'null' if text is None else type(text).__name__}"
                    yield Row(index, row_id, None, problem)
            index += 1


# ---------------------------------------------------------------------------------------------------------- output
def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write through ``write(handle)`` into ``path.tmp``, fsync, rename onto ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    _maybe_crash(path)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


_shards_written = 0


def _maybe_crash(path: Path) -> None:
    # Test hook: die like a killed process (no clean-up) with an embeddings file written but not renamed.
    limit = os.environ.get(_CRASH_AFTER_ENV)
    if limit is not None and path.name.startswith("embeddings-") and _shards_written >= int(limit):
        os._exit(17)


def shard_names(k: int) -> tuple[str, str]:
    return f"embeddings-{k:05d}.npy", f"ids-{k:05d}.json"


def shard_complete(output: Path, k: int) -> bool:
    embeddings, ids = shard_names(k)
    return (output / ids).is_file() and (output / embeddings).is_file()


def load_output(output: str | Path) -> tuple[np.ndarray, list]:
    """Read a finished output folder: all embeddings ``(rows, dim)`` and ids, in input order (bad rows left out)."""
    output = Path(output)
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    arrays, ids = [], []
    for shard in manifest["shards"]:
        arrays.append(np.load(output / shard["embeddings"]))
        ids.extend(json.loads((output / shard["ids"]).read_text(encoding="utf-8"))["ids"])
    return np.concatenate(arrays) if arrays else np.zeros((0, manifest["dim"]), np.float32), ids


# ---------------------------------------------------------------------------------------------------------- run
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: built-in name (smollm2-135m), hub id or path")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH",
                        help="LoRA adapter to merge, in order (repeatable)")
    parser.add_argument("--input", required=True, help="input file: " + ", ".join(SUFFIXES))
    parser.add_argument("--output", required=True, help="output folder (created; resumed if it holds a run)")
    parser.add_argument("--text-field", default="text", help="text field/column of .jsonl/.parquet (default text)")
    parser.add_argument("--id-field", default="id", help="id field/column (default id; row number when absent)")
    parser.add_argument("--instruction", default="", help="instruction put before every text (llm2vec's pairs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per batch")
    parser.add_argument("--max-length", type=int, default=None, help="max tokens per input (default 512)")
    parser.add_argument("--doc-max-length", type=int, default=None, help="llm2vec's word trimming (default 400)")
    parser.add_argument("--pooling-mode", default=None, choices=POOLING_MODES)
    parser.add_argument("--dtype", default="float32", choices=["float16", "float32"], help="stored embeddings")
    parser.add_argument("--model-dtype", default="auto", choices=MODEL_DTYPES,
                        help="compute dtype (default auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--shard-size", type=int, default=10000, help="rows per shard (default 10000)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    parser.add_argument("--attention-impl", default="auto", choices=IMPLEMENTATIONS,
                        help="our attention kernel: auto (Triton on CUDA), triton, or torch (the PyTorch path)")
    parser.add_argument("--on-bad-row", default="error", choices=["error", "skip"],
                        help="stop at a bad row (default), or skip it and list it in the shard and manifest")


def _input_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _settings(args, device_type: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": args.model,
        "adapters": [str(a) for a in args.adapter],
        "input": _input_fingerprint(Path(args.input)),
        "text_field": args.text_field,
        "id_field": args.id_field,
        "instruction": args.instruction,
        "batch_size": args.batch_size,
        "max_batch_tokens": args.max_batch_tokens,
        "max_length": args.max_length,
        "doc_max_length": args.doc_max_length,
        "pooling_mode": args.pooling_mode,
        "dtype": args.dtype,
        "model_dtype": args.model_dtype,
        "shard_size": args.shard_size,
        "normalize": bool(args.normalize),
        "device_type": device_type,
        "on_bad_row": args.on_bad_row,
        "attention_impl": args.attention_impl,
    }


def _check_run_file(output: Path, settings: dict, rank: int) -> None:
    run_file = output / "run.json"
    if run_file.is_file():
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        if stored != settings:
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            details = "; ".join(f"{k}: was {stored.get(k)!r}, now {settings.get(k)!r}" for k in changed)
            raise SystemExit(f"{output} holds a run with other settings ({details}). Resume with the same "
                             f"command, or choose another --output.")
        return
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write(run_file, lambda h: h.write(json.dumps(settings, indent=2).encode("utf-8")))


def _distributed():
    """(rank, world_size, local_rank, group_initialized) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialized = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            # Only barriers cross ranks, so gloo serves on every machine.
            dist.init_process_group("gloo")
            initialized = True
    return rank, world, local_rank, initialized


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def main(args) -> int:
    global _shards_written
    import torch
    from tqdm.auto import tqdm

    from .encoder import LLM2Vec
    from .training.modeling import resolve_dtype

    if args.shard_size < 1 or args.batch_size < 1:
        raise SystemExit("--shard-size and --batch-size must be positive")
    input_path = Path(args.input)
    if not input_path.is_file():
        raise SystemExit(f"input file {input_path} does not exist")
    input_kind(input_path)
    rank, world, local_rank, initialized = _distributed()
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    output = Path(args.output)
    settings = _settings(args, device.type)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        _check_run_file(output, settings, rank)
    _barrier(world)
    if rank != 0:
        _check_run_file(output, settings, rank)
    try:
        if (output / "manifest.json").is_file():
            logger.info("%s is already complete (manifest.json present); nothing to do", output)
            return 0
        dtype = resolve_dtype(args.model_dtype if args.model_dtype != "auto" or device.type == "cuda" else "float32")
        encoder = LLM2Vec.from_pretrained(
            args.model, peft_model_name_or_path=args.adapter or None, merge_peft=True, dtype=dtype,
            pooling_mode=args.pooling_mode, max_length=args.max_length, doc_max_length=args.doc_max_length,
            attention_impl=args.attention_impl,
        )
        encoder.model.to(device)
        np_dtype = np.float16 if args.dtype == "float16" else np.float32

        def mine(k: int) -> bool:
            return k % world == rank

        for stale in output.glob("*.tmp"):
            shard = stale.name.split("-")[-1].split(".")[0]
            if shard.isdigit() and mine(int(shard)):
                stale.unlink()

        done_before = sum(1 for p in output.glob("ids-*.json") if mine(int(p.stem.split("-")[1])))
        if done_before:
            logger.info("Resuming: %d shard(s) of this rank are already complete", done_before)

        def wanted(index: int) -> bool:
            k = index // args.shard_size
            return mine(k) and not shard_complete(output, k)

        # shard_complete is asked once per row; cache it per shard.
        complete_cache: dict[int, bool] = {}

        def wanted_cached(index: int) -> bool:
            k = index // args.shard_size
            if k not in complete_cache:
                complete_cache[k] = wanted(index)
            return complete_cache[k]

        bar = tqdm(desc=f"Encoding (rank {rank})" if world > 1 else "Encoding", unit="text",
                   disable=not logger.isEnabledFor(logging.INFO), position=rank if world > 1 else None)
        tokens_seen, started = 0, time.perf_counter()
        current: list[Row] = []
        current_shard = None

        def flush(k: int, rows: list[Row]) -> None:
            nonlocal tokens_seen
            global _shards_written
            good = [r for r in rows if r.text is not None]
            bad = [{"row": r.index, "id": _json_safe(r.id), "problem": r.problem} for r in rows if r.text is None]
            dim = encoder.model.config.hidden_size
            stats = {"rows": len(rows), "encoded": len(good), "bad": len(bad), "truncated": 0, "empty": 0,
                     "tokens": 0}
            if good:
                pairs = [(args.instruction, r.text) for r in good]
                encoded = encoder.tokenize_texts(pairs)
                stats["truncated"] = sum(e.truncated for e in encoded)
                stats["empty"] = sum(1 for r in good if not r.text.strip())
                stats["tokens"] = sum(len(e.input_ids) for e in encoded)
                vectors = encoder.encode_tokenized(encoded, batch_size=args.batch_size, device=device,
                                                   max_batch_tokens=args.max_batch_tokens)
                if args.normalize:
                    vectors = torch.nn.functional.normalize(vectors, dim=-1)
                array = vectors.numpy().astype(np_dtype)
            else:
                array = np.zeros((0, dim), dtype=np_dtype)
            embeddings_name, ids_name = shard_names(k)
            atomic_write(output / embeddings_name, lambda h: np.save(h, array))
            record = {"shard": k, "first_row": rows[0].index, "last_row": rows[-1].index,
                      "ids": [_json_safe(r.id) for r in good], "bad_rows": bad, "dim": int(array.shape[1]), **stats}
            atomic_write(output / ids_name, lambda h: h.write(json.dumps(record).encode("utf-8")))
            _shards_written += 1
            tokens_seen += stats["tokens"]
            bar.update(len(rows))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(tokens_per_s=f"{tokens_seen / elapsed:.0f}", shard=k)

        for row in read_rows(input_path, text_field=args.text_field, id_field=args.id_field or None,
                             wanted=wanted_cached):
            if row.text is None and args.on_bad_row == "error":
                raise SystemExit(f"bad input row: {row.problem}. Fix the input, or pass --on-bad-row skip to list "
                                 f"such rows in the manifest and go on.")
            k = row.index // args.shard_size
            if current_shard is not None and k != current_shard:
                flush(current_shard, current)
                current = []
            current_shard = k
            current.append(row)
        if current:
            flush(current_shard, current)
        bar.close()
        _barrier(world)
        if rank == 0:
            _write_manifest(output, settings, encoder)
    finally:
        if initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _write_manifest(output: Path, settings: dict, encoder) -> None:
    shards = []
    totals = {"rows": 0, "encoded": 0, "bad": 0, "truncated": 0, "empty": 0, "tokens": 0}
    bad_rows = []
    dim = encoder.model.config.hidden_size
    records = [json.loads(p.read_text(encoding="utf-8")) for p in output.glob("ids-*.json")]
    # By shard number, not file name: past 99,999 shards the names no longer sort in shard order.
    for record in sorted(records, key=lambda r: r["shard"]):
        k = record["shard"]
        embeddings_name, ids_name = shard_names(k)
        shards.append({"shard": k, "embeddings": embeddings_name, "ids": ids_name, "first_row": record["first_row"],
                       "last_row": record["last_row"], "rows": record["rows"], "encoded": record["encoded"]})
        for key in totals:
            totals[key] += record[key]
        bad_rows.extend(record["bad_rows"])
        dim = record["dim"]
    # The shards must cover rows 0..rows-1 without a gap: a gap means a shard is missing.
    expected = 0
    for shard in shards:
        if shard["first_row"] != expected:
            raise RuntimeError(f"shard {shard['shard']} starts at row {shard['first_row']}, expected {expected}: "
                               f"a shard is missing in {output}")
        expected = shard["last_row"] + 1
    if totals["bad"]:
        logger.warning("%d bad row(s) were skipped; they are listed in manifest.json", totals["bad"])
    if totals["truncated"]:
        logger.info("%d text(s) were longer than the limits and truncated", totals["truncated"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "model": settings["model"],
        "adapters": settings["adapters"],
        "encoder": {k: getattr(encoder, k) for k in ("pooling_mode", "max_length", "doc_max_length",
                                                      "skip_instruction")},
        "settings": settings,
        "dim": dim,
        "dtype": settings["dtype"],
        "counts": totals,
        "bad_rows": bad_rows,
        "shards": shards,
        "settings_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
    }
    atomic_write(output / "manifest.json", lambda h: h.write(json.dumps(manifest, indent=2).encode("utf-8")))
    logger.info("Wrote %d embeddings in %d shard(s) to %s", totals["encoded"], len(shards), output)
