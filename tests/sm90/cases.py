"""Every kernel variant the sm_90 gate compiles: one dict per compile, built from short tables.

To add a case:
* a new flag combination of the attention kernels: one line in ``ATTENTION_VARIANTS`` (constexpr values);
* a new attention kernel (e.g. a TMA forward): one line in ``ATTENTION_KERNELS`` naming the kernel, the kind
  whose launch configs it uses, and its pointer/float parameters;
* a new MNTP / InfoNCE kernel or flag set: one line in ``loss_cases()``.

A case names the kernel as ``module:attribute``, the dtype of each pointer parameter, the fp32 scalars, the
constexpr values, ``ones`` (integers that a real launch passes as 1, which Triton specializes) and ``odd``
(integers that need not be multiples of 16, e.g. sizes); every other parameter is an i32 that is a multiple of
16 (strides), as real launches specialize them. Keys of each case:
``name, kernel, pointers, floats, constexprs, ones, odd, num_warps, num_stages, default, check_wgmma``:
``default`` marks a config the kernels choose by default (it must not spill); ``check_wgmma`` says that the
16-bit matmuls have 64 or more rows (``wgmma``'s M per warpgroup: BLOCK_M, keys in dK/dV), so they must compile
to ``wgmma``.
"""

from __future__ import annotations

import os

import torch

from llm2vec_fast.kernels import attention, infonce, mntp_loss

_ATTN = "llm2vec_fast.kernels.attention"
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

HEAD_DIMS = (64, 96, 128, 256)

#: name -> constexprs of one flag combination. "heavy" variants compile every config autotuning may pick;
#: the others compile only the default config (their registers are bounded by a heavy variant's).
ATTENTION_VARIANTS = {
    "plain": dict(GROUP=1, IS_VARLEN=False, HAS_PADDING=False, HAS_DROPOUT=False, STORE_LSE=False),
    "gqa": dict(GROUP=4, IS_VARLEN=False, HAS_PADDING=False, HAS_DROPOUT=False),
    "varlen-gqa": dict(GROUP=4, IS_VARLEN=True, HAS_PADDING=False, HAS_DROPOUT=False),
    "dropout": dict(GROUP=1, IS_VARLEN=False, HAS_PADDING=False, HAS_DROPOUT=True),
    "varlen-dropout-gqa": dict(GROUP=4, IS_VARLEN=True, HAS_PADDING=False, HAS_DROPOUT=True),
    # padding="skip": all-padding key tiles skipped, only boundary tiles masked
    "padskip-gqa": dict(GROUP=4, IS_VARLEN=False, HAS_PADDING=True, HAS_DROPOUT=False, PAD_SKIP=True),
    # Gemma-2: logit soft-capping and a sliding window
    "softcap-window-gqa": dict(GROUP=2, IS_VARLEN=False, HAS_PADDING=False, HAS_DROPOUT=False, SOFTCAP=True,
                               WINDOWED=True),
    # dropout="philox4x": 16 keep-decisions per Philox call (every config of the padded one: EVERY_CONFIG)
    "dropout4x": dict(GROUP=1, IS_VARLEN=False, HAS_PADDING=False, HAS_DROPOUT=True, PHILOX4X=True),
    "padding-dropout4x-gqa": dict(GROUP=4, IS_VARLEN=False, HAS_PADDING=True, HAS_DROPOUT=True, PHILOX4X=True),
}
#: the variants in which every config the pruning keeps is compiled: the most registers without and with
#: dropout (the pruning keeps different lists for the two)
ATTENTION_HEAVY = {
    "padding-gqa": dict(GROUP=4, IS_VARLEN=False, HAS_PADDING=True, HAS_DROPOUT=False),
    "padding-dropout-gqa": dict(GROUP=4, IS_VARLEN=False, HAS_PADDING=True, HAS_DROPOUT=True),
}

