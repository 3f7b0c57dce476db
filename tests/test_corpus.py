"""Corpus encoding (``encode_corpus`` and ``llm2vec-fast encode``) on a tiny model: formats, bad rows,
kill-and-resume, torchrun ranks, resolved settings, and the errors a user meets."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

from llm2vec_fast.corpus import BadRowError, CorpusSettings, SettingsConflictError, TooManyBadRowsError

TEXTS = [f"Sentence number {i} says {'something ' * (i % 7)}about the world." for i in range(41)]
TEXTS[5] = ""
TEXTS[9] = "   "



@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    from llm2vec_fast import LLM2Vec

    encoder = LLM2Vec.from_pretrained(tiny_model_dir, attention_impl="torch")
    return encoder.encode(TEXTS, batch_size=4)


def write_jsonl(path: Path, texts=TEXTS) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return path


def encode_args(model, source, output, *extra):
    return ["encode", "--model", model, "--input", str(source), "--output", str(output), "--batch-size", "4",
            "--shard-size", "10", "--attention-impl", "torch", *extra]


def run_in_process(*args):
    """The command line, with library exceptions left to the test."""
    from llm2vec_fast.cli import run

    return run(list(args))


def run_program(*args) -> int:
    """The command line as a program: errors become one line on stderr and an exit code."""
    from llm2vec_fast.cli import main

    return main(list(args))


def run_subprocess(args, *, env_extra=None, torchrun=False, wait=True, stop=None):
    """``llm2vec-fast args`` in a new process; ``stop=(mode, shards, ready_file)`` runs it through
    tests/helpers/corpus_stop.py, which stops it at a chosen point of a shard's write."""
    env = dict(os.environ, TRITON_INTERPRET="0", **(env_extra or {}))
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    entry = ["-m", "llm2vec_fast.cli"] if stop is None else \
        [str(REPO_ROOT / "tests" / "helpers" / "corpus_stop.py"), *map(str, stop)]
    command = head + entry + ["--log-level", "WARNING"] + args
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def folder_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (Parquet shards are in ``data/``) by its relative name."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """One uninterrupted one-process run over the .jsonl input, in the default format (Parquet): the reference
    for resume and torchrun."""
    root = tmp_path_factory.mktemp("reference")
    source = write_jsonl(root / "input.jsonl")
    output = root / "out"
    assert run_in_process(*encode_args(tiny_model_dir, source, output)) == 0
    return source, output


@pytest.fixture(scope="module")
def reference(tiny_model_dir, uninterrupted, tmp_path_factory):
    """``reference(format)``: the uninterrupted run in that format (the default run for parquet)."""
    runs = {"parquet": uninterrupted}

    def get(format: str):
        if format not in runs:
            root = tmp_path_factory.mktemp(f"reference-{format}")
            source = write_jsonl(root / "input.jsonl")
            assert run_in_process(*encode_args(tiny_model_dir, source, root / "out", "--format", format)) == 0
            runs[format] = (source, root / "out")
        return runs[format]

    return get


def test_jsonl_txt_parquet_give_the_encoders_embeddings(tiny_model_dir, expected, uninterrupted, tmp_path):
    from llm2vec_fast.corpus import load_output

    source, output = uninterrupted
    vectors, ids = load_output(output)
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)
    assert ids == [f"doc-{i}" for i in range(len(TEXTS))]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == manifest["counts"]["encoded"] == len(TEXTS)
    assert manifest["counts"]["empty"] == 2 and manifest["counts"]["bad"] == 0
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 10, 10, 1]
    assert not list(output.glob("*.tmp"))

    (tmp_path / "input.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    run_in_process(*encode_args(tiny_model_dir, tmp_path / "input.txt", tmp_path / "txt", "--dtype", "float16"))
    vectors, ids = load_output(tmp_path / "txt")
    assert vectors.dtype == np.float16 and ids == list(range(len(TEXTS)))
    np.testing.assert_allclose(vectors.astype(np.float32), expected, rtol=2e-3, atol=2e-3)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": TEXTS, "key": list(range(100, 100 + len(TEXTS)))}), tmp_path / "input.parquet")
    run_in_process(*encode_args(tiny_model_dir, tmp_path / "input.parquet", tmp_path / "pq",
                                "--text-field", "body", "--id-field", "key"))
    vectors, ids = load_output(tmp_path / "pq")
    assert ids == list(range(100, 100 + len(TEXTS)))
    np.testing.assert_array_equal(vectors, load_output(output)[0])


@pytest.mark.slow  # new processes that load the model
@pytest.mark.parametrize("format", ["parquet", "npy"])
def test_resume_after_a_crash_mid_write_equals_an_uninterrupted_run(tiny_model_dir, reference, format, tmp_path):
    from llm2vec_fast.corpus import shard_names

    source, reference_output = reference(format)
    args = encode_args(tiny_model_dir, source, tmp_path / "out", "--format", format)
    crashed = run_subprocess(args, stop=("exit", 2, tmp_path / "unused"))
    assert crashed.returncode == 17, crashed.stdout + crashed.stderr
    names = set(folder_bytes(tmp_path / "out"))
    # Shard 2's embeddings were renamed into place, its record (the completion mark) never written.
    assert {shard_names(0, format)[1], shard_names(1, format)[1], shard_names(2, format)[0]} <= names
    assert shard_names(2, format)[1] not in names and "manifest.json" not in names
    assert run_in_process(*args) == 0  # the same command again, here in this process to save a start-up
    assert folder_bytes(tmp_path / "out") == folder_bytes(reference_output)


@pytest.mark.slow  # new processes that load the model
@pytest.mark.parametrize("format", ["parquet", "npy"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_model_dir, format, tmp_path):
    from llm2vec_fast.corpus import load_output, shard_names

    texts = [f"text {i} " + "word " * (i % 11) for i in range(90)]
    source = write_jsonl(tmp_path / "input.jsonl", texts)
    args = encode_args(tiny_model_dir, source, tmp_path / "killed", "--format", format)
    args[args.index("--shard-size") + 1] = "3"
    # The process pauses with 3 shards complete and shard 3 half written to its temporary file, and is killed
    # there: where the kill lands does not depend on how fast this machine is.
    ready = tmp_path / "ready"
    process = run_subprocess(args, wait=False, stop=("pause", 3, ready))
    deadline = time.time() + 300
    while not ready.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists(), process.communicate()[0]
    process.send_signal(signal.SIGKILL)
    process.wait()
    names = set(folder_bytes(tmp_path / "killed"))
    assert {shard_names(k, format)[1] for k in range(3)} <= names and shard_names(3, format)[0] + ".tmp" in names
    assert shard_names(3, format)[1] not in names and "manifest.json" not in names
    assert run_in_process(*args) == 0
    straight = list(args)
    straight[straight.index("--output") + 1] = str(tmp_path / "straight")
    assert run_in_process(*straight) == 0
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "straight")
    assert load_output(tmp_path / "killed")[1] == [f"doc-{i}" for i in range(90)]


@pytest.mark.slow  # new processes that load the model
def test_two_torchrun_ranks_equal_one_process(tiny_model_dir, uninterrupted, tmp_path):
    source, reference = uninterrupted
    result = run_subprocess(encode_args(tiny_model_dir, source, tmp_path / "ranks"), torchrun=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert folder_bytes(tmp_path / "ranks") == folder_bytes(reference)


def input_with_a_bad_row_in_rank_1s_shard(folder: Path) -> Path:
    """30 rows in shards of 10, which alternate between two ranks: row 14, invalid JSON, is in shard 1, rank 1's."""
    lines = [json.dumps({"id": f"doc-{i}", "text": f"text {i}"}) for i in range(30)]
    lines[14] = '{"id": "doc-14", "text": "broken'
    source = folder / "input.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return source


