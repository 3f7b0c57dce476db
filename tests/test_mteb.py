"""The mteb wrapper: LLM2Vec's instructions on the right side, mteb's protocol, the ``eval`` command."""

from __future__ import annotations

import hashlib
import json
import types

import numpy as np
import pytest

pytest.importorskip("mteb")

import mteb  # noqa: E402

from llm2vec_fast import cli  # noqa: E402
from llm2vec_fast import mteb as l2v_mteb  # noqa: E402
from llm2vec_fast.evaluation import evaluate_offline  # noqa: E402
from llm2vec_fast.mteb import LLM2VecMTEB, task_instructions  # noqa: E402
from llm2vec_fast.prompts import format_instruction  # noqa: E402

STS_INSTRUCTION = "Retrieve semantically similar text:"


class RecordingEncoder:
    def __init__(self, dim: int = 16):
        self.dim = dim
        self.calls: list[list] = []

    def encode(self, sentences, batch_size=32, show_progress_bar=None, convert_to_numpy=True):
        self.calls.append(list(sentences))
        rows = []
        for s in sentences:
            text = s[1] if isinstance(s, list) else s
            seed = int(hashlib.md5(text.encode()).hexdigest()[:8], 16)
            rows.append(np.random.default_rng(seed).standard_normal(self.dim))
        return np.stack(rows)


def test_instruction_table_is_llm2vecs():
    table = task_instructions()
    assert len(table) == 67
    assert table["STSBenchmark"] == STS_INSTRUCTION
    assert table["SciFact"] == "Given a scientific claim, retrieve documents that support or refute the claim:"
    assert table["Banking77Classification"] == "Given a online banking query, find the corresponding intents:"
    assert all(v.endswith(":") for v in table.values())
    table["STSBenchmark"] = "changed"
    assert task_instructions()["STSBenchmark"] == STS_INSTRUCTION  # callers get a copy


def test_instruction_formatting_and_fallback():
    assert format_instruction("Classify things.") == "Classify things:"
    assert format_instruction("Already:") == "Already:"
    assert format_instruction("") == ""
    wrapper = LLM2VecMTEB(RecordingEncoder())
    query, document = mteb.types.PromptType.query, mteb.types.PromptType.document
    unknown = types.SimpleNamespace(name="NotInTheTable", prompt="Find the answer.")
    assert wrapper.instruction_for(unknown, None) == "Find the answer:"
    asymmetric = types.SimpleNamespace(name="NotInTheTable", prompt={"query": "Find passages."})
    assert wrapper.instruction_for(asymmetric, query) == "Find passages:"
    assert wrapper.instruction_for(asymmetric, document) == ""
    scifact = mteb.get_task("SciFact").metadata
    assert wrapper.instruction_for(scifact, query) == task_instructions()["SciFact"]
    assert wrapper.instruction_for(scifact, document) == ""


def test_symmetric_and_asymmetric_sides(shared_data):
    encoder = RecordingEncoder()
    wrapper = LLM2VecMTEB(encoder)
    evaluate_offline(wrapper, ["STSBenchmark"], data_dir=shared_data, limit=10)
    assert len(encoder.calls) == 2  # sentence1 and sentence2 columns
    for call in encoder.calls:
        assert all(isinstance(s, list) and s[0] == STS_INSTRUCTION for s in call)

    encoder.calls.clear()
    evaluate_offline(wrapper, ["SciFact"], data_dir=shared_data, limit=5)
    queries = [c for c in encoder.calls if isinstance(c[0], list)]
    documents = [c for c in encoder.calls if isinstance(c[0], str)]
    assert queries and documents
    assert all(s[0] == task_instructions()["SciFact"] for c in queries for s in c)
    assert sum(len(c) for c in queries) == 5 and sum(len(c) for c in documents) >= 20

    encoder.calls.clear()
    evaluate_offline(wrapper, ["Banking77Classification"], data_dir=shared_data, limit=20, samples_per_label=1,
                     n_experiments=1)
    assert all(s[0] == task_instructions()["Banking77Classification"] for c in encoder.calls for s in c)


