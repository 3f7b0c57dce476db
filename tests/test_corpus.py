"""``llm2vec-fast encode`` on a tiny model: formats, bad rows, kill-and-resume, torchrun ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, build_tiny_model

TEXTS = [f"Sentence number {i} says {'something ' * (i % 7)}about the world." for i in range(41)]
TEXTS[5] = ""
TEXTS[9] = "   "


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_path):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model("llama", vocab_size=49152).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(path)
    return str(path)


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
    from llm2vec_fast.cli import main

    return main(list(args))


def run_subprocess(args, *, env_extra=None, torchrun=False, wait=True):
    env = dict(os.environ, TRITON_INTERPRET="0", **(env_extra or {}))
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    command = head + ["-m", "llm2vec_fast.cli", "--log-level", "WARNING"] + args
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """One uninterrupted one-process run over the .jsonl input: the reference for resume and torchrun."""
    root = tmp_path_factory.mktemp("reference")
    source = write_jsonl(root / "input.jsonl")
    output = root / "out"
    assert run_in_process(*encode_args(tiny_model_dir, source, output)) == 0
    return source, output


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


def test_resume_after_a_crash_mid_write_equals_an_uninterrupted_run(tiny_model_dir, uninterrupted, tmp_path):
    source, reference = uninterrupted
    args = encode_args(tiny_model_dir, source, tmp_path / "out")
    crashed = run_subprocess(args, env_extra={"LLM2VEC_FAST_TEST_CRASH_AFTER_SHARDS": "2"})
    assert crashed.returncode == 17, crashed.stdout + crashed.stderr
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"ids-00000.json", "ids-00001.json", "embeddings-00002.npy.tmp"} <= names
    assert "ids-00002.json" not in names and "manifest.json" not in names
    assert run_in_process(*args) == 0  # the same command again, here in this process to save a start-up
    assert folder_bytes(tmp_path / "out") == folder_bytes(reference)


def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    from llm2vec_fast.corpus import load_output

    texts = [f"text {i} " + "word " * (i % 11) for i in range(90)]
    source = write_jsonl(tmp_path / "input.jsonl", texts)
    args = encode_args(tiny_model_dir, source, tmp_path / "killed")
    args[args.index("--shard-size") + 1] = "3"
    process = run_subprocess(args, wait=False)
    deadline = time.time() + 300
    while len(list((tmp_path / "killed").glob("ids-*.json"))) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list((tmp_path / "killed").glob("ids-*.json")))
    assert 3 <= done < 30 and not (tmp_path / "killed" / "manifest.json").exists(), "the kill came too late"
    assert run_in_process(*args) == 0
    straight = list(args)
    straight[straight.index("--output") + 1] = str(tmp_path / "straight")
    assert run_in_process(*straight) == 0
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "straight")
    assert load_output(tmp_path / "killed")[1] == [f"doc-{i}" for i in range(90)]


def test_two_torchrun_ranks_equal_one_process(tiny_model_dir, uninterrupted, tmp_path):
    source, reference = uninterrupted
    result = run_subprocess(encode_args(tiny_model_dir, source, tmp_path / "ranks"), torchrun=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert folder_bytes(tmp_path / "ranks") == folder_bytes(reference)


def test_refuses_to_resume_with_other_settings(tiny_model_dir, uninterrupted):
    source, output = uninterrupted
    with pytest.raises(SystemExit, match="batch_size: was 4, now 8"):
        run_in_process(*encode_args(tiny_model_dir, source, output, "--batch-size", "8"))


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
        json.dumps({"id": "h", "text": "also fine"}).encode(),
    ]
    source = tmp_path / "input.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    args = encode_args(tiny_model_dir, source, tmp_path / "strict", "--max-length", "16")
    with pytest.raises(SystemExit, match=r"input.jsonl:2: invalid JSON"):
        run_in_process(*args)
    args = encode_args(tiny_model_dir, source, tmp_path / "skip", "--max-length", "16", "--on-bad-row", "skip")
    assert run_in_process(*args) == 0
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert (counts["rows"], counts["encoded"], counts["bad"], counts["empty"], counts["truncated"]) == (8, 4, 4, 1, 1)
    problems = {row["id"]: row["problem"] for row in manifest["bad_rows"]}
    assert set(problems) == {1, 2, 3, 4}  # rows without a readable id are named by row number
    assert "invalid JSON" in problems[1] and "no field 'text'" in problems[2]
    assert "int, not a string" in problems[3] and "not valid UTF-8" in problems[4]
    vectors, ids = load_output(tmp_path / "skip")
    assert ids == ["a", "f", "g", "h"] and np.isfinite(vectors).all()


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
