"""Compiled vs eager training steps, side by side in one run: what the stages' ``torch_compile`` setting does
(the Trainer has accelerate call ``torch.compile(model)``, inductor, shapes dynamic after the first recompile).

SmolLM2-135M, patched bidirectional, a fresh LoRA r=16 on all linear layers (LoRA dropout 0), fp32 on CPU:

- MNTP: :class:`~llm2vec_fast.training.losses.MNTPModel` (LoRA body + our masked next-token loss op, chunked
  PyTorch path) on 4 blocks of 128 WikiText tokens, 20% masked by the stage's collator; ``compiled`` is
  ``torch.compile(mntp_model)``: body and loss in one compiled module.
- supervised contrastive: 16 SNLI triplets with the allnli instruction, packed (``cu_seqlens``), InfoNCE at scale
  50; ``compiled`` is ``torch.compile(encoder)``, the model each group's forward calls (the loss stays eager, as
  in the Trainer). Two batches alternate, so that the steady state includes a new packed length every step.

The compiled calls run under :func:`~llm2vec_fast.training.lora_graph.training_compile_settings`, as the Trainer's
steps do: peft's LoRA linears fused into one op each by inductor's pre-grad pass (``lora_linears_fused`` is
printed; 0 when inductor's caches served graphs compiled by an earlier run, which skips the pass), float
attributes traced as constants. A step is forward + backward (no optimizer step and no
zero_grad's cost difference: the optimizer is the same on both sides and not timed). Rounds are interleaved (eager, compiled,
eager, ...) so that a busy machine slows both alike; the first compiled calls (compilation) are timed and
printed apart. ``ours`` is eager, so the table's ``speedup`` column of the ``compiled`` row is eager / compiled
(> 1: compiling is faster).

    python -m pytest benchmarks/test_training_compile.py -s -p no:cacheprovider --benchmark-disable
"""

from __future__ import annotations

import contextlib
import csv
import gzip
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
ROUNDS = int(os.environ.get("LLM2VEC_FAST_COMPILE_ROUNDS", "4"))
TRIPLETS = int(os.environ.get("LLM2VEC_FAST_COMPILE_TRIPLETS", "16"))


def _smollm2():
    from llm2vec_fast.builtin_models import smollm2_135m_path

    try:
        return smollm2_135m_path()
    except Exception as error:  # noqa: BLE001 - the package or gguf is missing: say so
        pytest.skip(f"SmolLM2-135M not available: {error}")


def _smollm2_135m_config():
    """SmolLM2-135M-Instruct's architecture (its config.json), for a model of its shapes with random weights."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2)


def _need_compiler(device="cpu"):
    from llm2vec_fast.compilation import compiler_unavailable_reason

    reason = compiler_unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)


def _lora(model):
    from llm2vec_fast.training.modeling import add_lora

    return add_lora(model, dropout=0.0).train()


def _interleaved(steps: dict, rounds: int):
    """Median wall seconds per provider, and median CPU seconds of this process (``time.process_time``), rounds
    interleaved; each provider's first calls (warm-up, compilation) are made before and timed apart.

    On a machine shared with other jobs the wall time of a step measures the load as much as the step; with one
    thread (``OMP_NUM_THREADS=1``) the process's CPU time is the step's own compute and varies much less. With
    several threads it also counts OpenMP's spin-waits, so read the wall time there."""
    first = {}
    for provider, calls in steps.items():
        start = time.perf_counter()
        for call in calls:  # every batch once: the compiled side compiles (and recompiles) here
            call()
        first[provider] = time.perf_counter() - start
    times = {provider: [] for provider in steps}
    cpu = {provider: [] for provider in steps}
    for _ in range(rounds):
        for provider, calls in steps.items():
            for call in calls:
                start, start_cpu = time.perf_counter(), time.process_time()
                call()
                times[provider].append(time.perf_counter() - start)
                cpu[provider].append(time.process_time() - start_cpu)
    print(f"\nper-step wall seconds: {({p: [round(t, 3) for t in v] for p, v in times.items()})}"
          f"\nper-step CPU seconds: {({p: [round(t, 3) for t in v] for p, v in cpu.items()})}; "
          f"load average {os.getloadavg()[0]:.1f}")
    medians = {provider: statistics.median(values) for provider, values in times.items()}
    return medians, first, {provider: statistics.median(values) for provider, values in cpu.items()}


