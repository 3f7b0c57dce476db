"""Bidirectional attention: ours vs FlashAttention-2, non-causal.

CUDA rows (bf16, 16K tokens per batch, hidden 2048 = 32 heads of 64 or 16 heads of 128, MHA):
- padded batches, seq 1K, 2K, 4K, 8K (batch = 16K / seq), head_dim 64 and 128, forward and forward+backward;
- packed (varlen) batches of 16K tokens, sequence lengths drawn in [64, 1024];
- one attention-dropout row (p = 0.1, SimCSE trains with attention dropout) and one GQA row (4:1).
Baseline "fa2": the ``flash_attn`` package if importable, else PyTorch SDPA forced to its FLASH_ATTENTION backend
(FlashAttention-2); varlen baseline: ``flash_attn_varlen_func``, else ``torch.nn.attention.varlen.varlen_attn``.
FLOPs: 4 * B * H * S^2 * D forward, 2.5 times that for the backward (forward+backward = 3.5 times).

CPU rows (fp32, no GPU): our ``impl="torch"`` path vs calling SDPA directly, small shapes. Without CUDA the GPU
rows are skipped with that reason, and the run says plainly that the GPU comparisons did not run.

    python -m pytest benchmarks/test_attention.py --benchmark-columns=median,rounds
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm2vec_fast.kernels.attention import bidirectional_attention
from perf_table import skip_if_compile_warmup

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "GPU comparisons did not run: no CUDA device (only the CPU rows ran)"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)

TOKENS = 16 * 1024
HIDDEN = 2048
SEQS = [1024, 2048, 4096, 8192]  # the targets' range
HEAD_DIMS = [64, 128]
MODES = ["fwd", "fwd_bwd"]
PROVIDERS = ["ours", "fa2"]

try:  # pragma: no cover - only on machines with flash-attn
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    FA2_NAME = "flash_attn"
except Exception:  # noqa: BLE001 - any import failure means: use SDPA's FlashAttention-2 backend
    flash_attn_func = flash_attn_varlen_func = None
    FA2_NAME = "sdpa-flash"


def _fa2_padded(q, k, v, dropout_p=0.0):
    if flash_attn_func is not None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=False)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=False,
            enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)


def _fa2_varlen(q, k, v, cu, max_seqlen):
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=False)
    from torch.nn.attention.varlen import varlen_attn

    # varlen_attn takes no GQA argument (torch 2.11); the varlen rows are MHA
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError("torch's varlen_attn has no grouped-query attention")
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)


def _median_seconds(benchmark, calls_per_round=1):
    return benchmark.stats.stats.median / calls_per_round


def _make_step(fn, tensors, mode):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*tensors)
        return step
    grad_out = None

    def step():
        nonlocal grad_out
        out = fn(*tensors)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        return torch.autograd.grad(out, tensors, grad_out)
    return step


def _time_baseline(benchmark, step):
    """The baseline may be missing on this machine's torch build (e.g. SDPA's flash backend without GQA support,
    or no varlen_attn): then the row is skipped with the reason, never silently replaced."""
    try:
        step()
        torch.cuda.synchronize()
    except (RuntimeError, NotImplementedError, ImportError, TypeError) as error:
        pytest.skip(f"FlashAttention-2 baseline unavailable here: {type(error).__name__}: {str(error)[:200]}")
    return _time_cuda(benchmark, step)


def _time_cuda(benchmark, step):
    """Warm up (autotuning happens here), pick enough calls per round to reach ~5 ms, time with pytest-benchmark.
    Returns (seconds per call, peak extra MiB of one call)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    skip_if_compile_warmup(benchmark)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, min(50, math.ceil(5.0 / max(start.elapsed_time(end), 1e-3))))

    def round_():
        for _ in range(calls):
            step()
        torch.cuda.synchronize()

    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(round_, rounds=10, warmup_rounds=1, iterations=1)
    return _median_seconds(benchmark, calls), peak_mib


