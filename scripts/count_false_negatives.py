"""Count what the supervised stage's batches hold of repeated texts and false negatives, without a model.

``python scripts/count_false_negatives.py ../shared/data/snli/nli_triplets.csv --batch-size 32 --steps 20``

For llm2vec's batches (``no_duplicates`` off) and ours (on), over the first ``--steps`` batches and over the
epoch: rows whose query (premise) is already in the batch, and the (query, document) pairs the loss masks as
false negatives (a document that is the same text as the query's positive, the positive itself excepted),
split into copies of another row's positive and hard negatives that are a copy of it; with ``no_duplicates``
also how often a row waited for a later batch.
"""

from __future__ import annotations

import argparse
import json

import torch

from llm2vec_fast.kernels import text_hashes
from llm2vec_fast.training.arguments import ContrastiveArguments, DataArguments
from llm2vec_fast.training.data import load_triplets
from llm2vec_fast.training.samplers import OneDatasetBatchSampler


def batch_counts(rows, batch):
    pos = text_hashes([rows[i]["positive"] for i in batch])
    neg = text_hashes([rows[i]["negative"] for i in batch])
    queries = [rows[i]["query"] for i in batch]
    texts = [t for i in batch for t in (rows[i]["query"], rows[i]["positive"], rows[i]["negative"])]
    return {"repeated_queries": len(queries) - len(set(queries)),
            "repeated_texts": len(texts) - len(set(texts)),
            "false_negatives_positive": int((pos[None, :] == pos[:, None]).sum()) - len(batch),
            "false_negatives_hard_negative": int((neg[None, :] == pos[:, None]).sum()),
            "rows_with_a_false_negative": int(((pos[None, :] == pos[:, None]).sum(1) - 1
                                               + (neg[None, :] == pos[:, None]).sum(1) > 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    options = parser.parse_args()
    rows = load_triplets(DataArguments(train_files=[options.train_file]), ContrastiveArguments()).to_list()
    report = {"rows": len(rows), "batch_size": options.batch_size}
    for name, no_duplicates in (("llm2vec (no_duplicates off)", False), ("no_duplicates on", True)):
        texts = [(r["query"], r["positive"], r["negative"]) for r in rows] if no_duplicates else None
        sampler = OneDatasetBatchSampler([r["dataset"] for r in rows], options.batch_size, seed=options.seed,
                                         texts=texts)
        batches = sampler.global_batch_list()
        parts = {}
        for label, chosen in ((f"first {options.steps} batches", batches[:options.steps]), ("epoch", batches)):
            counts = [batch_counts(rows, b) for b in chosen]
            parts[label] = {"batches": len(chosen), "rows": sum(map(len, chosen)),
                            **{k: sum(c[k] for c in counts) for k in counts[0]}}
        report[name] = {**parts, "rows_waited_in_epoch": sampler.moved if no_duplicates else None}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