_FWD_FLOATS = ("qk_scale", "dropout_p", "inv_keep", "cap_in", "cap_out")
_BWD_FLOATS = ("qk_scale", "sm_scale", "dropout_p", "inv_keep", "cap_in", "cap_out")
_ODD = ("seqlen_padded", "max_seqlen", "window")
_META = dict(KPM="u8", CU_SEQLENS="i32", RANGES="i32", SEED="i64")
#: kernel name -> (kind of launch configs, pointer parameters holding q/k/v-dtype data, fp32 pointers, floats, odd)
ATTENTION_KERNELS = {
    "_attn_fwd_kernel": ("fwd", ("Q", "K", "V", "O"), ("LSE",), _FWD_FLOATS, _ODD + ("num_heads",)),
    "_attn_bwd_dq_kernel": ("dq", ("Q", "K", "V", "O", "DO", "DQ"), ("LSE", "DELTA"), _BWD_FLOATS,
                            _ODD + ("num_heads",)),
    "_attn_bwd_dkdv_kernel": ("dkdv", ("Q", "K", "V", "DO", "DK", "DV"), ("LSE", "DELTA"), _BWD_FLOATS,
                              _ODD + ("num_kv_heads",)),
}

#: where the default config is compiled: dtype -> {variant: head_dims}, sized for CI (about 100 compiles, a few
#: minutes on 2 cores; an fp32 compile alone takes 10-60 s). bf16 in every variant at the targets' head_dims 64 and
#: 128, the heavy ones at 96 and 256 too; fp16 compiles like bf16 (same tiles and instructions); fp32 ("ieee" FMA
#: matmuls) in the heaviest variant. ``LLM2VEC_FAST_SM90_GATE=full`` compiles every dtype x variant x head_dim.
DEFAULT_COVERAGE = {
    torch.bfloat16: {**{variant: (64, 128) for variant in ATTENTION_VARIANTS},
                     **{variant: HEAD_DIMS for variant in ATTENTION_HEAVY}},
    torch.float16: {"plain": (128,), "padding-dropout-gqa": (64,), "padding-dropout4x-gqa": (64,)},
    torch.float32: {"padding-dropout-gqa": (128,)},
}
#: where every config autotuning may pick is compiled: bf16, the heavy variants and philox4x's, head_dim 128
EVERY_CONFIG = {torch.bfloat16: {variant: (128,) for variant in (*ATTENTION_HEAVY, "padding-dropout4x-gqa")}}
if os.environ.get("LLM2VEC_FAST_SM90_GATE", "") == "full":
    DEFAULT_COVERAGE = {dtype: {variant: HEAD_DIMS for variant in (*ATTENTION_VARIANTS, *ATTENTION_HEAVY)}
                        for dtype in _DTYPES}
    EVERY_CONFIG = {dtype: {variant: HEAD_DIMS for variant in ATTENTION_HEAVY} for dtype in _DTYPES}