def _report(benchmark, suite, case, medians, first, tokens, graphs, cpu):
    eager, compiled = medians["ours"], medians["compiled"]
    for provider, label in (("ours", "eager"), ("compiled", "torch.compile")):
        record(benchmark if provider == "ours" else None, suite=suite, case=case, mode="fwd+bwd", provider=provider,
               seconds=medians[provider],
               note=f"{label}; {tokens / medians[provider]:.0f} tokens/s; CPU {cpu[provider]:.3f} s; first calls "
                    f"{first[provider]:.1f} s" + (f" ({graphs} graphs compiled, {_fused()} LoRA linears fused)"
                                            if provider == "compiled" else ""))
    print(f"\n{suite} / {case}: eager {eager:.3f} s, compiled {compiled:.3f} s per step -> {eager / compiled:.2f}x "
          f"(CPU seconds: eager {cpu['ours']:.3f}, compiled {cpu['compiled']:.3f} -> "
          f"{cpu['ours'] / cpu['compiled']:.2f}x); first compiled calls {first['compiled']:.1f} s "
          f"(eager {first['ours']:.1f} s), {graphs} graphs, {_fused()} LoRA linears fused")


def _fused() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["lora_linears_fused"]


def _mntp_step(benchmark, *, device, dtype, attention_impl, loss_impl, blocks, block_size, rounds, suite):
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from llm2vec_fast import patch
    from llm2vec_fast.training.collators import MNTPDataCollator, resolve_mask_token
    from llm2vec_fast.training.lora_graph import training_compile_settings
    from llm2vec_fast.training.losses import MNTPLoss, MNTPModel
    from llm2vec_fast.training.modeling import load_tokenizer

    _need_compiler(device)
    torch.manual_seed(0)
    text_file = SHARED_DATA / "wikitext" / "wikitext-2-raw.test.txt.gz"
    if device == "cuda" and not text_file.is_file():
        # The GPU machine has neither the GGUF package nor ../shared/data, and 540 MB of weights do not travel with
        # the tree: the step's time does not depend on the weights' values or the words, so a model of
        # SmolLM2-135M's shapes with random weights and random token ids, 20% of them masked, stands in.
        causal_lm = AutoModelForCausalLM.from_config(_smollm2_135m_config(), dtype=dtype).to(device)
        ids = torch.randint(0, causal_lm.config.vocab_size, (blocks, block_size), device=device)
        masked = torch.rand(ids.shape, device=device) < 0.2
        batch = {"input_ids": ids.masked_fill(masked, 28),  # 28: any id serves as the mask token
                 "attention_mask": torch.ones_like(ids), "labels": ids.masked_fill(~masked, -100)}
    else:
        path = _smollm2()
        if not text_file.is_file():
            pytest.skip(f"real text data not found at {text_file}")
        with gzip.open(text_file, "rt", encoding="utf-8") as handle:
            text = handle.read(400_000)
        tokenizer = load_tokenizer(path)
        resolve_mask_token(tokenizer, "blank")  # the stage's default mask token ('_')
        ids = tokenizer(text)["input_ids"]
        features = [{"input_ids": ids[i * block_size:(i + 1) * block_size]} for i in range(blocks)]
        collator = MNTPDataCollator.for_replacement(tokenizer, "default", 0.2, vocab_size=len(tokenizer))
        batch = {k: v.to(device) for k, v in collator(features).items()
                 if k in ("input_ids", "attention_mask", "labels")}
        causal_lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    patch(causal_lm, attention_impl=attention_impl)
    model = MNTPModel(_lora(causal_lm.get_decoder()), MNTPLoss.from_causal_lm(causal_lm, impl=loss_impl))
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def step(module):
        with training_compile_settings() if module is compiled else contextlib.nullcontext():
            module(**batch)["loss"].backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    medians, first, cpu = _interleaved({"ours": [lambda: step(model)], "compiled": [lambda: step(compiled)]}, rounds)
    benchmark.pedantic(step, args=(compiled,), rounds=1, warmup_rounds=0)
    _report(benchmark, suite, f"{blocks} x {block_size} tokens, 20% masked", medians, first,
            batch["input_ids"].numel(), counters["stats"]["unique_graphs"], cpu)


