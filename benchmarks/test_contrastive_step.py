"""One supervised contrastive training step (forward, InfoNCE, backward), packed vs padded batches.

SmolLM2-135M with a fresh LoRA r=16 on all linear layers (LoRA dropout 0), SNLI triplets from ../shared/data
with the allnli instruction on the queries, as the recipe trains them. ``ours`` is the default packed layout
(texts back to back, varlen attention); ``padded`` is the same batch left-padded to each group's longest text.
Both run the same model on the same triplets, so the ratio is what packing saves; the real (unpadded) token
count is in each row's note.

- CPU, fp32, PyTorch attention path, batch 16 triplets.
- CUDA, bf16, our Triton attention, batch 64 triplets (skipped without a GPU).

    python -m pytest benchmarks/test_contrastive_step.py -s --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import csv
import os
import random
import statistics
import time
from pathlib import Path

import pytest
import torch

from conftest import record

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LLM2VEC_FAST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"
GROUPS = ("query", "positive", "negative")


def _examples(n: int):
    path = SHARED_DATA / "snli" / "nli_triplets.csv"
    if not path.is_file():
        pytest.skip(f"real text data not found at {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows = random.Random(0).sample(rows, n)
    return [{"query": r["sent0"], "positive": r["sent1"], "negative": r["hard_neg"], "instruction": INSTRUCTION}
            for r in rows]


def _model(device: str, dtype: torch.dtype, attention_impl: str):
    from llm2vec_fast.builtin_models import smollm2_135m_path
    from llm2vec_fast.training.modeling import add_lora, load_base_model

    try:
        path = smollm2_135m_path()
    except Exception as error:  # noqa: BLE001 - the package or gguf is missing: say so
        pytest.skip(f"SmolLM2-135M not available: {error}")
    model = load_base_model(path, dtype=dtype, attention_impl=attention_impl).to(device)
    return add_lora(model, dropout=0.0).train(), path


def _batches(path: str, examples, device: str):
    from llm2vec_fast.training.collators import ContrastiveCollator
    from llm2vec_fast.training.modeling import load_tokenizer

    tokenizer = load_tokenizer(path)
    out = {}
    for provider, packed in (("ours", True), ("padded", False)):
        batch = ContrastiveCollator(tokenizer, max_length=48, packed=packed)(examples)
        out[provider] = {group: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in chunk.items()}
                         for group, (chunk,) in batch.items()}
    real_tokens = sum(int(g["attention_mask"].sum()) for g in out["padded"].values())
    padded_tokens = sum(g["input_ids"].numel() for g in out["padded"].values())
    return out, real_tokens, padded_tokens


def _step(model, batch):
    from llm2vec_fast.kernels import info_nce_loss
    from llm2vec_fast.pipeline import embed

    reps = [embed(model, batch[group], "mean") for group in GROUPS]
    info_nce_loss(*reps, scale=50.0).backward()
    model.zero_grad(set_to_none=True)


def _run(benchmark, *, device, dtype, attention_impl, triplets, rounds, suite, label):
    model, path = _model(device, dtype, attention_impl)
    batches, real, padded = _batches(path, _examples(triplets), device)

    def step(provider):
        _step(model, batches[provider])
        if device == "cuda":
            torch.cuda.synchronize()

    times = {"ours": [], "padded": []}
    for provider in times:  # warm-up
        step(provider)
    for _ in range(rounds):  # interleaved, so that a busy machine slows both alike
        for provider in times:
            start = time.perf_counter()
            step(provider)
            times[provider].append(time.perf_counter() - start)
    # pytest-benchmark's own table: one more timed round of ours.
    benchmark.pedantic(step, args=("ours",), rounds=1, warmup_rounds=0)
    for provider, tokens in (("ours", real), ("padded", padded)):
        median = statistics.median(times[provider])
        record(benchmark if provider == "ours" else None, suite=suite, case=label, mode="fwd+bwd",
               provider=provider, seconds=median,
               note=f"{tokens} tokens through the model ({real} real), {real / median:.0f} real tokens/s")


def test_contrastive_step_cpu(benchmark):
    torch.manual_seed(0)
    _run(benchmark, device="cpu", dtype=torch.float32, attention_impl="torch", triplets=16, rounds=3,
         suite="supervised contrastive step (SmolLM2-135M, fp32, CPU)", label="16 SNLI triplets")


@pytest.mark.gpu
def test_contrastive_step_cuda(benchmark):
    torch.manual_seed(0)
    _run(benchmark, device="cuda", dtype=torch.bfloat16, attention_impl="triton", triplets=64, rounds=10,
         suite="supervised contrastive step (SmolLM2-135M, bf16, CUDA)", label="64 SNLI triplets")
