"""Export an LLM2Vec encoder as a sentence-transformers model directory that other tools load.

``llm2vec-fast export --model BASE [--adapter A ...] --output DIR`` (or :func:`export_sentence_transformers`
on an :class:`~llm2vec_fast.LLM2Vec`) writes the merged weights (``config.json`` with the bidirectional flags),
the tokenizer, ``llm2vec_config.json``, ``sentence_bert_config.json``, ``modules.json`` (``LLM2VecTransformer``
and ``LLM2VecPooling``), ``1_Pooling/config.json``, ``config_sentence_transformers.json`` (prompts,
requirements, cosine) and the model card; docs/integrations.md lists each file and who reads it.

``SentenceTransformer(DIR, trust_remote_code=True)`` then runs our bidirectional attention and llm2vec's
instruction handling, and gives :meth:`LLM2Vec.encode`'s embeddings; without llm2vec-fast installed it fails at
once with the ``requirements`` message, never a causal model. Servers read the flags in config.json:
``is_causal: false`` (transformers 5, vLLM's pooling runner, TEI's Qwen2) and ``use_bidirectional_attention:
true`` (TEI's Llama, Mistral and Qwen3, transformers' and TEI's Gemma 3).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .bidirectional import unpatched
from .pooling import POOLING_MODES, check_pooling_mode

logger = logging.getLogger(__name__)

# model_type -> whether some loader reads use_bidirectional_attention for it (TEI: llama, mistral, qwen3,
# gemma3; transformers: gemma3_text). is_causal is written for every architecture.
_BIDIRECTIONAL_ATTENTION_TYPES = {"llama", "mistral", "qwen3", "gemma3", "gemma3_text"}

# Our pooling modes in sentence-transformers' Pooling keys, which TEI and vLLM read from 1_Pooling/config.json.
_ST_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "weighted_mean": "pooling_mode_weightedmean_tokens",
    "eos_token": "pooling_mode_lasttoken",
    "last_token": "pooling_mode_lasttoken",
    "bos_token": "pooling_mode_cls_token",
}
_ST_POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                     "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_output_dir(output: str | os.PathLike) -> Path:
    """``output`` must not exist or be an empty directory: an export never overwrites anything."""
    path = Path(output)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"export output {path} exists and is not a directory; give a new directory")
        if any(path.iterdir()):
            raise FileExistsError(f"export output {path} exists and is not empty; give a new or empty directory "
                                  "(nothing was written)")
    return path


def check_can_be_bidirectional(model) -> None:
    """Raise ValueError when ``model``'s architecture cannot run our bidirectional attention."""
    from .bidirectional import is_patched, patch, unpatch

    try:
        if not is_patched(model):
            patch(model)  # the checks of patch(), undone at once: unpatch restores exactly what was there
            unpatch(model)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ValueError(f"cannot export {type(model).__name__} as a bidirectional encoder: {error}") from error