@pytest.mark.slow  # new processes that load the model
def test_under_torchrun_a_bad_row_on_one_rank_stops_every_rank(tiny_model_dir, tmp_path):
    # The ranks exchange their errors through torchrun's rendezvous store (no process group of their own): row 14
    # is in shard 1, rank 1's; rank 0 learns of it at the end of its shards and stops with rank 1's message.
    source = input_with_a_bad_row_in_rank_1s_shard(tmp_path)
    result = run_subprocess(encode_args(tiny_model_dir, source, tmp_path / "out"), torchrun=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "BadRowError" in output and "input.jsonl:15: invalid JSON" in output, output
    assert "rank 1 of 2 stopped, so rank 0 stops too: BadRowError: " in output, output
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow  # new processes that load the model
def test_a_bad_row_on_one_rank_stops_every_rank(tiny_model_dir, tmp_path):
    # Two ranks of a program that calls encode_corpus in its own process group and goes on after an error, so
    # that the failed rank's process stays alive (tests/helpers/corpus_rank.py). Shards of 10 rows alternate
    # between the ranks: row 14 is in shard 1, rank 1's. Before the error reached every rank, rank 0 waited at
    # the end-of-encoding barrier until the group's timeout (600 s here, 30 min by default).
    source = input_with_a_bad_row_in_rank_1s_shard(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = tmp_path / "done"
    ranks = [subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "helpers" / "corpus_rank.py"), tiny_model_dir, str(source),
         str(tmp_path / "out"), str(done)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=dict(os.environ, TRITON_INTERPRET="0", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for rank in range(2)]
    try:
        first = ranks[0].communicate(timeout=300)[0].decode()  # while rank 1 is alive
        done.touch()
        second = ranks[1].communicate(timeout=60)[0].decode()
    finally:
        for process in ranks:
            process.kill()
    assert second.startswith("1 BadRowError: ") and "input.jsonl:15: invalid JSON" in second, second
    assert first.startswith("0 OtherRankError: rank 1 of 2 stopped, so rank 0 stops too: BadRowError: "), first
    assert "input.jsonl:15: invalid JSON" in first
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_library_function_with_an_encoder_equals_the_command_line(tiny_model_dir, uninterrupted, tmp_path):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.corpus import encode_corpus

    source, reference = uninterrupted
    encoder = LLM2Vec.from_pretrained(tiny_model_dir, attention_impl="torch")
    settings = CorpusSettings(model=tiny_model_dir, batch_size=4, shard_size=10, attention_impl="torch")
    manifest = encode_corpus(source, tmp_path / "lib", settings, encoder=encoder)
    assert manifest["counts"]["encoded"] == len(TEXTS)
    assert folder_bytes(tmp_path / "lib") == folder_bytes(reference)


def test_refuses_to_resume_with_other_settings_and_says_how_to_start_over(tiny_model_dir, uninterrupted):
    source, output = uninterrupted
    with pytest.raises(SettingsConflictError, match=r"batch_size: was 4, now 8.*start over: delete"):
        run_in_process(*encode_args(tiny_model_dir, source, output, "--batch-size", "8"))


def test_settings_are_compared_resolved(tiny_model_dir, uninterrupted):
    source, output = uninterrupted
    run = json.loads((output / "run.json").read_text())
    assert (run["pooling_mode"], run["max_length"], run["doc_max_length"]) == ("mean", 512, 400)
    # The defaults given explicitly, and the model as another spelling of the same path: the same run.
    same = Path(os.path.relpath(tiny_model_dir))
    assert run_in_process(*encode_args(str(same), source, output, "--pooling-mode", "mean", "--max-length", "512",
                                       "--doc-max-length", "400", "--max-batch-tokens", str(4 * 512))) == 0
    with pytest.raises(SettingsConflictError, match="pooling_mode: was 'mean', now 'weighted_mean'"):
        run_in_process(*encode_args(tiny_model_dir, source, output, "--pooling-mode", "weighted_mean"))


def test_the_input_is_known_by_its_content_not_its_time(tiny_model_dir, uninterrupted, tmp_path):
    source, output = uninterrupted
    copy = tmp_path / "input.jsonl"
    shutil.copy(source, copy)
    shutil.copytree(output, tmp_path / "out")
    os.utime(copy, (time.time() + 100, time.time() + 100))  # touch, and a copy in another folder
    assert run_in_process(*encode_args(tiny_model_dir, copy, tmp_path / "out")) == 0
    with open(copy, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "new", "text": "one more row"}) + "\n")
    with pytest.raises(SettingsConflictError, match="input: was"):
        run_in_process(*encode_args(tiny_model_dir, copy, tmp_path / "out"))