def test_without_instructions_texts_are_plain(shared_data):
    encoder = RecordingEncoder()
    evaluate_offline(LLM2VecMTEB(encoder, use_instructions=False), ["SICK-R"], data_dir=shared_data, limit=8)
    assert encoder.calls and all(isinstance(s, str) for c in encoder.calls for s in c)


def test_bad_encoders_and_outputs_are_named():
    with pytest.raises(TypeError, match="encode"):
        LLM2VecMTEB(object())
    with pytest.raises(ValueError, match="organisation/name"):
        LLM2VecMTEB(RecordingEncoder(), model_name="plain")

    class Wrong(RecordingEncoder):
        def encode(self, sentences, **kwargs):
            return np.zeros((len(sentences) + 1, 4))

    task = mteb.get_task("STSBenchmark")
    with pytest.raises(RuntimeError, match="shape"):
        LLM2VecMTEB(Wrong()).encode([{"text": ["a", "b"]}], task_metadata=task.metadata, hf_split="dev",
                                    hf_subset="default")


def test_eval_command_offline_and_fallback(monkeypatch, shared_data, tmp_path):
    """``llm2vec-fast eval`` writes mteb result files and a summary; without --offline and without hub access it
    falls back to the local files (HF_HUB_OFFLINE=1 in tests)."""
    loaded = {}

    def fake_load_encoder(model, **kwargs):
        loaded.update(model=model, **kwargs)
        return RecordingEncoder()

    monkeypatch.setattr(l2v_mteb, "load_encoder", fake_load_encoder)
    expected = evaluate_offline(LLM2VecMTEB(RecordingEncoder()), ["STSBenchmark", "SICK-R"], data_dir=shared_data,
                                limit=25)
    for extra in (["--offline"], []):
        out = tmp_path / ("offline" if extra else "fallback")
        argv = ["eval", "--model", "some/model", "--adapter", "a1", "--adapter", "a2", "--tasks",
                "STSBenchmark,SICK-R", "--output", str(out), "--data-dir", str(shared_data), "--limit", "25", *extra]
        assert cli.main(argv) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["offline_tasks"] == ["STSBenchmark", "SICK-R"]
        for name in ("STSBenchmark", "SICK-R"):
            assert summary["scores"][name] == pytest.approx(expected[name]["main_score"])
        assert (out / "offline" / "STSBenchmark__dev.json").is_file()
        assert (out / "offline" / "SICK-R__trial.json").is_file()
    assert loaded["adapters"] == ["a1", "a2"] and loaded["enable_bidirectional"] is True

    with pytest.raises(ValueError, match="no offline version"):
        cli.run(["eval", "--model", "m", "--tasks", "STS12", "--output", str(tmp_path / "x"), "--offline",
                  "--data-dir", str(shared_data)])


def test_real_encoder_through_wrapper(tiny_smol, shared_data):
    """LLM2Vec through the wrapper gives exactly LLM2Vec.encode of [instruction, text] pairs, and mteb's STS
    score equals the Spearman correlation of those embeddings' cosines."""
    from scipy.stats import spearmanr

    from llm2vec_fast.evaluation import build_task

    encoder = l2v_mteb.load_encoder(tiny_smol, attention_impl="torch", max_length=64)
    wrapper = LLM2VecMTEB(encoder, batch_size=8)
    result = evaluate_offline(wrapper, ["STSBenchmark"], data_dir=shared_data, limit=12)["STSBenchmark"]
    rows = build_task("STSBenchmark", shared_data, limit=12)[0].dataset["dev"]
    left = encoder.encode([[STS_INSTRUCTION, t] for t in rows["sentence1"]], batch_size=8)
    right = encoder.encode([[STS_INSTRUCTION, t] for t in rows["sentence2"]], batch_size=8)
    cosines = (left * right).sum(-1) / (np.linalg.norm(left, axis=-1) * np.linalg.norm(right, axis=-1))
    assert result["main_score"] == pytest.approx(spearmanr(rows["score"], cosines).statistic, abs=1e-6)
    causal = l2v_mteb.load_encoder(tiny_smol, attention_impl="torch", max_length=64, enable_bidirectional=False)
    assert not np.allclose(causal.encode(rows["sentence1"][:3]), encoder.encode(rows["sentence1"][:3]), atol=1e-4)