def write_model_files(encoder, output: str | os.PathLike) -> None:
    """The model (merged, unpatched, with the bidirectional flags in config.json), the tokenizer,
    ``llm2vec_config.json`` and ``sentence_bert_config.json`` into ``output`` (which may exist)."""
    from . import transformers_compat as compat

    if hasattr(encoder.model, "merge_and_unload"):  # PEFT-wrapped: merge a copy, the caller's encoder stays as it is
        # Copied unpatched: the patch's record of what it changed does not survive a deep copy.
        with unpatched(encoder.model):
            encoder = copy.deepcopy(encoder)
        encoder.model = encoder.model.merge_and_unload()
        compat.forget_loaded_adapter(encoder.model)
    encoder.save(str(output))
    config_path = Path(output) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["is_causal"] = False  # the flags by which other tools load it bidirectionally
    if config.get("model_type") in _BIDIRECTIONAL_ATTENTION_TYPES:
        config["use_bidirectional_attention"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _write_json(Path(output) / "sentence_bert_config.json", {"max_seq_length": encoder.max_length,
                                                             "do_lower_case": False})


def pooling_config(pooling_mode: str, dimension: int) -> dict[str, Any]:
    """1_Pooling/config.json: sentence-transformers' Pooling keys (read by TEI and vLLM) and our exact mode."""
    check_pooling_mode(pooling_mode)
    # Instructions are left out of pooling, as llm2vec does (sentence-transformers' include_prompt=False).
    return {"word_embedding_dimension": int(dimension),
            **{flag: flag == _ST_POOLING_KEYS[pooling_mode] for flag in _ST_POOLING_FLAGS},
            "include_prompt": False, "llm2vec_pooling_mode": pooling_mode}


def sentence_transformers_config(prompts: dict[str, str]) -> dict[str, Any]:
    versions = {"llm2vec_fast": _package_version("llm2vec-fast") or "0.1.0",
                "transformers": _package_version("transformers"), "pytorch": _package_version("torch")}
    if st_version := _package_version("sentence-transformers"):
        versions["sentence_transformers"] = st_version
    return {"__version__": versions, "model_type": "SentenceTransformer", "prompts": prompts,
            "default_prompt_name": None, "similarity_fn_name": "cosine",
            # Read by sentence-transformers (>= 6) before any module loads: without llm2vec-fast the model fails
            # here with "pip install llm2vec-fast" instead of loading anything causal.
            "requirements": {"llm2vec-fast": {
                "specifier": ">=0.1.0",
                "reason": "its modules run llm2vec-fast's bidirectional attention and LLM2Vec's instruction "
                          "handling; without it the model would be a causal decoder"}}}


def write_sentence_transformers_files(output: str | os.PathLike, *, pooling_mode: str, dimension: int,
                                      prompts: dict[str, str]) -> None:
    """modules.json, 1_Pooling/config.json and config_sentence_transformers.json."""
    output = Path(output)
    _write_json(output / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "llm2vec_fast.sentence_transformers.LLM2VecTransformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "llm2vec_fast.sentence_transformers.LLM2VecPooling"},
    ])
    (output / "1_Pooling").mkdir(exist_ok=True)
    _write_json(output / "1_Pooling" / "config.json", pooling_config(pooling_mode, dimension))
    _write_json(output / "config_sentence_transformers.json", sentence_transformers_config(prompts))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def trained_matryoshka_dims(adapters: list[str] | tuple[str, ...]) -> list[int] | None:
    """The ``matryoshka_dims`` of the last adapter trained with them, as its ``<stage>_settings.json`` records
    them (local adapter folders; None when no adapter says)."""
    for adapter in reversed(adapters):
        for settings in sorted(Path(adapter).glob("*_settings.json")):
            dims = json.loads(settings.read_text(encoding="utf-8")).get("matryoshka_dims")
            if dims:
                return [int(d) for d in dims]
    return None


def _matryoshka_section(dims: list[int] | None) -> str:
    if not dims:
        return ""
    return f"""
## Matryoshka dimensions

Trained with `matryoshka_dims={dims}` (sentence-transformers' `MatryoshkaLoss`): the leading {", ".join(map(str, dims))}
dimensions are each an embedding of their own. Truncate with sentence-transformers' `truncate_dim` (cosine
similarity on the truncated vectors):

```python
model = SentenceTransformer("path/to/this/directory", trust_remote_code=True, truncate_dim={dims[-1]})
embeddings = model.encode(["What is RoPE?"], truncate_dim={dims[-1]})  # or per call
```
"""


def model_card(encoder, *, base_model: str, adapters: list[str], dimension: int,
               matryoshka_dims: list[int] | None = None) -> str:
    """README.md: what the model is, how it was made, how to load it (and truncate it, when Matryoshka-trained)."""
    adapter_lines = "".join(f"  {i + 1}. `{a}`\n" for i, a in enumerate(adapters)) or "  (none: the base weights)\n"
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, llm2vec, llm2vec-fast]
base_model: {base_model}
---

# LLM2Vec encoder exported by llm2vec-fast

A decoder-only LLM turned text encoder the LLM2Vec way (BehnamGhader et al., 2024, arXiv 2404.05961):
bidirectional attention, trained with masked next-token prediction and contrastive stages as LoRA adapters,
which are merged into these weights.

- base model: `{base_model}`
- adapters merged, in order:
{adapter_lines}- pooling: `{encoder.pooling_mode}` over the text's tokens (an instruction's tokens are left out:
  `skip_instruction={encoder.skip_instruction}`); {dimension} dimensions; cosine similarity