def test_a_failed_run_with_no_complete_shard_does_not_pin_its_settings(tiny_model_dir, tmp_path):
    source = tmp_path / "input.jsonl"
    source.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n{broken\n", encoding="utf-8")
    output = tmp_path / "out"
    with pytest.raises(BadRowError, match="--on-bad-row skip"):
        run_in_process(*encode_args(tiny_model_dir, source, output))
    assert (output / "run.json").is_file()
    # What the message suggests works, here together with another batch size (no shard was complete).
    assert run_in_process(*encode_args(tiny_model_dir, source, output, "--on-bad-row", "skip",
                                       "--batch-size", "8")) == 0
    assert json.loads((output / "manifest.json").read_text())["counts"]["bad"] == 1

    # A wrong model name fails before anything is written; the corrected command then runs.
    with pytest.raises(ValueError, match="neither a built-in"):
        run_in_process(*encode_args(str(tmp_path / "no-such-model"), source, tmp_path / "second"))
    assert not (tmp_path / "second" / "run.json").exists()
    assert run_in_process(*encode_args(tiny_model_dir, source, tmp_path / "second", "--on-bad-row", "skip")) == 0


def test_progress_moves_per_batch_with_texts_and_tokens_per_second(tiny_model_dir, uninterrupted, tmp_path,
                                                                   monkeypatch):
    import tqdm.auto

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.corpus import encode_corpus

    encoder = LLM2Vec.from_pretrained(tiny_model_dir, attention_impl="torch")  # before tqdm is replaced
    bars = []

    class RecordingBar:
        def __init__(self, *args, **kwargs):
            self.updates, self.postfixes, self.kwargs = [], [], kwargs
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def set_postfix(self, postfix, refresh=True):
            self.postfixes.append(dict(postfix))

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    source, _ = uninterrupted
    settings = CorpusSettings(model=tiny_model_dir, batch_size=4, shard_size=20, attention_impl="torch")
    encode_corpus(source, tmp_path / "out", settings, encoder=encoder, show_progress_bar=True)
    (bar,) = [b for b in bars if b.kwargs.get("unit") == "text" and b.updates]
    assert sum(bar.updates) == len(TEXTS) and max(bar.updates) <= 4 and len(bar.updates) >= len(TEXTS) / 4
    assert bar.kwargs["disable"] is False
    assert all(float(p["tokens/s"]) > 0 for p in bar.postfixes) and len(bar.postfixes) == len(bar.updates)


def test_a_run_where_every_row_or_too_many_rows_are_bad_is_an_error(tiny_model_dir, uninterrupted, tmp_path):
    source, _ = uninterrupted
    with pytest.raises(TooManyBadRowsError, match="every one of the 41 rows is bad"):
        run_in_process(*encode_args(tiny_model_dir, source, tmp_path / "a", "--on-bad-row", "skip",
                                    "--text-field", "body"))
    assert not (tmp_path / "a" / "manifest.json").exists()
    lines = [json.dumps({"id": i, "text": "ok"}) for i in range(5)] + ["{", "{", "{"]
    (tmp_path / "some.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TooManyBadRowsError, match="3 bad rows, more than the 2 allowed"):
        run_in_process(*encode_args(tiny_model_dir, tmp_path / "some.jsonl", tmp_path / "b", "--on-bad-row", "skip",
                                    "--max-bad-rows", "2"))
    # The limit is a policy, not a setting of the output: raising it finishes the same folder.
    assert run_in_process(*encode_args(tiny_model_dir, tmp_path / "some.jsonl", tmp_path / "b", "--on-bad-row",
                                       "skip", "--max-bad-rows", "3")) == 0


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm2vec-fast: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_an_unknown_model_is_one_line_before_anything_heavy(tmp_path, capsys, monkeypatch):
    from llm2vec_fast import corpus

    source = write_jsonl(tmp_path / "input.jsonl", TEXTS[:3])

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work began before the model name was checked")

    # The output's run.json, pyarrow, the process group, the model's weights: none before the name is checked.
    for name in ("_resolve_format", "_distributed", "load_encoder"):
        monkeypatch.setattr(corpus, name, heavy)
    assert run_program(*encode_args("no-such-model", source, tmp_path / "a")) == 1
    err = _one_error_line(capsys)
    assert "neither a built-in model (smollm2-135m) nor an existing local path" in err and "HF_HUB_OFFLINE" in err
    assert run_program(*encode_args(str(tmp_path), source, tmp_path / "a", "--adapter", "no-such-adapter")) == 1
    assert "holds neither config.json nor adapter_config.json" in _one_error_line(capsys)
    # With the hub allowed but unreachable: one attempt, and the message says the hub could not be reached.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert run_program(*encode_args("no-such-model", source, tmp_path / "b")) == 1
    assert "could not be reached" in _one_error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_file_as_output_and_an_unsupported_input_are_one_line_each(tiny_model_dir, uninterrupted, tmp_path,
                                                                      capsys):
    source, _ = uninterrupted
    (tmp_path / "taken").write_text("a file")
    assert run_program(*encode_args(tiny_model_dir, source, tmp_path / "taken")) == 1
    assert "is a file; the output must be a folder" in _one_error_line(capsys)
    (tmp_path / "corpus.csv").write_text("id,text\n1,hello\n")
    assert run_program(*encode_args(tiny_model_dir, tmp_path / "corpus.csv", tmp_path / "out")) == 1
    assert "unsupported input" in _one_error_line(capsys)
    assert run_program(*encode_args(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "out")) == 1
    assert "does not exist" in _one_error_line(capsys)


def test_bad_rows_stop_the_run_or_are_listed(tiny_model_dir, tmp_path):
    from llm2vec_fast.corpus import load_output

    lines = [
        json.dumps({"id": "a", "text": "fine"}).encode(),
        b'{"id": "b", "text": "broken json"',
        json.dumps({"id": "c", "body": "no text field"}).encode(),
        json.dumps({"id": "d", "text": 12}).encode(),
        b'{"id": "e", "text": "\xff\xfe not utf-8"}',
        json.dumps({"id": "f", "text": ""}).encode(),
        json.dumps({"id": "g", "text": "long " * 40}).encode(),
        b"",
        b'{"id": "tab", "text": "a\tb"}',
        json.dumps({"id": "h", "text": "also fine"}).encode(),
    ]
    source = tmp_path / "input.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    args = encode_args(tiny_model_dir, source, tmp_path / "strict", "--max-length", "16")
    with pytest.raises(BadRowError, match=r"input.jsonl:2: invalid JSON"):
        run_in_process(*args)
    args = encode_args(tiny_model_dir, source, tmp_path / "skip", "--max-length", "16", "--on-bad-row", "skip")
    assert run_in_process(*args) == 0
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert (counts["rows"], counts["encoded"], counts["bad"], counts["empty"], counts["truncated"]) == (9, 4, 5, 1, 1)
    problems = {row["id"]: row["problem"] for row in manifest["bad_rows"]}
    # A row keeps its own id where it had a readable one; the others are named by row number.
    assert set(problems) == {1, "c", "d", 4, 7}
    assert problems[1].endswith("input.jsonl:2: invalid JSON (Expecting ',' delimiter: line 1 column 34 (char 33))")
    assert "no field 'text'" in problems["c"] and "int, not a string" in problems["d"]
    assert "not valid UTF-8" in problems[4]
    # The whole of json's message, with where in the line: not cut at "Invalid control character at".
    assert problems[7].endswith("input.jsonl:9: invalid JSON (Invalid control character at: line 1 column 25 "
                                "(char 24))")
    vectors, ids = load_output(tmp_path / "skip")
    assert ids == ["a", "f", "g", "h"] and np.isfinite(vectors).all()
    assert [row["row"] for row in manifest["bad_rows"]] == [1, 2, 3, 4, 7]


@pytest.mark.parametrize("argv,bad", [
    (["encode", "--input", "in.txt", "--output", "out", "--pooling-mode", "avg"], "--pooling-mode"),
    (["encode", "--input", "in.txt", "--output", "out", "--model-dtype", "bf32"], "--model-dtype"),
    (["eval", "--tasks", "STSBenchmark", "--output", "out", "--dtype", "half"], "--dtype"),
    (["eval", "--tasks", "STSBenchmark", "--output", "out", "--attention-impl", "flash"], "--attention-impl"),
    (["eval", "--tasks", "STSBenchmark", "--output", "out", "--pooling-mode", "max"], "--pooling-mode"),
])
def test_cli_choices_are_refused_before_any_model_loads(argv, bad, capsys):
    from llm2vec_fast.cli import main as cli_main

    # "no-such-model" would fail later, with another error, if the bad choice got past the argument parser.
    with pytest.raises(SystemExit) as exit_info:
        cli_main([argv[0], "--model", "no-such-model", *argv[1:]])
    assert exit_info.value.code == 2
    assert f"argument {bad}: invalid choice" in capsys.readouterr().err


def test_parquet_shards_read_as_one_table_by_pyarrow_pandas_and_datasets(uninterrupted, expected):
    import datasets
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    _, output = uninterrupted
    data = output / "data"
    assert sorted(p.name for p in data.iterdir()) == [f"embeddings-{k:05d}.parquet" for k in range(5)]
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    dim = expected.shape[1]

    table = pq.read_table(data)
    assert table.schema.names == ["id", "row", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert table.schema.field("id").type == pa.string() and table.schema.field("row").type == pa.int64()
    assert table.column("id").to_pylist() == ids and table.column("row").to_pylist() == list(range(len(TEXTS)))
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)

    globbed = ds.dataset(sorted(str(p) for p in data.glob("*.parquet")), format="parquet").to_table()
    assert globbed.equals(table)

    frame = pd.read_parquet(data)
    assert frame["id"].tolist() == ids
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), vectors)

    loaded = datasets.load_dataset("parquet", data_files=str(data / "*.parquet"), split="train",
                                   cache_dir=str(output.parent / "hf-cache"))
    assert loaded["id"] == ids and loaded["row"] == list(range(len(TEXTS)))
    np.testing.assert_array_equal(np.asarray(loaded["embedding"], dtype=np.float32), vectors)


