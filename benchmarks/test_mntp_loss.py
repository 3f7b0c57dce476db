"""Masked next-token loss, forward+backward: ours (``masked_next_token_loss``) vs the full-logits PyTorch path
(``masked_next_token_loss_reference``: ``hidden @ weight.T`` for every position, then cross-entropy), and
Cut Cross-Entropy / Liger's fused linear cross-entropy when they are importable (on CUDA).

Rows (20% of the positions labelled, as MNTP's default mask rate):
- CUDA: 16,384 tokens (8 x 2,048), vocab 128,256, hidden 4,096, bf16 (Llama-3-8B's head). Skipped without a GPU.
- CPU: 4,096 tokens (2 x 2,048), vocab 49,152, hidden 576 (SmolLM2-135M's head), fp32. Ours runs its chunked
  PyTorch path here (``impl="torch"``; the Triton interpreter is a test tool, not what runs on a CPU).

Each row records in ``extra_info``: the FLOPs of the useful work (forward + the two backward GEMMs, over the
rows the provider computes) and the peak memory the forward+backward adds beyond its inputs:
- CUDA: ``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated before it;
- CPU: in a fresh Python process per provider, the growth of the peak resident set size (``VmHWM`` from
  ``/proc/self/status``; not ``ru_maxrss``, which a child inherits from its parent on Linux) across one
  forward+backward, after the inputs were created and one small warm-up call loaded the libraries. tracemalloc does not see torch's allocations, so RSS is the honest
  measure; it includes the gradient buffers (``d weight`` alone is vocab x hidden x 4 bytes = 108 MiB here).

    python -m pytest benchmarks/test_mntp_loss.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from llm2vec_fast.kernels.mntp_loss import masked_next_token_loss, masked_next_token_loss_reference

LABELLED = 0.2
CPU_SHAPE = dict(batch=2, seq=2048, hidden=576, vocab=49152)
CUDA_SHAPE = dict(batch=8, seq=2048, hidden=4096, vocab=128256)
CPU_MEMORY_TARGET = 0.25  # ours / full-logits peak memory
HAS_CCE = importlib.util.find_spec("cut_cross_entropy") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def _inputs(batch, seq, hidden, vocab, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, seq, hidden, generator=gen) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) >= LABELLED] = -100
    return h, w, labels.to(device)


def _loss(provider, h, w, labels, impl="auto"):
    if provider == "ours":
        return masked_next_token_loss(h, w, labels, impl=impl, variant="fused")
    if provider == "ours_gemm":
        return masked_next_token_loss(h, w, labels, impl=impl, variant="gemm")
    if provider == "full_logits":
        return masked_next_token_loss_reference(h, w, labels)
    if provider == "cut_cross_entropy":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(h, w, labels, shift=1)
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        shifted_h = h[:, :-1].reshape(-1, h.shape[-1])
        return LigerFusedLinearCrossEntropyLoss()(w, shifted_h, labels[:, 1:].reshape(-1))
    raise ValueError(provider)


def _step(provider, h, w, labels, impl="auto"):
    h.grad = None
    w.grad = None  # (None already when the head is frozen)
    loss = _loss(provider, h, w, labels, impl)
    loss.backward()
    return loss


def _flops(provider, batch, seq, hidden, vocab):
    rows = batch * (seq - 1) * (1.0 if provider in ("full_logits", "liger") else LABELLED)
    return 3 * 2 * rows * vocab * hidden


_CPU_PEAK_SCRIPT = """
import json, resource, torch
torch.set_num_threads({threads})
import sys; sys.path.insert(0, {bench_dir!r})
from test_mntp_loss import _inputs, _step, _peak_rss_kib
h, w, labels = _inputs({batch}, {seq}, {hidden}, {vocab}, torch.float32, "cpu")
small = _inputs(1, 64, {hidden}, 512, torch.float32, "cpu", seed=1)
_step("{provider}", *small, impl="torch")  # load the libraries outside the measured window
before = _peak_rss_kib()
_step("{provider}", h, w, labels, impl="torch")
after = _peak_rss_kib()
print(json.dumps({{"peak_extra_mib": (after - before) / 1024}}))
"""


def _peak_rss_kib():
    """Peak resident set of this process in KiB: ``VmHWM`` (Linux; starts afresh at exec), else ``ru_maxrss``.

    ``ru_maxrss`` alone is wrong in a child process: Linux carries the parent's peak across fork and exec, so a
    child started from a pytest process that already peaked higher would measure nothing.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_peak_mib(provider, shape):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = _CPU_PEAK_SCRIPT.format(threads=torch.get_num_threads(), provider=provider,
                                     bench_dir=os.path.dirname(os.path.abspath(__file__)), **shape)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