- max_length {encoder.max_length} tokens; documents trimmed to doc_max_length {encoder.doc_max_length} tokens
- prompts: LLM2Vec's task instructions by MTEB task name (`prompt_name="SciFact"`), `query` (MS MARCO's
  instruction) and `document` (none): queries get an instruction, retrieval documents none

## Load it

```python
# pip install llm2vec-fast sentence-transformers
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/directory", trust_remote_code=True)
queries = model.encode_query(["What is RoPE?"])            # with the `query` instruction
documents = model.encode_document(["Rotary position embeddings rotate ..."])
scores = model.similarity(queries, documents)
```

`trust_remote_code=True` is sentence-transformers' consent to import the module classes named in
`modules.json` (`llm2vec_fast.sentence_transformers`); they run llm2vec-fast's bidirectional attention kernel
and give exactly `LLM2Vec.encode`'s embeddings. Without llm2vec-fast installed, loading stops with a message
to install it. The same directory loads with `llm2vec_fast.LLM2Vec.from_pretrained(path)` and with llm2vec.

Servers: `config.json` carries `is_causal: false` (and `use_bidirectional_attention: true` where the
architecture's loaders read it), so vLLM and TEI run the attention bidirectionally; they pool an
instruction's tokens too (prompt tokens are not left out), so send instructions only with `last_token`-style
pooling or expect small differences. See llm2vec-fast's docs/integrations.md.
{_matryoshka_section(matryoshka_dims)}"""


def export_sentence_transformers(encoder, output: str | os.PathLike, *, base_model: str | None = None,
                                 adapters: list[str] | tuple[str, ...] = (), prompts: dict[str, str] | None = None,
                                 matryoshka_dims: list[int] | None = None) -> Path:
    """Write ``encoder`` (an :class:`~llm2vec_fast.LLM2Vec`) as a sentence-transformers directory ``output``.

    ``output`` must not exist or be empty (FileExistsError otherwise); everything is written to a temporary
    directory beside it and moved into place at the end, so a failed export leaves nothing behind. A model whose
    architecture cannot run our bidirectional attention raises ValueError. ``prompts`` default to
    :func:`llm2vec_fast.prompts.default_prompts`; ``base_model`` and ``adapters`` are named in the model card, and
    ``matryoshka_dims`` (default: what the adapters' ``<stage>_settings.json`` record) with ``truncate_dim`` usage.
    Returns the output path."""
    from .prompts import default_prompts

    output = check_output_dir(output)
    check_can_be_bidirectional(encoder.model)
    dimension = int(encoder.config.hidden_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    try:
        write_model_files(encoder, staging)
        write_sentence_transformers_files(staging, pooling_mode=encoder.pooling_mode, dimension=dimension,
                                          prompts=default_prompts() if prompts is None else dict(prompts))
        adapters = [str(a) for a in adapters]
        card = model_card(encoder, base_model=base_model or encoder.name_or_path or "unknown", adapters=adapters,
                          dimension=dimension, matryoshka_dims=matryoshka_dims or trained_matryoshka_dims(adapters))
        (staging / "README.md").write_text(card, encoding="utf-8")
        check_output_dir(output)  # still free: nothing appeared there while we wrote
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Exported a sentence-transformers model to %s", output)
    return output


# --- command line ---------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="base model: HF directory, hub name or 'smollm2-135m'")
    parser.add_argument("--adapter", action="append", default=[],
                        help="LoRA adapter merged into the weights; repeat to merge stages in order "
                             "(--adapter mntp --adapter supervised)")
    parser.add_argument("--pooling-mode", default=None, choices=POOLING_MODES,
                        help="default: the last adapter's llm2vec_config.json, else mean")
    parser.add_argument("--max-length", type=int, default=None,
                        help="default: the last adapter's llm2vec_config.json, else 512")
    parser.add_argument("--output", required=True, help="new (or empty) directory for the model")


def main(args) -> int:
    from .encoder import LLM2Vec

    check_output_dir(args.output)  # before loading any weights
    encoder = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=list(args.adapter) or None,
                                      merge_peft=True, pooling_mode=args.pooling_mode, max_length=args.max_length)
    export_sentence_transformers(encoder, args.output, base_model=args.model, adapters=args.adapter)
    return 0