def test_parquet_shard_bytes_depend_on_content_only():
    import pyarrow.parquet as pq
    import pyarrow as pa

    from llm2vec_fast.corpus import parquet_shard_bytes

    rng = np.random.default_rng(0)
    for array in (rng.standard_normal((37, 5)).astype(np.float16), rng.integers(-128, 127, (37, 3), dtype=np.int8)):
        first = parquet_shard_bytes(array, [f"d{i}" for i in range(37)], list(range(10, 47)), "str")
        time.sleep(1.1)  # a timestamp of seconds would show
        assert parquet_shard_bytes(array, [f"d{i}" for i in range(37)], list(range(10, 47)), "str") == first
        table = pq.read_table(pa.BufferReader(first))
        assert table.schema.field("embedding").type == pa.list_(pa.from_numpy_dtype(array.dtype), array.shape[1])
        np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), array)
        metadata = pq.read_metadata(pa.BufferReader(first))
        assert metadata.row_group(0).column(0).compression == "ZSTD"


def test_an_existing_run_keeps_its_format_and_an_explicit_other_one_is_refused(tiny_model_dir, reference, tmp_path):
    source, npy_run = reference("npy")
    assert sorted(p.name for p in npy_run.glob("embeddings-*.npy"))[0] == "embeddings-00000.npy"
    assert not (npy_run / "data").exists()
    copy = tmp_path / "out"
    shutil.copytree(npy_run, copy)
    (copy / "manifest.json").unlink()
    (copy / "ids-00004.json").unlink()
    with pytest.raises(SettingsConflictError, match=r"holds a run in the npy format; it cannot continue as parquet"):
        run_in_process(*encode_args(tiny_model_dir, source, copy, "--format", "parquet"))
    assert run_in_process(*encode_args(tiny_model_dir, source, copy)) == 0  # no --format: it stays npy
    assert folder_bytes(copy) == folder_bytes(npy_run)


