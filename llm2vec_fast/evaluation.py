"""Offline evaluation: MTEB's own tasks and evaluators, fed from local files instead of the hub.

Each offline task is the mteb task object (``mteb.get_task(name)``: its metadata, its evaluator, its metric)
with ``task.dataset`` filled from files in the shared data folder and ``data_loaded`` set, so mteb never
reaches for the hub. The metrics are therefore mteb's: Spearman correlation of cosine similarities for STS,
accuracy of mteb's logistic-regression protocol (``samples_per_label`` per class, ``n_experiments`` runs)
for classification, nDCG@10 for retrieval. Results are written as mteb ``TaskResult`` JSON files.

What differs from the MTEB leaderboard setting, and why (the data is all mteb could be fed with here):
- STSBenchmark is scored on its **dev** split and SICK-R on SICK **trial** (or ``SICK-R:train``): the test
  splits are held back for blind evaluation (see the data README), so these numbers are for development.
- AmazonCounterfactualClassification runs the ``en`` subset only (the other languages are not local).
- ``limit`` evaluates a fixed random sample (seeded), for smoke tests and the quick recipe; results say so.

Local file layout (``data_dir``): ``stsbenchmark/dev.jsonl``, ``sick/{trial,train}.jsonl``,
``banking77/{train,test}.csv``, ``amazon_counterfactual_en/EN_{train,valid,test}.tsv``,
``scifact/{corpus.jsonl.gz,queries.jsonl,qrels/test.tsv}``.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import logging
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SEED = 42


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"offline evaluation needs {path}, which does not exist (is --data-dir right?)")
    return path


def _sample(rows: list[Any], limit: int | None, seed: int = SEED) -> list[Any]:
    """A fixed random sample of ``limit`` rows, kept in file order; all rows when ``limit`` is None."""
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


# --- loaders: data_dir, split, limit -> task.dataset ---------------------------------------------------------
def _sts_dataset(folder: str, files: dict[str, str], data_dir: Path, split: str, limit: int | None):
    """``split``'s .jsonl file of ``folder`` (sentence1, sentence2, a numeric score) as mteb's STS dataset."""
    from datasets import Dataset

    rows = _sample(_read_jsonl(_require(data_dir / folder / files[split])), limit)
    for row in rows:
        if not isinstance(row.get("score"), (int, float)):
            raise ValueError(f"{folder}/{files[split]}: row without a numeric score: {row}")
    columns = {key: [row[key] for row in rows] for key in ("sentence1", "sentence2")}
    columns["score"] = [float(row["score"]) for row in rows]
    return {split: Dataset.from_dict(columns)}


def _classification_dataset(folder: str, files: dict[str, str], columns: tuple[str, str], delimiter: str,
                            subset: str | None, data_dir: Path, split: str, limit: int | None):
    """(text, label) pairs from the ``columns`` of ``folder``'s CSV/TSV files with a header, as mteb's
    classification dataset: the train split and ``split``, labels numbered in the train split's sorted order."""
    from datasets import Dataset, DatasetDict

    def read(name: str) -> list[tuple[str, str]]:
        with open(_require(data_dir / folder / name), newline="", encoding="utf-8") as handle:
            return [(row[columns[0]], row[columns[1]]) for row in csv.DictReader(handle, delimiter=delimiter)]

    train, evaluated = read(files["train"]), _sample(read(files[split]), limit)
    index = {label: i for i, label in enumerate(sorted({label for _, label in train}))}
    unknown = {label for _, label in evaluated} - set(index)
    if unknown:
        raise ValueError(f"{folder}/{files[split]} has labels missing from the train split: {sorted(unknown)}")

    def as_dataset(rows):
        return Dataset.from_dict({"text": [t for t, _ in rows], "label": [index[label] for _, label in rows]})

    splits = DatasetDict({"train": as_dataset(train), split: as_dataset(evaluated)})
    return {subset: splits} if subset else splits