def _padded_inputs(batch, seq, heads, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, seq, heads, head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _flops(mode, batch_heads_s2_d):
    fwd = 4 * batch_heads_s2_d
    return fwd if mode == "fwd" else 3.5 * fwd


@needs_cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq", SEQS)
def test_attention_padded_cuda(benchmark, perf_record, seq, head_dim, mode, provider):
    batch, heads = TOKENS // seq, HIDDEN // head_dim
    tensors = _padded_inputs(batch, seq, heads, heads, head_dim)
    fn = (lambda q, k, v: bidirectional_attention(q, k, v)) if provider == "ours" else _fa2_padded
    timer = _time_cuda if provider == "ours" else _time_baseline
    seconds, peak = timer(benchmark, _make_step(fn, tensors, mode))
    perf_record(benchmark, suite="attention (bf16, H200/H100)", case=f"seq {seq} d{head_dim} b{batch} h{heads}",
           mode=mode, provider=provider if provider == "ours" else FA2_NAME, seconds=seconds,
           flops=_flops(mode, batch * heads * seq * seq * head_dim), peak_mib=round(peak, 1))


def _varlen_lengths(seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < TOKENS:
        n = int(torch.randint(64, 1025, (1,), generator=gen))
        n = min(n, TOKENS - total)
        lengths.append(n)
        total += n
    return lengths


@needs_cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_varlen_cuda(benchmark, perf_record, head_dim, mode, provider):
    lengths = _varlen_lengths()
    heads = HIDDEN // head_dim
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    max_seqlen = max(lengths)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = [torch.randn(TOKENS, heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for _ in range(3)]
    if provider == "ours":
        def fn(q, k, v):
            return bidirectional_attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen)
    else:
        def fn(q, k, v):
            return _fa2_varlen(q, k, v, cu, max_seqlen)
    timer = _time_cuda if provider == "ours" else _time_baseline
    seconds, peak = timer(benchmark, _make_step(fn, tensors, mode))
    flops = _flops(mode, sum(n * n for n in lengths) * heads * head_dim)
    fa2_name = "flash_attn" if flash_attn_varlen_func is not None else "torch-varlen-flash"
    perf_record(benchmark, suite="attention (bf16, H200/H100)", case=f"varlen {len(lengths)} seqs d{head_dim}",
           mode=mode, provider=provider if provider == "ours" else fa2_name, seconds=seconds, flops=flops,
           peak_mib=round(peak, 1))


@needs_cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", ["dropout0.1", "gqa4"])
def test_attention_dropout_and_gqa_cuda(benchmark, perf_record, case, provider):
    seq, head_dim, heads = 1024, 64, 32
    kv_heads = heads // 4 if case == "gqa4" else heads
    dropout_p = 0.1 if case.startswith("dropout") else 0.0
    tensors = _padded_inputs(TOKENS // seq, seq, heads, kv_heads, head_dim)
    if provider == "ours":
        def fn(q, k, v):
            return bidirectional_attention(q, k, v, dropout_p=dropout_p)
    else:
        def fn(q, k, v):
            return _fa2_padded(q, k, v, dropout_p=dropout_p)
    timer = _time_cuda if provider == "ours" else _time_baseline
    seconds, peak = timer(benchmark, _make_step(fn, tensors, "fwd_bwd"))
    perf_record(benchmark, suite="attention (bf16, H200/H100)", case=f"{case} seq {seq} d{head_dim}", mode="fwd_bwd",
           provider=provider if provider == "ours" else FA2_NAME, seconds=seconds,
           flops=_flops("fwd_bwd", (TOKENS // seq) * heads * seq * seq * head_dim), peak_mib=round(peak, 1))


# --------------------------------------------------------------------------------------------------------
# Kernel variants side by side (#10) and the band flags (#12)
# --------------------------------------------------------------------------------------------------------


def _padded_lengths(batch, seq, seed=0):
    """Real lengths of a padded encoding batch: drawn in [seq / 8, seq], the longest = seq."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 8, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    return lengths


@needs_cuda
@pytest.mark.parametrize("variant", [pytest.param(v, id=f"ours-{v}") for v in ("mask", "skip")])  # "ours": warmed
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["left-padded", "varlen"])
def test_attention_padding_variants_cuda(benchmark, perf_record, layout, mode, variant):
    """padding="mask" (default: every key tile, mask in each) vs "skip" (only the real tokens' tiles, mask on
    boundary tiles; packed outputs allocated empty). Padded: seq 1024, lengths in [128, 1024], left padding."""
    from llm2vec_fast.kernels.attention import attention_variants

    seq, head_dim, heads = 1024, 64, 32
    batch = TOKENS // seq
    lengths = _padded_lengths(batch, seq)
    if layout == "varlen":
        cu = torch.tensor([0] + lengths.cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        total = int(lengths.sum())
        gen = torch.Generator(device="cuda").manual_seed(0)
        tensors = [torch.randn(total, heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
                   .requires_grad_() for _ in range(3)]
        kwargs = dict(cu_seqlens=cu, max_seqlen=seq)
    else:
        tensors = _padded_inputs(batch, seq, heads, heads, head_dim)
        mask = torch.arange(seq)[None, :] >= (seq - lengths)[:, None]
        kwargs = dict(key_padding_mask=mask.cuda())

    def fn(q, k, v):
        with attention_variants(padding=variant):
            return bidirectional_attention(q, k, v, **kwargs)

    seconds, peak = _time_cuda(benchmark, _make_step(fn, tensors, mode))
    perf_record(benchmark, suite="attention variants (bf16, H200/H100)",
                case=f"padding {layout} seq {seq} d{head_dim} b{batch}", mode=mode,
                provider="ours" if variant == "mask" else f"ours:padding={variant}",
                seconds=seconds, flops=_flops(mode, int((lengths ** 2).sum()) * heads * head_dim),
                peak_mib=round(peak, 1))


@needs_cuda
@pytest.mark.parametrize("variant", [pytest.param("tma_ws", id="ours-tma_ws")])  # "ours": in the warm-up
@pytest.mark.parametrize("seq,head_dim,mode", [(1024, 64, "fwd"), (4096, 64, "fwd"), (1024, 128, "fwd"),
                                               (4096, 128, "fwd"), (4096, 128, "fwd_bwd")])
def test_attention_forward_variants_cuda(benchmark, perf_record, seq, head_dim, mode, variant):
    """forward="tma_ws" (the Hopper forward: TMA loads, warp-specialized key loop) on the shapes of
    test_attention_padded_cuda, recorded in its rows' groups, so the table puts it beside the default forward
    ("ours") and FlashAttention-2 and marks the faster of ours."""
    from llm2vec_fast.kernels.attention import attention_variants

    batch, heads = TOKENS // seq, HIDDEN // head_dim
    tensors = _padded_inputs(batch, seq, heads, heads, head_dim)

    def fn(q, k, v):
        with attention_variants(forward=variant):
            return bidirectional_attention(q, k, v)

    seconds, peak = _time_cuda(benchmark, _make_step(fn, tensors, mode))
    perf_record(benchmark, suite="attention (bf16, H200/H100)", case=f"seq {seq} d{head_dim} b{batch} h{heads}",
                mode=mode, provider=f"ours:forward={variant}", seconds=seconds,
                flops=_flops(mode, batch * heads * seq * seq * head_dim), peak_mib=round(peak, 1))


#: dropout="philox4x" beside the default RNG, forward+backward at p = 0.1: seq 1K hd 64 (the group of
#: test_attention_dropout_and_gqa_cuda's row, with FlashAttention-2) and seq 4K hd 128 (the default RNG here too)
DROPOUT_VARIANT_ROWS = [(1024, 64, "philox4x"), (4096, 128, "philox"), (4096, 128, "philox4x")]


@needs_cuda
@pytest.mark.parametrize("seq,head_dim,variant", [pytest.param(*row, id=f"ours-{row[2]}-s{row[0]}-d{row[1]}")
                                                  for row in DROPOUT_VARIANT_ROWS])  # "ours": in the warm-up
def test_attention_dropout_variants_cuda(benchmark, perf_record, seq, head_dim, variant):
    """dropout="philox4x" (one Philox call per 16 keep-decisions) vs the default "philox" (one per decision),
    forward+backward with dropout 0.1, recorded in the dropout row's groups so that the table marks the faster."""
    from llm2vec_fast.kernels.attention import attention_variants

    heads = HIDDEN // head_dim
    tensors = _padded_inputs(TOKENS // seq, seq, heads, heads, head_dim)

    def fn(q, k, v):
        with attention_variants(dropout=variant):
            return bidirectional_attention(q, k, v, dropout_p=0.1)

    seconds, peak = _time_cuda(benchmark, _make_step(fn, tensors, "fwd_bwd"))
    perf_record(benchmark, suite="attention (bf16, H200/H100)", case=f"dropout0.1 seq {seq} d{head_dim}",
                mode="fwd_bwd", provider="ours" if variant == "philox" else f"ours:dropout={variant}",
                seconds=seconds, flops=_flops("fwd_bwd", (TOKENS // seq) * heads * seq * seq * head_dim),
                peak_mib=round(peak, 1))


@needs_cuda
@pytest.mark.parametrize("variant", [pytest.param("wg64", id="ours-wg64")])  # "ours": in the warm-up
@pytest.mark.parametrize("seq,head_dim", [(1024, 64), (4096, 64), (1024, 128), (4096, 128)])
def test_attention_dkdv_variants_cuda(benchmark, perf_record, seq, head_dim, variant):
    """dkdv="wg64" (64 keys per warpgroup, 64 queries streamed: m64n64 wgmma) forward+backward on the shapes of
    test_attention_padded_cuda (MHA, no mask: the variant runs there at head_dim 64, and at 128 under Triton >= 3.9;
    skipped where it falls back), recorded in its rows' groups beside the default dK/dV ("ours") and FA2."""
    import triton

    from llm2vec_fast.kernels.attention import attention_variants, candidate_configs

    if not candidate_configs("dkdv_wg64", head_dim, "tf32"):  # it would time the default dK/dV under its name
        pytest.skip(f"dkdv={variant} falls back to the default dK/dV at head_dim {head_dim} under Triton "
                    f"{triton.__version__} (no 64-key warpgroup tile fits registers there)")
    batch, heads = TOKENS // seq, HIDDEN // head_dim
    tensors = _padded_inputs(batch, seq, heads, heads, head_dim)

    def fn(q, k, v):
        return bidirectional_attention(q, k, v)

    step = _make_step(fn, tensors, "fwd_bwd")

    def variant_step():  # the variant is read when the backward runs: the whole step inside the block
        with attention_variants(dkdv=variant):
            return step()

    seconds, peak = _time_cuda(benchmark, variant_step)
    perf_record(benchmark, suite="attention (bf16, H200/H100)", case=f"seq {seq} d{head_dim} b{batch} h{heads}",
                mode="fwd_bwd", provider=f"ours:dkdv={variant}", seconds=seconds,
                flops=_flops("fwd_bwd", batch * heads * seq * seq * head_dim), peak_mib=round(peak, 1))


@needs_cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", ["causal", "window512", "softcap50"])
def test_attention_band_flags_cuda(benchmark, perf_record, case, provider):
    """Causal, a 512 window and Gemma-2's soft-cap at seq 4096, forward+backward; FA2 baseline with the same
    rule (flash_attn's window_size is inclusive: |i - j| <= w, so w = 511; SDPA's flash backend does only causal).
    FLOPs count the visible pairs only."""
    seq, head_dim, heads = 4096, 128, 16
    batch = TOKENS // seq
    flags = {"causal": dict(causal=True), "window512": dict(window=512), "softcap50": dict(logit_softcap=50.0)}[case]
    tensors = _padded_inputs(batch, seq, heads, heads, head_dim)
    if provider == "ours":
        def fn(q, k, v):
            return bidirectional_attention(q, k, v, **flags)
    elif flash_attn_func is not None:
        fa_kwargs = {"causal": dict(causal=True), "window512": dict(window_size=(511, 511)),
                     "softcap50": dict(softcap=50.0)}[case]

        def fn(q, k, v):
            return flash_attn_func(q, k, v, **fa_kwargs)
    elif case == "causal":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
                ).transpose(1, 2)
    else:
        pytest.skip(f"no FlashAttention-2 baseline for {case} without the flash_attn package")
    timer = _time_cuda if provider == "ours" else _time_baseline
    seconds, peak = timer(benchmark, _make_step(fn, tensors, "fwd_bwd"))
    pairs = {"causal": seq * (seq + 1) // 2, "window512": seq * 1023 - 512 * 511, "softcap50": seq * seq}[case]
    perf_record(benchmark, suite="attention (bf16, H200/H100)", case=f"{case} seq {seq} d{head_dim}",
                mode="fwd_bwd", provider=provider if provider == "ours" else FA2_NAME, seconds=seconds,
                flops=_flops("fwd_bwd", batch * heads * pairs * head_dim), peak_mib=round(peak, 1))


# --------------------------------------------------------------------------------------------------------
# CPU rows
# --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="CPU rows run only where there is no GPU")
@pytest.mark.parametrize("provider", ["ours", "sdpa"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seq", [128, 512])
def test_attention_cpu(benchmark, perf_record, seq, mode, provider):
    batch, heads, kv_heads, head_dim = 4, 9, 3, 64  # SmolLM2's attention shape
    tensors = _padded_inputs(batch, seq, heads, kv_heads, head_dim, dtype=torch.float32, device="cpu")
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, seq // 2:] = False
    if provider == "ours":
        def fn(q, k, v):
            return bidirectional_attention(q, k, v, key_padding_mask=mask, impl="torch")
    else:
        def fn(q, k, v):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
                is_causal=False, enable_gqa=True,
            ).transpose(1, 2)
    step = _make_step(fn, tensors, mode)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    perf_record(benchmark, suite="attention (fp32, CPU; GPU comparisons did not run: no CUDA device)",
           case=f"seq {seq} b{batch} h{heads}/{kv_heads} d{head_dim}", mode=mode, provider=provider,
           seconds=_median_seconds(benchmark), flops=_flops(mode, batch * heads * seq * seq * head_dim))
