"""Offline evaluation: mteb's tasks fed from local files give the metrics computed directly.

A deterministic bag-of-hashed-words encoder stands in for a model, so the metric checks are exact and fast;
the real encoder goes through the same wrapper in test_mteb.py.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

pytest.importorskip("mteb")

from llm2vec_fast.evaluation import OFFLINE_TASKS, build_task, evaluate_offline, parse_offline_task  # noqa: E402
from llm2vec_fast.mteb import LLM2VecMTEB  # noqa: E402

DIM = 48


def _text(sentence) -> str:
    return sentence[1] if isinstance(sentence, (list, tuple)) else sentence


def hashed_embedding(text: str) -> np.ndarray:
    vector = np.zeros(DIM)
    for word in text.lower().split():
        vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % DIM] += 1.0
    # A small text-specific offset keeps every vector non-zero and breaks ties between equal bags of words.
    rng = np.random.default_rng(int(hashlib.md5(text.encode()).hexdigest()[:8], 16))
    return vector + 0.05 + 0.01 * rng.random(DIM)


class HashingEncoder:
    """Embeds the text part of each input; records what it was given."""

    def __init__(self):
        self.calls: list[list] = []

    def encode(self, sentences, batch_size=32, show_progress_bar=None, convert_to_numpy=True):
        self.calls.append(list(sentences))
        return np.stack([hashed_embedding(_text(s)) for s in sentences])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture
def wrapper():
    return LLM2VecMTEB(HashingEncoder())


@pytest.mark.parametrize("spec", ["STSBenchmark", "SICK-R", "SICK-R:train"])
def test_sts_is_spearman_of_cosine(spec, wrapper, shared_data, tmp_path):
    from scipy.stats import spearmanr

    result = evaluate_offline(wrapper, [spec], data_dir=shared_data, output_dir=tmp_path, limit=60)[spec]
    task, split = build_task(spec, shared_data, limit=60)
    rows = task.dataset[split]
    assert len(rows) == 60 and split == parse_offline_task(spec)[1]
    left = np.stack([hashed_embedding(t) for t in rows["sentence1"]])
    right = np.stack([hashed_embedding(t) for t in rows["sentence2"]])
    expected = spearmanr(rows["score"], cosine(left, right)).statistic
    assert result["metric"] == "cosine_spearman"
    assert result["main_score"] == pytest.approx(expected, abs=1e-9)
    assert -1.0 <= result["main_score"] <= 1.0


def test_sts_uses_gold_scores_from_the_files(shared_data):
    task, split = build_task("STSBenchmark", shared_data)
    assert split == "dev" and len(task.dataset["dev"]) == 1500
    with open(shared_data / "stsbenchmark" / "dev.jsonl", encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert task.dataset["dev"][0]["sentence1"] == first["sentence1"]
    assert task.dataset["dev"][0]["score"] == pytest.approx(first["score"])


def test_classification_is_logistic_regression_accuracy(wrapper, shared_data, tmp_path):
    """With every training row used (samples_per_label above any class size) and one experiment, mteb's
    protocol is a plain logistic regression on the train embeddings: same accuracy as sklearn directly."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    spec = "AmazonCounterfactualClassification"
    result = evaluate_offline(wrapper, [spec], data_dir=shared_data, output_dir=tmp_path, limit=150,
                              samples_per_label=100_000, n_experiments=1)[spec]
    task, split = build_task(spec, shared_data, limit=150)
    data = task.dataset["en"]
    x_train = np.stack([hashed_embedding(t) for t in data["train"]["text"]])
    x_test = np.stack([hashed_embedding(t) for t in data[split]["text"]])
    classifier = LogisticRegression(max_iter=100, random_state=task.seed).fit(x_train, data["train"]["label"])
    expected = accuracy_score(data[split]["label"], classifier.predict(x_test))
    assert result["metric"] == "accuracy"
    # Training rows reach the solver in a shuffled order: allow one test example of difference.
    assert abs(result["main_score"] - expected) <= 1.0 / len(x_test) + 1e-12
    assert result["main_score"] > 0.5  # two classes; hashed words carry some signal


def test_banking77_labels_and_protocol(wrapper, shared_data, tmp_path):
    spec = "Banking77Classification"
    task, split = build_task(spec, shared_data, limit=100, samples_per_label=2, n_experiments=1)
    labels = set(task.dataset["train"]["label"])
    assert len(labels) == 77 and set(task.dataset[split]["label"]) <= labels
    result = evaluate_offline(wrapper, [spec], data_dir=shared_data, limit=100, samples_per_label=2,
                              n_experiments=1)[spec]
    encoded_train = [c for c in wrapper.model.calls if len(c) == 77 * 2]
    assert encoded_train, "mteb should encode samples_per_label rows of each of the 77 intents"
    assert 0.0 <= result["main_score"] <= 1.0 and result["subset"] == "default"


def _ndcg_at_10(ranked: list[str], relevant: dict[str, int]) -> float:
    gains = [relevant.get(doc, 0) for doc in ranked[:10]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted(relevant.values(), reverse=True)[:10]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


def test_retrieval_is_ndcg_at_10(wrapper, shared_data, tmp_path):
    spec = "SciFact"
    result = evaluate_offline(wrapper, [spec], data_dir=shared_data, output_dir=tmp_path, limit=12)[spec]
    task, split = build_task(spec, shared_data, limit=12)
    data = task.dataset["default"][split]
    corpus, queries = data["corpus"], data["queries"]
    # mteb joins title and text of a document with a space.
    doc_vectors = np.stack([hashed_embedding(f"{t} {x}".strip()) for t, x in zip(corpus["title"], corpus["text"])])
    scores = []
    for query_id, text in zip(queries["id"], queries["text"]):
        similarity = cosine(hashed_embedding(text)[None, :], doc_vectors)
        ranked = [corpus["id"][i] for i in np.argsort(-similarity)]
        scores.append(_ndcg_at_10(ranked, data["relevant_docs"][query_id]))
    assert result["metric"] == "ndcg_at_10"
    assert result["main_score"] == pytest.approx(float(np.mean(scores)), abs=1e-4)  # mteb rounds to 5 digits


def test_result_files_are_mteb_task_results(wrapper, shared_data, tmp_path):
    from mteb.results import TaskResult

    results = evaluate_offline(wrapper, ["STSBenchmark", "SICK-R"], data_dir=shared_data, output_dir=tmp_path,
                               limit=30)
    for spec, name in (("STSBenchmark", "STSBenchmark__dev.json"), ("SICK-R", "SICK-R__trial.json")):
        loaded = TaskResult.from_disk(tmp_path / name)
        assert loaded.task_name == spec
        assert loaded.get_score() == pytest.approx(results[spec]["main_score"], abs=1e-5)  # stored to 5 digits
    summary = json.loads((tmp_path / "offline_summary.json").read_text())
    assert summary["SICK-R"]["split"] == "trial" and summary["SICK-R"]["limit"] == 30


def test_bad_inputs_are_named(shared_data, tmp_path):
    with pytest.raises(ValueError, match="no offline version"):
        parse_offline_task("STS12")
    with pytest.raises(ValueError, match="splits"):
        parse_offline_task("STSBenchmark:test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_task("STSBenchmark", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="stsbenchmark"):
        build_task("STSBenchmark", tmp_path)
    with pytest.raises(ValueError, match="limit"):
        build_task("SICK-R", shared_data, limit=0)
    assert set(OFFLINE_TASKS) >= {"STSBenchmark", "SICK-R", "Banking77Classification", "SciFact"}