def test_a_run_of_the_previous_format_version_resumes(tiny_model_dir, reference, tmp_path):
    """A run.json written before the Parquet format (version 2: no format, precision, truncate_dim) is the npy
    run it was, and resumes; its shards are kept."""
    source, npy_run = reference("npy")
    copy = tmp_path / "out"
    shutil.copytree(npy_run, copy)
    run = json.loads((copy / "run.json").read_text())
    for key in ("format", "truncate_dim", "precision", "calibration_rows", "id_type"):
        del run[key]
    run["format_version"] = 2
    (copy / "run.json").write_text(json.dumps(run, indent=2))
    (copy / "manifest.json").unlink()
    (copy / "ids-00003.json").unlink()
    kept = (copy / "ids-00000.json").stat().st_mtime_ns
    assert run_in_process(*encode_args(tiny_model_dir, source, copy)) == 0
    assert (copy / "ids-00000.json").stat().st_mtime_ns == kept
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["format"] == "npy" and manifest["counts"]["encoded"] == len(TEXTS)
    assert folder_bytes(copy)["embeddings-00003.npy"] == folder_bytes(npy_run)["embeddings-00003.npy"]


@pytest.mark.slow
def test_encode_options_truncate_normalize_precision(tiny_model_dir, expected, uninterrupted, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm2vec_fast.corpus import load_output
    from llm2vec_fast.quantization import quantize_embeddings

    source, _ = uninterrupted
    truncated = expected[:, :20]
    normalized = truncated / np.linalg.norm(truncated, axis=1, keepdims=True)

    run_in_process(*encode_args(tiny_model_dir, source, tmp_path / "f", "--truncate-dim", "20", "--normalize"))
    vectors, _ = load_output(tmp_path / "f")
    np.testing.assert_allclose(vectors, normalized, rtol=1e-4, atol=1e-5)

    run_in_process(*encode_args(tiny_model_dir, source, tmp_path / "b", "--truncate-dim", "20", "--precision",
                                "binary"))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert (manifest["dim"], manifest["embedding_dim"], manifest["dtype"]) == (3, 20, "int8")
    assert pq.read_schema(tmp_path / "b" / "data" / "embeddings-00000.parquet").field("embedding").type == \
        pa.list_(pa.int8(), 3)
    np.testing.assert_array_equal(load_output(tmp_path / "b")[0], quantize_embeddings(truncated, "binary"))

    # int8: one set of ranges for the whole run, from the first --calibration-rows rows, kept beside the shards.
    run_in_process(*encode_args(tiny_model_dir, source, tmp_path / "q", "--precision", "int8", "--normalize",
                                "--truncate-dim", "20", "--calibration-rows", "41", "--format", "npy"))
    quantized, _ = load_output(tmp_path / "q")
    ranges = np.load(tmp_path / "q" / "quantization-ranges.npy")
    np.testing.assert_allclose(ranges, np.stack([normalized.min(0), normalized.max(0)]), atol=1e-5)
    reference_buckets = quantize_embeddings(normalized, "int8", ranges=ranges)
    assert quantized.dtype == np.int8
    # Float noise may move a value on a bucket's edge by one bucket, no more.
    assert np.abs(quantized.astype(int) - reference_buckets.astype(int)).max() <= 1
    assert (quantized == reference_buckets).mean() > 0.99
    with pytest.raises(SettingsConflictError, match="calibration_rows: was 41, now 40"):
        run_in_process(*encode_args(tiny_model_dir, source, tmp_path / "q", "--precision", "int8", "--normalize",
                                    "--truncate-dim", "20", "--calibration-rows", "40"))


@pytest.mark.slow
def test_a_prompt_name_is_pinned_as_its_instruction(tiny_model_dir, uninterrupted, tmp_path):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.corpus import load_output
    from llm2vec_fast.prompts import default_prompts

    source, _ = uninterrupted
    output = tmp_path / "query"
    assert run_in_process(*encode_args(tiny_model_dir, source, output, "--prompt-name", "query")) == 0
    encoder = LLM2Vec.from_pretrained(tiny_model_dir, attention_impl="torch")
    np.testing.assert_allclose(load_output(output)[0], encoder.encode(TEXTS, batch_size=4, prompt_name="query"),
                               rtol=1e-4, atol=1e-5)
    query = default_prompts()["query"]
    assert json.loads((output / "run.json").read_text())["instruction"] == query
    # The same instruction given as --prompt is the same run; another one is refused.
    assert run_in_process(*encode_args(tiny_model_dir, source, output, "--prompt", query)) == 0
    with pytest.raises(SettingsConflictError, match="instruction: was"):
        run_in_process(*encode_args(tiny_model_dir, source, output, "--prompt-name", "STS12"))
    with pytest.raises(SettingsConflictError, match="truncate_dim: was None, now 8"):
        run_in_process(*encode_args(tiny_model_dir, source, output, "--prompt-name", "query", "--truncate-dim", "8"))


@pytest.mark.parametrize("extra,message", [
    (["--prompt-name", "no-such-task"], "unknown prompt_name 'no-such-task'"),
    (["--prompt-name", "query", "--prompt", "Retrieve:"], "not both"),
    (["--truncate-dim", "100000"], "truncate_dim 100000 is larger than the embedding size"),
    (["--truncate-dim", "0"], "truncate_dim must be a positive integer, got 0"),
    (["--precision", "int4"], "precision must be one of"),
    (["--precision", "int8", "--dtype", "float16"], "dtype 'float16' is for float embeddings"),
])
def test_bad_encode_options_are_one_line_and_write_nothing(tiny_model_dir, uninterrupted, extra, message, tmp_path,
                                                           capsys):
    source, _ = uninterrupted
    assert run_program(*encode_args(tiny_model_dir, source, tmp_path / "out", *extra)) == 1
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def counting_encoder(tiny_model_dir):
    """An encoder that records how many texts each ``encode_tokenized`` call encodes."""
    from llm2vec_fast import LLM2Vec

    encoder = LLM2Vec.from_pretrained(tiny_model_dir, attention_impl="torch")
    encoder.encoded, encode_tokenized = [], encoder.encode_tokenized
    encoder.encode_tokenized = lambda texts, **kwargs: encoder.encoded.append(len(texts)) or encode_tokenized(
        texts, **kwargs)
    return encoder


def test_parquet_ids_of_two_types_are_an_error_naming_the_row_before_any_encoding(tiny_model_dir, tmp_path):
    from llm2vec_fast.corpus import encode_corpus

    source = tmp_path / "input.jsonl"
    rows = [{"id": f"doc-{i}", "text": f"text {i}"} for i in range(25)] + [{"text": "no id: its row number"}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    encoder = counting_encoder(tiny_model_dir)
    settings = CorpusSettings(model=tiny_model_dir, batch_size=4, shard_size=10, attention_impl="torch")
    with pytest.raises(ValueError, match=r"the id of row 25 is 25 \(int\), but this run's ids are strs"):
        encode_corpus(source, tmp_path / "out", settings, encoder=encoder)
    assert encoder.encoded == [] and not (tmp_path / "out" / "data").exists()  # found while reading, not writing
    # Numbering the rows instead works.
    assert run_in_process(*encode_args(tiny_model_dir, source, tmp_path / "numbered", "--id-field", "")) == 0


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_run_reads_its_input_once_to_pin_it_and_once_to_encode_it(tiny_model_dir, tmp_path, monkeypatch, suffix):
    """The Parquet id type is found in the pass that hashes the input, not in a pass of its own."""
    import builtins
    import gzip

    from llm2vec_fast.corpus import encode_corpus

    source = tmp_path / f"input{suffix}"
    write_jsonl(tmp_path / "input.jsonl")
    if suffix.endswith(".gz"):
        source.write_bytes(gzip.compress((tmp_path / "input.jsonl").read_bytes()))
    opened, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *args, **kwargs: (
        opened.append(file) if Path(str(file)) == source else None) or real_open(file, *args, **kwargs))
    encoder = counting_encoder(tiny_model_dir)
    settings = CorpusSettings(model=tiny_model_dir, batch_size=4, shard_size=10, attention_impl="torch")
    manifest = encode_corpus(source, tmp_path / "out", settings, encoder=encoder)
    assert len(opened) == 2 and manifest["counts"]["encoded"] == len(TEXTS)
    pinned = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert pinned["id_type"] == "str" and pinned["input"] == {
        "size": source.stat().st_size, "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}


def test_a_run_and_the_ray_callable_check_their_model_once(tiny_model_dir, tmp_path, monkeypatch):
    """``check_model`` (a hub look-up for a hub id) runs once per run that loads its model, and the Ray callable
    still checks a name before loading anything."""
    from llm2vec_fast import corpus
    from llm2vec_fast.builtin_models import ModelNotFoundError
    from llm2vec_fast.ray import EmbedBatch

    checked, real_check = [], corpus.check_model
    monkeypatch.setattr(corpus, "check_model", lambda settings: checked.append(settings.model) or real_check(settings))
    settings = CorpusSettings(model=tiny_model_dir, batch_size=4, shard_size=10, attention_impl="torch", format="npy")
    corpus.encode_corpus(write_jsonl(tmp_path / "input.jsonl", TEXTS[:3]), tmp_path / "out", settings)
    assert checked == [tiny_model_dir]
    monkeypatch.setattr(corpus, "load_encoder", lambda *args: pytest.fail("loaded before the name was checked"))
    with pytest.raises(ModelNotFoundError):
        EmbedBatch("no-such-model")
    assert checked == [tiny_model_dir, "no-such-model"]


def test_read_rows_hashes_every_byte_of_a_text_input_and_refuses_a_digest_for_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm2vec_fast.corpus import read_rows

    source = write_jsonl(tmp_path / "input.jsonl")
    with open(source, "ab") as handle:
        handle.write(b"\n   \n")  # trailing blank lines: not rows, still bytes of the file
    for path in (source, tmp_path / "input.jsonl.gz"):
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(source.read_bytes()))
        digest = hashlib.sha256()
        rows = list(read_rows(path, digest=digest))
        assert [r.text for r in rows] == TEXTS and digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "input.parquet")
    with pytest.raises(ValueError, match="hashes text inputs only"):
        list(read_rows(tmp_path / "input.parquet", digest=hashlib.sha256()))