def attention_dot_precision(dtype) -> str:
    """The ``DOT_PRECISION`` the attention kernels get for ``dtype`` (as ``_Problem`` sets it)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_case(kernel, kind, data, fp32, floats, odd, dtype, head_dim, variant, flags, config, default):
    block_m, block_n, warps, stages = config
    constexprs = dict(CAUSAL=False, WINDOWED=False, SOFTCAP=False, PAD_SKIP=False, PHILOX4X=False)
    if kind == "fwd":
        constexprs["STORE_LSE"] = True
    if kind == "dkdv":
        constexprs["WG64"] = False
    constexprs.update(flags)
    if kind != "fwd":
        constexprs.pop("STORE_LSE", None)
    precision = attention_dot_precision(dtype)
    constexprs.update(HEAD_DIM=head_dim, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()),
                      BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision)
    pointers = {name: _DTYPES[dtype] for name in data}
    pointers.update({name: "fp32" for name in fp32}, **_META)
    rows = block_n if kind == "dkdv" else block_m  # the M of the kernel's matmuls (dK/dV: keys)
    return dict(
        name=f"{kernel}-{_DTYPES[dtype]}-d{head_dim}-{variant}-{block_m}x{block_n}w{warps}s{stages}",
        kernel=f"{_ATTN}:{kernel}", pointers=pointers, floats=list(floats), constexprs=constexprs,
        ones=["stride_ms"] if flags["HAS_PADDING"] else [], odd=list(odd), num_warps=warps, num_stages=stages,
        default=default, check_wgmma=dtype != torch.float32 and rows >= 64,
    )


def attention_cases() -> list[dict]:
    cases = {}
    variants = {**ATTENTION_VARIANTS, **ATTENTION_HEAVY}
    for kernel, (kind, data, fp32, floats, odd) in ATTENTION_KERNELS.items():
        for dtype, coverage in DEFAULT_COVERAGE.items():
            for variant, head_dims in coverage.items():
                flags = variants[variant]
                for head_dim in head_dims:
                    block_d = max(16, 1 << (head_dim - 1).bit_length())
                    configs = attention.candidate_configs(kind, block_d, attention_dot_precision(dtype),
                                                          **_prune_flags(flags))
                    every = head_dim in EVERY_CONFIG.get(dtype, {}).get(variant, ())
                    for i, config in enumerate(configs if every else configs[:1]):
                        case = _attention_case(kernel, kind, data, fp32, floats, odd, dtype, head_dim, variant,
                                               flags, config, default=i == 0)
                        cases[case["name"]] = case
    return list(cases.values())


#: the Hopper forward (``forward="tma_ws"``): the flag combinations it supports (it falls back to the default
#: forward for the others), 16-bit at head_dim 64 and 128; every config in the heaviest, padding-gqa
TMA_VARIANTS = ("plain", "gqa", "varlen-gqa", "padding-gqa")
TMA_COVERAGE = {torch.bfloat16: {variant: (64, 128) for variant in TMA_VARIANTS}, torch.float16: {"plain": (128,)}}
TMA_EVERY_CONFIG = {torch.bfloat16: {"padding-gqa": (64, 128)}}
if os.environ.get("LLM2VEC_FAST_SM90_GATE", "") == "full":
    TMA_COVERAGE = {dtype: {variant: (64, 128) for variant in TMA_VARIANTS} for dtype in (torch.bfloat16, torch.float16)}
    TMA_EVERY_CONFIG = TMA_COVERAGE
_TMA_ODD = _ODD[:2] + ("num_heads", "q_row_b", "q_row_h", "q_col_h", "k_row_b", "k_row_h", "k_col_h", "v_row_b",
                       "v_row_h", "v_col_h")


def tma_attention_cases() -> list[dict]:
    """``_attn_fwd_tma_kernel`` wherever ``TMA_COVERAGE`` says: tensor descriptors for Q/K/V, TMA loads and
    ``wgmma`` checked."""
    cases = []
    variants = {**ATTENTION_VARIANTS, **ATTENTION_HEAVY}
    for dtype, coverage in TMA_COVERAGE.items():
        d = _DTYPES[dtype]
        for variant, head_dims in coverage.items():
            flags = {key: value for key, value in variants[variant].items() if key not in ("STORE_LSE", "PHILOX4X")}
            for head_dim in head_dims:
                configs = attention.candidate_configs("fwd_tma", head_dim, "tf32", **_prune_flags(flags))
                every = head_dim in TMA_EVERY_CONFIG.get(dtype, {}).get(variant, ())
                for i, (block_m, block_n, warps, stages) in enumerate(configs if every else configs[:1]):
                    constexprs = dict(flags, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                                      STORE_LSE=variants[variant].get("STORE_LSE", True), DOT_PRECISION="tf32",
                                      WARP_SPECIALIZE=True)
                    cases.append(dict(
                        name=f"_attn_fwd_tma_kernel-{d}-d{head_dim}-{variant}-{block_m}x{block_n}w{warps}s{stages}",
                        kernel=f"{_ATTN}:_attn_fwd_tma_kernel",
                        descs={"desc_q": (d, (block_m, head_dim)), "desc_k": (d, (block_n, head_dim)),
                               "desc_v": (d, (block_n, head_dim))},
                        pointers=dict(O=d, LSE="fp32", KPM="u8", CU_SEQLENS="i32"), floats=["qk_scale"],
                        constexprs=constexprs, ones=["stride_ms"] if flags["HAS_PADDING"] else [], odd=list(_TMA_ODD),
                        num_warps=warps, num_stages=stages, default=i == 0, check_wgmma=True, check_tma=True,
                    ))
    return cases


#: the dK/dV variant ``dkdv="wg64"`` (64 keys per warpgroup, 64 queries): compiled wherever its pruning keeps a
#: config (elsewhere it falls back to the default dK/dV: dropout, head_dim 256, head_dim 96/128 beyond the plain
#: variant; tests/test_attention_kernel.py checks those fallbacks), every config in the heavy padding-gqa. Named
#: ``<variant>+wg64``, apart from the default dK/dV's ``<variant>-`` names.
WG64_COVERAGE = {torch.bfloat16: {variant: HEAD_DIMS for variant in (*ATTENTION_VARIANTS, *ATTENTION_HEAVY)},
                 torch.float16: {"plain": (64, 128), "padding-gqa": (64,)}}
WG64_EVERY_CONFIG = {torch.bfloat16: {"padding-gqa": HEAD_DIMS}}


def wg64_attention_cases() -> list[dict]:
    """``_attn_bwd_dkdv_kernel`` with ``WG64`` in the configs its pruning keeps (``wgmma`` checked: 64-key tiles)."""
    kind, data, fp32, floats, odd = ATTENTION_KERNELS["_attn_bwd_dkdv_kernel"]
    variants = {**ATTENTION_VARIANTS, **ATTENTION_HEAVY}
    cases = []
    for dtype, coverage in WG64_COVERAGE.items():
        for variant, head_dims in coverage.items():
            flags = dict(variants[variant], WG64=True)
            for head_dim in head_dims:
                block_d = max(16, 1 << (head_dim - 1).bit_length())
                configs = attention.candidate_configs("dkdv_wg64", block_d, attention_dot_precision(dtype),
                                                      **_prune_flags(flags))
                every = head_dim in WG64_EVERY_CONFIG.get(dtype, {}).get(variant, ())
                for i, config in enumerate(configs if every else configs[:1]):
                    cases.append(_attention_case("_attn_bwd_dkdv_kernel", kind, data, fp32, floats, odd, dtype,
                                                 head_dim, f"{variant}+wg64", flags, config, default=i == 0))
    return cases


def _prune_flags(flags: dict) -> dict:
    return dict(group=flags["GROUP"], has_dropout=flags["HAS_DROPOUT"], has_padding=flags["HAS_PADDING"],
                is_varlen=flags["IS_VARLEN"],
                banded=any(flags.get(flag, False) for flag in attention.BANDED_FLAGS),
                philox4x=flags.get("PHILOX4X", False))


def _config_case(name, kernel, pointers, floats, constexprs, config, odd=()):
    """A loss-kernel case at its launch config ``(BLOCK_M, BLOCK_N or BLOCK_V, BLOCK_K, warps, stages)``."""
    block_m, block_n, block_k, warps, stages = config
    dtype = next(iter(pointers.values()))
    return dict(name=name, kernel=kernel, pointers=pointers, floats=list(floats), constexprs=constexprs, ones=[],
                odd=list(odd), num_warps=warps, num_stages=stages, default=True,
                check_wgmma=dtype != "fp32" and min(block_m, block_n) >= 64)


def _mntp(kernel, dtype, **flags):
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    block_m, block_v, block_k, warps, stages = config = mntp_loss._block_sizes(cuda, dtype)
    d = _DTYPES[dtype]
    constexprs = dict(HAS_BIAS=False, HAS_SOFTCAP=False, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
                      DOT_PRECISION=mntp_loss._dot_precision(dtype))
    constexprs.update(flags)
    pointers = dict(H_ptr=d, W_ptr=d, B_ptr=d, IDX_ptr="i64", Y_ptr="i64", COUNT_ptr="i32")
    if kernel == "fwd":
        pointers.update(MAX_ptr="fp32", SUMEXP_ptr="fp32", TARGET_ptr="fp32")
        odd = ("n_rows", "VOCAB", "HIDDEN", "tiles_per_split")
    else:
        pointers.update(LSE_ptr="fp32", GRAD_ptr="fp32", DH_ptr="fp32", DW_ptr="fp32", DB_ptr="fp32")
        constexprs = dict(dict(COMPUTE_DH=True, COMPUTE_DW=False, COMPUTE_DB=False), **constexprs)
        odd = ("VOCAB", "HIDDEN")
    flag_names = "-".join(f"{k.lower()}" for k, v in flags.items() if v is True) or "plain"
    return _config_case(f"_mntp_loss_{kernel}_kernel-{d}-{flag_names}",
                        f"llm2vec_fast.kernels.mntp_loss:_mntp_loss_{kernel}_kernel", pointers, ["softcap"],
                        constexprs, config, odd)


def _infonce(kernel, dtype, has_ids=False):
    block_m, block_n, block_k, warps, stages = config = infonce._block_sizes(dtype)
    d = _DTYPES[dtype]
    constexprs = dict(HAS_IDS=has_ids, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      DOT_PRECISION=infonce._dot_precision(dtype))
    pointers = dict(Q=d, DOCS=d, RQ="fp32", RD="fp32", DOC_IDS="i64" if has_ids else "fp32")
    if kernel == "fwd":
        pointers.update(MAX_OUT="fp32", SUM_OUT="fp32", TARGET_OUT="fp32")
        odd = ("n_rows", "n_cols", "dim", "label_offset", "tiles_per_split")
    else:
        pointers.update(LSE="fp32", SLAB=d)
        odd = ("n_rows", "n_cols", "dim", "label_offset")
    return _config_case(f"_infonce_{kernel}_kernel-{d}{'-ids' if has_ids else ''}",
                        f"llm2vec_fast.kernels.infonce:_infonce_{kernel}_kernel", pointers, ["scale"], constexprs,
                        config, odd)


def _infonce_norm(dtype):
    """The inverse-norm kernel at its launch config (16 rows x 256 columns per step; no matmul)."""
    d = _DTYPES[dtype]
    return dict(name=f"_infonce_norm_kernel-{d}", kernel="llm2vec_fast.kernels.infonce:_infonce_norm_kernel",
                pointers=dict(X=d, RN="fp32"), floats=[], constexprs=dict(EPS=1e-12, BLOCK_R=16, BLOCK_D=256),
                ones=[], odd=["n_rows", "dim"], num_warps=4, num_stages=3, default=True, check_wgmma=False)


def _row_softmax(module, dtype, block, warps, **flags):
    """The GEMM variants' row-softmax epilogues (no matmul: compiled for registers and spills only)."""
    d = _DTYPES[dtype]
    if module == "mntp_loss":
        pointers = dict(Z_ptr="fp32", OUT_ptr=d, B_ptr=d, Y_ptr="i64", LSE_ptr="fp32", TARGET_ptr="fp32")
        constexprs = dict(dict(HAS_BIAS=False, HAS_SOFTCAP=False, WRITE_GRAD=True, BLOCK_V=block), **flags)
        floats, odd = ["softcap"], ["VOCAB"]
    else:
        pointers = dict(S="fp32", OUT=d, DOC_IDS="i64", LSE="fp32", TARGET="fp32")
        constexprs = dict(dict(HAS_IDS=True, WRITE_GRAD=True, BLOCK_N=block), **flags)
        floats, odd = [], ["n_cols", "label_offset"]
    kernel = f"_{'mntp' if module == 'mntp_loss' else 'infonce'}_row_softmax_kernel"
    flag_names = "".join(f"-{k.lower()}" for k, v in flags.items() if v is True)
    return dict(name=f"{kernel}-{d}{flag_names}", kernel=f"llm2vec_fast.kernels.{module}:{kernel}", pointers=pointers,
                floats=floats, constexprs=constexprs, ones=[], odd=odd, num_warps=warps, num_stages=3, default=True,
                check_wgmma=False)


