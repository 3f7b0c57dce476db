"""Named prompts (instructions) in sentence-transformers' sense, taken from LLM2Vec's task instructions.

LLM2Vec gives a query its task's instruction and a retrieval document none; the instruction is joined to the
text (``instruction + " " + text``) and left out of pooling. The table maps every MTEB task name of llm2vec's
``task_to_instructions.json`` to its instruction, formatted the llm2vec way (ending in ``:``), plus the two
names sentence-transformers' ``encode_query`` / ``encode_document`` look for: ``query`` (the web-search
instruction of MS MARCO, the retrieval task LLM2Vec's supervised stage trains on) and ``document`` (none).

Each prompt ends with a space: servers that prepend a prompt to the text as it is (TEI, vLLM) then see
llm2vec's joined string ``"instruction: text"``; our encoder strips it before joining, so it changes nothing
there.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

QUERY_PROMPT_NAME = "query"
DOCUMENT_PROMPT_NAME = "document"
_QUERY_TASK = "MSMARCO"


def format_instruction(instruction: str) -> str:
    """llm2vec's formatting: an instruction ends with ``:`` (a trailing ``.`` is replaced)."""
    instruction = instruction.strip()
    if instruction and not instruction.endswith(":"):
        instruction = instruction.rstrip(".") + ":"
    return instruction


@functools.lru_cache(maxsize=1)
def _instruction_table() -> tuple[tuple[str, str], ...]:  # read once; a tuple, so that no caller can change it
    text = resources.files("llm2vec_fast.resources").joinpath("task_to_instructions.json").read_text(encoding="utf-8")
    return tuple(json.loads(text)["instructions"].items())


def task_instructions() -> dict[str, str]:
    """LLM2Vec's instruction for each MTEB task name, as its table writes it (a fresh dict on every call)."""
    return dict(_instruction_table())


def default_prompts() -> dict[str, str]:
    """Prompt name -> instruction (a fresh dict on every call): LLM2Vec's task instructions, ``query``, ``document``."""
    table = {name: format_instruction(value) + " " for name, value in _instruction_table()}
    return {**table, QUERY_PROMPT_NAME: table[_QUERY_TASK], DOCUMENT_PROMPT_NAME: ""}


def resolve_prompt(prompts: dict[str, str], prompt: str | None, prompt_name: str | None) -> str:
    """The instruction to use: ``prompt`` if given, else ``prompts[prompt_name]``, else none (``""``).

    Raises ValueError for a ``prompt_name`` that is not in ``prompts``, and TypeError for a non-string prompt."""
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        return prompt
    if prompt_name is None:
        return ""
    if prompt_name not in prompts:
        close = sorted(name for name in prompts if name.lower().startswith(str(prompt_name)[:3].lower()))[:5]
        hint = f"; similar names: {close}" if close else ""
        raise ValueError(f"unknown prompt_name {prompt_name!r}: it is none of the {len(prompts)} prompt names "
                         f"(LLM2Vec's MTEB task names, 'query', 'document'){hint}")
    return prompts[prompt_name]