def test_int8_calibration_rows_are_encoded_once_and_a_resumed_run_has_the_same_bytes(tiny_model_dir, tmp_path):
    from llm2vec_fast.corpus import encode_corpus

    source = write_jsonl(tmp_path / "input.jsonl")
    settings = CorpusSettings(model=tiny_model_dir, batch_size=4, shard_size=10, attention_impl="torch",
                              precision="int8", calibration_rows=15)
    encoder = counting_encoder(tiny_model_dir)
    encode_corpus(source, tmp_path / "out", settings, encoder=encoder)
    # The calibration's rows (shards 0 and 1) are encoded as their shards, not a second time.
    assert sum(encoder.encoded) == len(TEXTS) and len(encoder.encoded) == 5
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "out", copy)
    for name in ("manifest.json", "shard-00000.json", "shard-00003.json"):
        (copy / name).unlink()
    encoder.encoded.clear()
    encode_corpus(source, copy, settings, encoder=encoder)
    assert encoder.encoded == [10, 10] and folder_bytes(copy) == folder_bytes(tmp_path / "out")


def test_parquet_without_pyarrow_says_to_install_it_or_use_npy(tiny_model_dir, uninterrupted, tmp_path, capsys,
                                                                monkeypatch):
    source, _ = uninterrupted
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet now raises ImportError
    assert run_program(*encode_args(tiny_model_dir, source, tmp_path / "out")) == 1
    assert "needs pyarrow: pip install pyarrow, or write .npy shards with --format npy" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()
