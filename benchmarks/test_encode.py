"""End-to-end encoding throughput: texts/s and tokens/s, ours vs llm2vec 0.2.3, SmolLM2-135M.

Input: a realistic mix of lengths from ../shared/data: Wikipedia sentences (wiki_sentences) and SciFact
abstracts (paragraphs), shuffled with a fixed seed. Tokens are counted once, with SmolLM2's tokenizer, the same
for every provider, so tokens/s compare directly.

- CPU, fp32: ours (``llm2vec_fast.LLM2Vec``, packed batches through our attention's PyTorch varlen path),
  ours with padded batches, and llm2vec 0.2.3 run in its own venv (transformers 4.44.2) by a worker subprocess;
  the rounds of the three are interleaved so that a shared machine's load hits them alike. Give that venv's
  python in ``LLM2VEC_VENV_PYTHON`` (e.g. ``.venv-llm2vec/bin/python``, see scripts/make_llm2vec_reference.py);
  without it the llm2vec row is not measured and the test reports itself skipped with the reason.
- CUDA, bf16: ours packed (varlen, no padding) vs ours padded, same model and texts (skipped without a GPU).

    LLM2VEC_VENV_PYTHON=.venv-llm2vec/bin/python python -m pytest benchmarks/test_encode.py -s \
        --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import record

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LLM2VEC_FAST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
N_SENTENCES = int(os.environ.get("ENCODE_BENCH_SENTENCES", "48"))
N_PARAGRAPHS = int(os.environ.get("ENCODE_BENCH_PARAGRAPHS", "16"))
ROUNDS = int(os.environ.get("ENCODE_BENCH_ROUNDS", "2"))
BATCH_SIZE = 32


def _texts() -> list[str]:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real text data not found at {SHARED_DATA}")
    with gzip.open(SHARED_DATA / "wiki_sentences" / "wiki_sentences.txt.gz", "rt", encoding="utf-8") as handle:
        sentences = [line.strip() for _, line in zip(range(5000), handle) if line.strip()]
    with gzip.open(SHARED_DATA / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as handle:
        paragraphs = [json.loads(line)["text"] for _, line in zip(range(2000), handle)]
    rng = random.Random(0)
    texts = rng.sample(sentences, N_SENTENCES) + rng.sample([p for p in paragraphs if p.strip()], N_PARAGRAPHS)
    rng.shuffle(texts)
    return texts


@pytest.fixture(scope="module")
def texts():
    return _texts()


@pytest.fixture(scope="module")
def smollm2_dir():
    from llm2vec_fast.builtin_models import smollm2_135m_path

    try:
        return smollm2_135m_path()
    except FileNotFoundError as error:
        pytest.skip(f"SmolLM2-135M unavailable: {error}")


def _token_count(model_dir: str, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # What both encoders feed the model for plain texts: llm2vec's doc_max_length (400) word trimming aside,
    # which these texts stay under, every token of every text.
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"])


_LLM2VEC_WORKER = r"""
import json, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads({threads})
sys.path.insert(0, {scripts!r})
from make_llm2vec_reference import convert_for_transformers_444
from llm2vec import LLM2Vec
texts = json.loads(Path({texts_file!r}).read_text())
with tempfile.TemporaryDirectory() as scratch:
    model_dir = Path(scratch) / "model"
    convert_for_transformers_444(Path({model_dir!r}), model_dir)
    encoder = LLM2Vec.from_pretrained(str(model_dir), torch_dtype=torch.float32, pooling_mode="mean")
    encoder.encode(texts[:8], batch_size={batch}, show_progress_bar=False)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:  # one timed encode per line
        start = time.perf_counter()
        encoder.encode(texts, batch_size={batch}, show_progress_bar=False)
        print(json.dumps({{"seconds": time.perf_counter() - start}}), flush=True)
"""


class _Llm2vecWorker:
    """llm2vec 0.2.3 in its own venv, kept running so that its rounds interleave with ours."""

    def __init__(self, python: str, model_dir: str, texts: list[str]):
        self.scratch = tempfile.TemporaryDirectory()
        texts_file = Path(self.scratch.name) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        script = _LLM2VEC_WORKER.format(threads=torch.get_num_threads(), scripts=str(REPO_ROOT / "scripts"),
                                        texts_file=str(texts_file), model_dir=model_dir, batch=BATCH_SIZE)
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
        self.process = subprocess.Popen([python, "-c", script], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the llm2vec worker failed to start (run its script by hand to see why)")

    def time_once(self) -> float:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["seconds"]

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.scratch.cleanup()


def test_encode_cpu(benchmark, texts, smollm2_dir):
    """Rounds interleaved (ours packed, ours padded, llm2vec) so that a shared machine's load hits all alike."""
    import statistics

    from llm2vec_fast import LLM2Vec

    tokens = _token_count(smollm2_dir, texts)
    encoder = LLM2Vec.from_pretrained(smollm2_dir, pooling_mode="mean")
    encoder.encode(texts[:8], batch_size=BATCH_SIZE, device="cpu")  # warm-up
    python = os.environ.get("LLM2VEC_VENV_PYTHON")
    worker = _Llm2vecWorker(python, smollm2_dir, texts) if python else None
    times: dict[str, list[float]] = {"ours": [], "ours-padded": [], "llm2vec-0.2.3": []}
    try:
        for _ in range(ROUNDS):
            for provider, packed in (("ours", True), ("ours-padded", False)):
                start = time.perf_counter()
                encoder.encode(texts, batch_size=BATCH_SIZE, device="cpu", packed=packed)
                times[provider].append(time.perf_counter() - start)
            if worker is not None:
                times["llm2vec-0.2.3"].append(worker.time_once())
    finally:
        if worker is not None:
            worker.close()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # times are taken above, interleaved
    for provider, values in times.items():
        if not values:
            continue
        seconds = statistics.median(values)
        record(benchmark, suite="encode (SmolLM2-135M, CPU fp32)", case=f"{len(texts)} texts {tokens} tok",
               mode="encode", provider=provider, seconds=seconds, texts_per_s=len(texts) / seconds,
               tokens_per_s=tokens / seconds,
               note=f"{len(texts) / seconds:.2f} texts/s, {tokens / seconds:.0f} tokens/s, rounds {len(values)}")
    if worker is None:
        pytest.skip("llm2vec row not measured: set LLM2VEC_VENV_PYTHON to a venv's python with llm2vec 0.2.3 and "
                    "transformers 4.44.2 (see scripts/make_llm2vec_reference.py); ours rows were recorded")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: packed vs padded on CUDA is measured by the GPU check")
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_encode_cuda(benchmark, smollm2_dir, layout):
    from llm2vec_fast import LLM2Vec

    texts = _texts() * 16
    tokens = _token_count(smollm2_dir, texts)
    encoder = LLM2Vec.from_pretrained(smollm2_dir, pooling_mode="mean", dtype=torch.bfloat16)
    packed = layout == "packed"
    kwargs = dict(batch_size=256, device="cuda", packed=packed)
    encoder.encode(texts[:256], **kwargs)

    def run():
        encoder.encode(texts, **kwargs)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5, iterations=1)
    seconds = benchmark.stats.stats.median
    record(benchmark, suite="encode (SmolLM2-135M, CUDA bf16)", case=f"{len(texts)} texts {tokens} tok",
           mode="encode", provider="ours" if packed else "ours-padded", seconds=seconds,
           texts_per_s=len(texts) / seconds, tokens_per_s=tokens / seconds,
           note=f"{len(texts) / seconds:.1f} texts/s, {tokens / seconds:.0f} tokens/s")
