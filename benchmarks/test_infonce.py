"""InfoNCE forward+backward: ours (``info_nce_loss``) vs the plain PyTorch formula (``info_nce_loss_reference``).

Rows: one hard negative per query (N = B, LLM2Vec's supervised setting), scale 50.
- CUDA: B 8,192 and 65,536 at D 4,096, bf16 (skipped without a GPU); ours in both variants (``ours`` = fused
  streaming kernel, ``ours_gemm`` = cuBLAS GEMMs + Triton row softmax) beside the PyTorch formula.
- CPU: B 256 .. 4,096 at D 576 (SmolLM2's hidden size), fp32; ours runs its PyTorch slab path here (``impl``
  "auto" picks Triton only on CUDA or under TRITON_INTERPRET=1, and the recorded ``path`` shows which ran).

Each row records (``perf_record``, printed in the end-of-run table): the path taken, the FLOPs of the useful work (3 GEMMs of 2*B*(B+N)*D) and
TFLOP/s (of the median time), and the peak memory the call adds beyond its inputs (CUDA: max_memory_allocated; CPU: the growth of
the peak resident set of a fresh process running one forward+backward).

    python -m pytest benchmarks/test_infonce.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llm2vec_fast.kernels._dispatch import use_triton
from llm2vec_fast.kernels.infonce import info_nce_loss, info_nce_loss_reference

SCALE = 50.0
CUDA_BATCHES = [8192, 65536]  # a mid size and the target's B = 64K
CPU_BATCHES = [256, 1024, 4096]
PROVIDERS = ["ours", "pytorch"]
# On CUDA both Triton variants side by side: "ours" is variant="fused" (the default), "ours_gemm" variant="gemm".
CUDA_PROVIDERS = ["ours", "ours_gemm", "pytorch"]


def _inputs(batch, dim, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(batch, dim, generator=generator, device=device, dtype=dtype).requires_grad_()
            for _ in range(3)]


def _step(provider, tensors):
    for t in tensors:
        t.grad = None
    if provider == "pytorch":
        loss = info_nce_loss_reference(*tensors, scale=SCALE)
    else:
        loss = info_nce_loss(*tensors, scale=SCALE, variant="gemm" if provider == "ours_gemm" else "fused")
    loss.backward()
    return loss


def _flops(batch, dim):
    return 3 * 2 * batch * (2 * batch) * dim


# Linux: writing 5 to /proc/self/clear_refs resets the peak resident set (VmHWM) to the current one, so the
# peak after the call minus the resident set before it is what the call added (inputs' gradients included).
_CPU_PEAK_SCRIPT = """
import json, torch
torch.set_num_threads({threads})
from llm2vec_fast.kernels.infonce import info_nce_loss, info_nce_loss_reference
def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key)) / 1024
g = torch.Generator().manual_seed(0)
t = [torch.randn({batch}, {dim}, generator=g).requires_grad_() for _ in range(3)]
fn = info_nce_loss if "{provider}" == "ours" else info_nce_loss_reference
fn(*[x.detach()[:8].clone().requires_grad_() for x in t], scale={scale}).backward()  # lazy initialisation
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
fn(*t, scale={scale}).backward()
print(json.dumps({{"peak_extra_mib": status("VmHWM") - before}}))
"""


def _cpu_peak_mib(provider, batch, dim):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = _CPU_PEAK_SCRIPT.format(threads=torch.get_num_threads(), batch=batch, dim=dim, provider=provider,
                                     scale=SCALE)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", CPU_BATCHES)
def test_infonce_cpu(benchmark, perf_record, provider, batch):
    dim = 576
    tensors = _inputs(batch, dim, torch.float32, "cpu")
    path = "triton" if (provider == "ours" and use_triton("auto", tensors[0])) else "torch"
    if provider == "ours" and path == "triton":
        pytest.skip("TRITON_INTERPRET=1 is set: the interpreter is a test tool, not what runs on CPU")
    benchmark.group = f"infonce cpu fp32 D={dim} B={batch}"
    benchmark.pedantic(_step, args=(provider, tensors), rounds=3, warmup_rounds=1)
    perf_record(benchmark, suite="infonce (fp32, CPU)", case=f"B {batch} N {batch} D {dim}", mode="fwd+bwd",
                provider=provider, seconds=benchmark.stats.stats.median, flops=_flops(batch, dim),
                path=path if provider == "ours" else "reference",
                peak_extra_mib=round(_cpu_peak_mib(provider, batch, dim), 1),
                input_mib=round(3 * batch * dim * 4 / 2**20, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("provider", CUDA_PROVIDERS)
@pytest.mark.parametrize("batch", CUDA_BATCHES)
def test_infonce_cuda(benchmark, perf_record, cuda_step, provider, batch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dim = 4096
    tensors = _inputs(batch, dim, torch.bfloat16, "cuda")
    peak, run = cuda_step(lambda: _step(provider, tensors), f"{provider} at B={batch}, D={dim}")
    benchmark.group = f"infonce cuda bf16 D={dim} B={batch}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    perf_record(benchmark, suite="infonce (bf16, CUDA)", case=f"B {batch} N {batch} D {dim}", mode="fwd+bwd",
                provider=provider, seconds=benchmark.stats.stats.median, flops=_flops(batch, dim),
                path={"ours": "triton fused", "ours_gemm": "triton gemm"}.get(provider, "reference"),
                peak_extra_mib=round(peak / 2**20, 1),
                input_mib=round(3 * batch * dim * 2 / 2**20, 1))