def _scifact_dataset(data_dir: Path, split: str, limit: int | None):
    from datasets import Dataset

    folder = data_dir / "scifact"
    relevant: dict[str, dict[str, int]] = {}
    with open(_require(folder / "qrels" / f"{split}.tsv"), encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            relevant.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    queries = [q for q in _read_jsonl(_require(folder / "queries.jsonl")) if q["_id"] in relevant]
    corpus = _read_jsonl(_require(folder / "corpus.jsonl.gz"))
    if limit is not None:
        # A smaller problem of the same kind: `limit` queries, their relevant documents and as many other
        # documents again (at least 4 per query), all drawn with a fixed seed.
        queries = _sample(queries, limit)
        wanted = {doc for q in queries for doc in relevant[q["_id"]]}
        others = [d for d in corpus if d["_id"] not in wanted]
        extra = {d["_id"] for d in _sample(others, max(len(wanted), 4 * len(queries)))}
        corpus = [d for d in corpus if d["_id"] in wanted or d["_id"] in extra]
        relevant = {q["_id"]: relevant[q["_id"]] for q in queries}
    return {"default": {split: {
        "corpus": Dataset.from_dict({"id": [d["_id"] for d in corpus], "title": [d.get("title", "") for d in corpus],
                                     "text": [d["text"] for d in corpus]}),
        "queries": Dataset.from_dict({"id": [q["_id"] for q in queries], "text": [q["text"] for q in queries]}),
        "relevant_docs": relevant,
        "top_ranked": None,
    }}}


@dataclasses.dataclass(frozen=True)
class OfflineTask:
    """An mteb task that can be fed from local files."""

    mteb_name: str
    default_split: str
    splits: tuple[str, ...]
    load: Callable[[Path, str, int | None], Any]
    subset: str = "default"


OFFLINE_TASKS: dict[str, OfflineTask] = {task.mteb_name: task for task in (
    OfflineTask("STSBenchmark", "dev", ("dev",), partial(_sts_dataset, "stsbenchmark", {"dev": "dev.jsonl"})),
    OfflineTask("SICK-R", "trial", ("trial", "train"),
                partial(_sts_dataset, "sick", {"trial": "trial.jsonl", "train": "train.jsonl"})),
    OfflineTask("Banking77Classification", "test", ("test",),
                partial(_classification_dataset, "banking77", {"train": "train.csv", "test": "test.csv"},
                        ("text", "category"), ",", None)),
    OfflineTask("AmazonCounterfactualClassification", "test", ("test", "validation"),
                partial(_classification_dataset, "amazon_counterfactual_en",
                        {"train": "EN_train.tsv", "test": "EN_test.tsv", "validation": "EN_valid.tsv"},
                        ("sentence", "is_counterfactual"), "\t", "en"),
                subset="en"),
    OfflineTask("SciFact", "test", ("test",), _scifact_dataset),
)}


def parse_offline_task(spec: str) -> tuple[OfflineTask, str]:
    """``"SICK-R"`` or ``"SICK-R:train"`` -> (task, split), with an error naming what exists."""
    name, _, split = spec.partition(":")
    if name not in OFFLINE_TASKS:
        raise ValueError(f"no offline version of task {name!r}; offline tasks: {', '.join(OFFLINE_TASKS)}")
    task = OFFLINE_TASKS[name]
    split = split or task.default_split
    if split not in task.splits:
        raise ValueError(f"offline task {name} has splits {task.splits}, not {split!r}")
    return task, split


def build_task(spec: str, data_dir: str | Path, *, limit: int | None = None,
               samples_per_label: int | None = None, n_experiments: int | None = None):
    """The mteb task object for ``spec`` with its data loaded from ``data_dir``; returns (task, split)."""
    import mteb

    offline, split = parse_offline_task(spec)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    task = mteb.get_task(offline.mteb_name)
    task.dataset = offline.load(data_dir, split, limit)
    task.data_loaded = True
    task.hf_subsets = [offline.subset]
    # Classification only: mteb's protocol knobs (defaults as mteb sets them per task).
    if samples_per_label is not None and hasattr(task, "samples_per_label"):
        task.samples_per_label = samples_per_label
    if n_experiments is not None and hasattr(task, "n_experiments"):
        task.n_experiments = n_experiments
    return task, split


def evaluate_offline(model: Any, tasks: list[str], *, data_dir: str | Path, output_dir: str | Path | None = None,
                     limit: int | None = None, batch_size: int = 32, samples_per_label: int | None = None,
                     n_experiments: int | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate an mteb encoder (e.g. :class:`llm2vec_fast.mteb.LLM2VecMTEB`) on local-file tasks.

    Returns ``{spec: {"main_score", "metric", "split", "subset", "scores", "limit"}}`` and, with
    ``output_dir``, writes one mteb ``TaskResult`` file per task (``<Task>__<split>.json``)."""
    from mteb.results import TaskResult

    results: dict[str, dict[str, Any]] = {}
    for spec in tasks:
        task, split = build_task(spec, data_dir, limit=limit, samples_per_label=samples_per_label,
                                 n_experiments=n_experiments)
        logger.info("Offline %s (split %s%s)", task.metadata.name, split, f", sample of {limit}" if limit else "")
        started = time.monotonic()
        scores = task.evaluate(model, split, encode_kwargs={"batch_size": batch_size})
        elapsed = time.monotonic() - started
        subset = task.hf_subsets[0]
        subset_scores = dict(scores[subset])
        results[spec] = {"task": task.metadata.name, "split": split, "subset": subset,
                         "metric": task.metadata.main_score, "main_score": float(subset_scores["main_score"]),
                         "limit": limit, "seconds": round(elapsed, 1), "scores": subset_scores}
        if output_dir is not None:
            output = Path(output_dir)
            output.mkdir(parents=True, exist_ok=True)
            task_result = TaskResult.from_task_results(task, {split: scores}, evaluation_time=elapsed)
            task_result.to_disk(output / f"{task.metadata.name}__{split}.json")
    if output_dir is not None:
        summary = {spec: {k: v for k, v in r.items() if k != "scores"} for spec, r in results.items()}
        (Path(output_dir) / "offline_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return results
