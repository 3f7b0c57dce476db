"""MTEB evaluation of llm2vec-fast encoders, with LLM2Vec's per-task instructions.

``LLM2VecMTEB`` implements mteb 2.x's encoder protocol (``encode(inputs: DataLoader[BatchedInput], *,
task_metadata, hf_split, hf_subset, prompt_type, **kwargs)``) on top of any object with a
sentence-transformers style ``encode(sentences, batch_size=..., ...)`` that accepts ``[instruction, text]``
pairs, normally :class:`llm2vec_fast.LLM2Vec`.

Instructions follow the paper's protocol (llm2vec's ``mteb_eval.py``): queries get the task's instruction,
corpus documents of retrieval tasks get none, and symmetric tasks (STS, classification, clustering, pair
classification) get it on both sides. The strings come from llm2vec's
``test_configs/mteb/task_to_instructions.json`` (copied as data, see ``resources/task_to_instructions.json``);
a task missing there falls back to the prompt in mteb's task metadata, formatted the llm2vec way (trailing
``:``).

``llm2vec-fast eval --model M [--adapter A] --tasks STSBenchmark,SciFact --output DIR`` runs mteb (its result
files land under ``DIR``); ``--offline``, or a task whose data cannot be fetched, runs the local-file version
of the task from :mod:`llm2vec_fast.evaluation` instead.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .kernels._dispatch import IMPLEMENTATIONS
from .pooling import POOLING_MODES
from .dtypes import MODEL_DTYPES
from .prompts import format_instruction, task_instructions

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("llm2vec_fast.mteb needs mteb 2.x: pip install 'llm2vec-fast[eval]'") from error

logger = logging.getLogger(__name__)


def _prompt_type_value(prompt_type: Any) -> str | None:
    if prompt_type is None:
        return None
    return prompt_type.value if isinstance(prompt_type, PromptType) else str(prompt_type)


class LLM2VecMTEB(AbsEncoder):
    """An mteb 2.x encoder over ``encoder.encode`` with LLM2Vec's instructions.

    encoder: anything with ``encode(sentences, batch_size=..., show_progress_bar=..., convert_to_numpy=True)``
        that takes plain strings and ``[instruction, text]`` pairs and returns ``(n, dim)`` embeddings.
    instructions: task name -> instruction; default LLM2Vec's table. ``use_instructions=False`` sends plain
        texts everywhere (the causal/bidirectional baselines of the recipe can be run either way)."""

    def __init__(self, encoder: Any, *, model_name: str = "llm2vec-fast/encoder", revision: str | None = None,
                 instructions: dict[str, str] | None = None, use_instructions: bool = True, batch_size: int = 32,
                 show_progress_bar: bool | None = None) -> None:
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"encoder must have an encode(sentences, ...) method, got {type(encoder).__name__}")
        if "/" not in model_name:
            raise ValueError(f"model_name must look like 'organisation/name' (mteb's convention), got {model_name!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = encoder
        self.instructions = dict(task_instructions() if instructions is None else instructions)
        self.use_instructions, self.batch_size, self.show_progress_bar = use_instructions, batch_size, show_progress_bar
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": model_name, "revision": revision or "local", "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": use_instructions, "framework": ["PyTorch"]})

    def instruction_for(self, task_metadata: Any, prompt_type: Any = None) -> str:
        """The instruction for one side of a task: empty for retrieval documents and without instructions."""
        if not self.use_instructions or _prompt_type_value(prompt_type) == PromptType.document.value:
            return ""
        name = task_metadata.name
        if name in self.instructions:
            return format_instruction(self.instructions[name])
        prompt = task_metadata.prompt
        if isinstance(prompt, dict):
            prompt = prompt.get(_prompt_type_value(prompt_type) or PromptType.query.value, "")
        if not prompt:
            from mteb.abstasks.abstask import get_abstask_prompt

            prompt = get_abstask_prompt(name) or ""
        if prompt:
            logger.info("No LLM2Vec instruction for %s; using mteb's task prompt %r", name, prompt)
        return format_instruction(prompt or "")

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str, prompt_type: Any = None,
               **kwargs: Any) -> np.ndarray:
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"{task_metadata.name}: llm2vec-fast encodes text only; batch has {sorted(batch)}")
            texts.extend(batch["text"])
        instruction = self.instruction_for(task_metadata, prompt_type)
        sentences: list[Any] = [[instruction, text] for text in texts] if instruction else list(texts)
        logger.debug("%s %s/%s %s: %d texts, instruction %r", task_metadata.name, hf_subset, hf_split,
                     _prompt_type_value(prompt_type), len(texts), instruction)
        embeddings = np.asarray(self.model.encode(
            sentences, batch_size=int(kwargs.get("batch_size") or self.batch_size),
            show_progress_bar=kwargs.get("show_progress_bar", self.show_progress_bar), convert_to_numpy=True,
        ), dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise RuntimeError(f"encoder returned shape {embeddings.shape} for {len(texts)} texts")
        return embeddings


# --- loading an encoder -------------------------------------------------------------------------------------
def load_encoder(model: str, *, adapters: list[str] | tuple[str, ...] = (), pooling_mode: str = "mean",
                 max_length: int = 512, dtype: str | None = None, **options: Any):
    """``LLM2Vec.from_pretrained`` (``options``: ``enable_bidirectional``, ``attention_impl``...) with every adapter
    merged in order, as the paper evaluates each stage (MNTP merged, then SimCSE or supervised on top)."""
    from .dtypes import resolve_dtype
    from .encoder import LLM2Vec

    if dtype is not None:
        options["dtype"] = resolve_dtype(dtype)
    return LLM2Vec.from_pretrained(model, peft_model_name_or_path=[str(a) for a in adapters] or None, merge_peft=True,
                                   pooling_mode=pooling_mode, max_length=max_length, **options)


def model_display_name(model: str, adapters: list[str] | tuple[str, ...] = ()) -> str:
    """``llm2vec-fast/<base>[__<adapter>...]``: the name mteb files results under."""
    name = f"llm2vec-fast/{Path(model.rstrip('/')).name or model}"
    for adapter in adapters:
        name += "__" + (Path(str(adapter).rstrip("/")).name or "adapter")
    return name


# --- online evaluation through mteb --------------------------------------------------------------------------
def evaluate_mteb(wrapper: LLM2VecMTEB, task_names: list[str], output: Path, *, batch_size: int = 32,
                  overwrite: bool = False) -> tuple[dict[str, float], list[str]]:
    """Run mteb on ``task_names``; returns (task -> main score, tasks whose data could not be loaded).

    Result files are written by mteb's ``ResultCache`` under ``output``."""
    import mteb

    scores: dict[str, float] = {}
    unavailable: list[str] = []
    cache = mteb.ResultCache(cache_path=output)
    for name in task_names:
        task = mteb.get_task(name)
        try:
            task.load_data()
        except OSError as error:  # ConnectionError, offline mode, missing files: use the local copy instead
            logger.warning("Could not load %s from the hub (%s: %s)", name, type(error).__name__, error)
            unavailable.append(name)
            continue
        result = mteb.evaluate(wrapper, task, cache=cache, encode_kwargs={"batch_size": batch_size},
                               overwrite_strategy="always" if overwrite else "only-missing")
        for task_result in result.task_results:
            scores[task_result.task_name] = float(task_result.get_score())
    return scores, unavailable