def loss_cases() -> list[dict]:
    """The MNTP loss and InfoNCE kernels at the launch configs they use on CUDA."""
    cases = []
    full = os.environ.get("LLM2VEC_FAST_SM90_GATE", "") == "full"
    for dtype in _DTYPES:
        if dtype == torch.float16 and not full:
            continue  # compiles like bf16
        if dtype == torch.float32 and not full:  # FMA matmuls, 10-20 s per compile: the main ones only
            cases += [_mntp("fwd", dtype), _mntp("bwd", dtype, COMPUTE_DW=True), _infonce("bwd", dtype, has_ids=True)]
            continue
        cases += [
            _mntp("fwd", dtype),
            _mntp("fwd", dtype, HAS_BIAS=True, HAS_SOFTCAP=True),
            _mntp("bwd", dtype),  # frozen head: d hidden only
            _mntp("bwd", dtype, COMPUTE_DW=True),  # trained head
            _mntp("bwd", dtype, HAS_BIAS=True, HAS_SOFTCAP=True, COMPUTE_DW=True, COMPUTE_DB=True),
            _infonce("fwd", dtype),
            _infonce("fwd", dtype, has_ids=True),
            _infonce("bwd", dtype, has_ids=True),
        ]
    cases += [_row_softmax("mntp_loss", torch.bfloat16, 2048, 8), _row_softmax("infonce", torch.bfloat16, 2048, 4),
              _row_softmax("mntp_loss", torch.bfloat16, 2048, 8, HAS_BIAS=True, HAS_SOFTCAP=True),
              _infonce_norm(torch.bfloat16)]
    return cases


def all_cases() -> list[dict]:
    return attention_cases() + tma_attention_cases() + wg64_attention_cases() + loss_cases()