def test_mntp_step_compiled_vs_eager_cpu(benchmark):
    _mntp_step(benchmark, device="cpu", dtype=torch.float32, attention_impl="torch", loss_impl="torch", blocks=4,
               block_size=128, rounds=ROUNDS, suite="MNTP step, compiled vs eager (SmolLM2-135M, LoRA r16, fp32, CPU)")


@pytest.mark.gpu
def test_mntp_step_compiled_vs_eager_cuda(benchmark):
    """Phase 4 of gpu_check.sh, when its time budget leaves room (inductor's first compile of the 30-layer forward
    and backward takes minutes); on the GPU machine a model of SmolLM2-135M's shapes with random weights."""
    _mntp_step(benchmark, device="cuda", dtype=torch.bfloat16, attention_impl="triton", loss_impl="auto", blocks=16,
               block_size=512, rounds=10, suite="MNTP step, compiled vs eager (SmolLM2-135M, LoRA r16, bf16, CUDA)")


def _triplets(n: int, seed: int):
    path = SHARED_DATA / "snli" / "nli_triplets.csv"
    if not path.is_file():
        pytest.skip(f"real text data not found at {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows = random.Random(seed).sample(rows, n)
    return [{"query": r["sent0"], "positive": r["sent1"], "negative": r["hard_neg"], "instruction": INSTRUCTION}
            for r in rows]


def test_contrastive_step_compiled_vs_eager_cpu(benchmark):
    from torch._dynamo.utils import counters

    from llm2vec_fast.training.collators import GROUPS, ContrastiveCollator
    from llm2vec_fast.training.lora_graph import training_compile_settings
    from llm2vec_fast.training.losses import InfoNCELoss
    from llm2vec_fast.training.modeling import load_base_model, load_tokenizer

    _need_compiler()
    path = _smollm2()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(path)
    collator = ContrastiveCollator(tokenizer, max_length=48, packed=True)
    batches = [collator(_triplets(TRIPLETS, seed)) for seed in (0, 1)]
    tokens = sum(int(chunk["input_ids"].numel()) for b in batches for group in GROUPS if group in b for chunk in b[group])
    model = _lora(load_base_model(path, dtype=torch.float32, attention_impl="torch"))
    loss = InfoNCELoss("mean", scale=50.0, impl="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def step(encoder, batch):
        with training_compile_settings() if encoder is compiled else contextlib.nullcontext():
            loss(encoder, batch).backward()
        model.zero_grad(set_to_none=True)

    steps = {provider: [lambda b=b, e=encoder: step(e, b) for b in batches]
             for provider, encoder in (("ours", model), ("compiled", compiled))}
    medians, first, cpu = _interleaved(steps, ROUNDS)
    benchmark.pedantic(step, args=(compiled, batches[0]), rounds=1, warmup_rounds=0)
    _report(benchmark, "supervised contrastive step, compiled vs eager (SmolLM2-135M, LoRA r16, fp32, CPU)",
            f"{TRIPLETS} SNLI triplets, packed", medians, first, tokens // len(batches), counters["stats"]["unique_graphs"],
            cpu)