# --- command line ---------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="base model: HF directory, hub name or 'smollm2-135m'")
    parser.add_argument("--adapter", action="append", default=[],
                        help="LoRA adapter directory merged into the model; repeat to merge stages in order "
                             "(--adapter mntp --adapter simcse)")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated MTEB task names, e.g. STSBenchmark,SICK-R,Banking77Classification; "
                             "offline, 'Task:split' picks a local split (SICK-R:train)")
    parser.add_argument("--output", required=True, help="folder for the result files")
    parser.add_argument("--offline", action="store_true",
                        help="evaluate on local files only (see llm2vec_fast.evaluation.OFFLINE_TASKS)")
    parser.add_argument("--data-dir", default=os.environ.get("LLM2VEC_FAST_SHARED_DATA"),
                        help="folder of the local data for --offline (default $LLM2VEC_FAST_SHARED_DATA)")
    parser.add_argument("--limit", type=int, default=None,
                        help="offline: evaluate on a fixed random sample of at most this many rows/queries")
    parser.add_argument("--pooling-mode", default="mean", choices=POOLING_MODES)
    parser.add_argument("--causal", action="store_true", help="keep the causal attention (no bidirectional patch)")
    parser.add_argument("--no-instructions", action="store_true", help="encode every text without instruction")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default=None, choices=MODEL_DTYPES, help="compute dtype (default: the encoder's)")
    parser.add_argument("--attention-impl", default="auto", choices=IMPLEMENTATIONS)
    parser.add_argument("--overwrite", action="store_true", help="rerun tasks that already have results")


def main(args) -> int:
    from . import evaluation

    task_names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not task_names:
        raise ValueError("--tasks is empty; give comma-separated MTEB task names")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.offline:
        for name in task_names:
            evaluation.parse_offline_task(name)  # fail on a bad name before loading the model
    if args.limit is not None and not args.offline:
        logger.warning("--limit applies to offline tasks only")

    encoder = load_encoder(args.model, adapters=args.adapter, pooling_mode=args.pooling_mode,
                           enable_bidirectional=not args.causal, max_length=args.max_length, dtype=args.dtype,
                           attention_impl=args.attention_impl)
    wrapper = LLM2VecMTEB(encoder, model_name=model_display_name(args.model, args.adapter),
                          use_instructions=not args.no_instructions, batch_size=args.batch_size)
    started = time.monotonic()
    scores: dict[str, float] = {}
    offline_names = list(task_names)
    if not args.offline:
        scores, offline_names = evaluate_mteb(wrapper, task_names, output, batch_size=args.batch_size,
                                              overwrite=args.overwrite)
        if offline_names:
            logger.warning("Falling back to local files for %s", ", ".join(offline_names))
    if offline_names:
        if not args.data_dir:
            raise ValueError(f"tasks {offline_names} need local data: pass --data-dir or set LLM2VEC_FAST_SHARED_DATA")
        offline = evaluation.evaluate_offline(wrapper, offline_names, data_dir=args.data_dir, limit=args.limit,
                                              output_dir=output / "offline", batch_size=args.batch_size)
        scores.update({name: result["main_score"] for name, result in offline.items()})
    summary = {"model": args.model, "adapters": args.adapter, "pooling_mode": args.pooling_mode,
               "bidirectional": not args.causal, "instructions": not args.no_instructions,
               "offline_tasks": offline_names, "scores": scores, "seconds": round(time.monotonic() - started, 1)}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for name, score in scores.items():
        logger.info("%s: %.4f", name, score)
    return 0