@pytest.mark.parametrize("provider", ["ours", "full_logits"])
def test_mntp_loss_cpu(benchmark, perf_record, provider):
    shape = CPU_SHAPE
    h, w, labels = _inputs(**shape, dtype=torch.float32, device="cpu")
    benchmark.group = "mntp loss cpu fp32 tokens={} vocab={vocab} hidden={hidden}".format(
        shape["batch"] * shape["seq"], **shape)
    benchmark.pedantic(_step, args=(provider, h, w, labels, "torch"), rounds=2, warmup_rounds=0)
    flops = _flops(provider, **shape)
    peak = round(_cpu_peak_mib(provider, shape), 1)
    perf_record(benchmark, suite="masked next-token loss (fp32, CPU)", case="4096 tok V49152 H576 20%",
                mode="fwd+bwd", provider=provider, seconds=benchmark.stats.stats.median, flops=flops,
                path="chunked torch" if provider == "ours" else "reference", peak_extra_mib=peak,
                note=f"peak +{peak:.0f} MiB")


def test_mntp_loss_cpu_peak_memory_ratio(benchmark):
    """Peak memory of ours over the full-logits path on CPU, each in a fresh process (target <= 25%)."""
    shape = CPU_SHAPE
    ours = _cpu_peak_mib("ours", shape)
    full = _cpu_peak_mib("full_logits", shape)
    benchmark.group = "mntp loss cpu memory"
    benchmark.extra_info.update(ours_peak_extra_mib=round(ours, 1), full_logits_peak_extra_mib=round(full, 1),
                                ratio=round(ours / full, 4))
    benchmark.pedantic(lambda: None, rounds=1)
    assert ours <= CPU_MEMORY_TARGET * full, f"ours {ours:.0f} MiB vs full logits {full:.0f} MiB"


CUDA_PROVIDERS = [
    "ours",
    "ours_gemm",
    "full_logits",
    pytest.param("cut_cross_entropy", marks=pytest.mark.skipif(not HAS_CCE, reason="cut-cross-entropy not installed")),
    pytest.param("liger", marks=pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel not installed")),
]


@pytest.mark.parametrize("head", ["trained", "frozen"])
@pytest.mark.parametrize("provider", CUDA_PROVIDERS)
def test_mntp_loss_cuda(benchmark, perf_record, cuda_step, provider, head):
    """``frozen``: the LM head needs no gradient, as in LoRA MNTP (no ``d weight`` buffer at all)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (targets there: peak memory <= 3% and time <= 0.35x of the full-logits path)")
    shape = CUDA_SHAPE
    h, w, labels = _inputs(**shape, dtype=torch.bfloat16, device="cuda")
    if head == "frozen":
        w.requires_grad_(False)
    peak, run = cuda_step(lambda: _step(provider, h, w, labels), f"{provider} at {shape}")
    benchmark.group = "mntp loss cuda bf16 tokens={} vocab={vocab} hidden={hidden} head {}".format(
        shape["batch"] * shape["seq"], head, **shape)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    flops = _flops(provider, **shape)
    perf_record(benchmark, suite="masked next-token loss (bf16, CUDA)", case=f"16K tok V128256 H4096 20% {head}",
                mode="fwd+bwd", provider=provider, seconds=benchmark.stats.stats.median, flops=flops,
                peak_extra_mib=round(peak / 2**20, 1), note=f"peak +{peak / 2**20:.0f} MiB")
