"""Regenerate tests/fixtures/llm2vec_reference.npz: embeddings by llm2vec 0.2.3 itself, on SmolLM2-135M, fp32 CPU.

llm2vec 0.2.3 needs transformers <= 4.44.2, so this runs in a venv of its own, never in the project's:

    python -m venv .venv-llm2vec
    .venv-llm2vec/bin/pip install torch==2.13.0 "transformers==4.44.2" llm2vec==0.2.3 "peft<0.13"
    .venv-llm2vec/bin/python scripts/make_llm2vec_reference.py \
        --model ~/.cache/llm2vec_fast/smollm2-135m-instruct --output tests/fixtures/llm2vec_reference.npz

The converted SmolLM2 directory (``llm2vec_fast.builtin_models.smollm2_135m_path()``, written by transformers 5)
is copied and adapted for transformers 4.44: BPE merges written as "a b" strings, tokenizer_class
PreTrainedTokenizerFast with model_input_names, rope_theta at the top level of config.json.

For every [instruction, text] pair the fixture also records whether llm2vec's own instruction mask is right:
llm2vec marks the last ``len(tokenize(text alone))`` tokens as the text, which is wrong when the text
tokenizes differently after the instruction (llm2vec issue #80); llm2vec-fast takes the boundary from character
offsets of one tokenization, so only the rows where llm2vec is right can be compared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

PLAIN_TEXTS = [
    "A man with a hard hat is dancing.",
    "A young child is riding a horse.",
    "The cat sat on the mat.",
    "Buddhism (religion/philosophy)",  # llm2vec issue #80
    "alleged",  # llm2vec issue #105
    "ALLEGED is related to crime",
    "Alleged is related to crime",
    "0-dimensional biomaterials lack inductive properties.",
    "1 in 5 million in UK have abnormal PrP positivity.",
    "Café naïve résumé — déjà vu, São Paulo and Zürich.",
    "I love pizza 🍕🍕 and emojis 😀!!",
    "東京は日本の首都です。",
    "  leading and trailing spaces  ",
    "line one\nline two\ttabbed",
    "x",
    "What is the capital of France?",
    "def f(x): return x ** 2  # code-like text",
    "Numbers 3.14159, 2,718 and 1e-9; symbols <>&%$#@!",
    "It's a well-known fact that the Earth isn't flat: it's (roughly) a sphere.",
    "The quick brown fox jumps over the lazy dog. " * 12,
]
PAIRS = [
    ["Given a web search query, retrieve relevant passages that answer the query:", "What is the capital of France?"],
    ["Retrieve Wikipedia passages that answer the question", "Buddhism (religion/philosophy)"],
    ["Retrieve semantically similar text.", "A man with a hard hat is dancing."],
    ["Classify the intent of the banking query", "alleged"],
    ["Given a claim, find documents that refute the claim", "1 in 5 million in UK have abnormal PrP positivity."],
    ["Retrieve semantically similar text:", "  leading and trailing spaces  "],
    ["Represent the sentence", "Café naïve résumé — déjà vu"],
    ["Find the answer", "東京は日本の首都です。"],
    ["Retrieve duplicate questions", "It's a well-known fact that the Earth isn't flat."],
    ["Summarize", "The quick brown fox jumps over the lazy dog. " * 12],
]
CONFIGS = {
    "mean": dict(pooling_mode="mean"),
    "weighted_mean": dict(pooling_mode="weighted_mean"),
    # Small limits exercise doc_max_length word trimming.
    "mean_doc24": dict(pooling_mode="mean", doc_max_length=24, max_length=64),
}


def convert_for_transformers_444(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    tokenizer = json.loads((target / "tokenizer.json").read_text(encoding="utf-8"))
    merges = tokenizer["model"].get("merges", [])
    tokenizer["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (target / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    tok_config = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]
    tok_config.pop("backend", None)
    (target / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if "torch_dtype" not in config and "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    (target / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def llm2vec_mask_is_right(tokenizer, instruction: str, text: str, max_length: int) -> bool:
    """Whether llm2vec's "last len(text alone) tokens" equals the text's tokens by character offsets."""
    joined = f"{instruction.strip()} {text}" if instruction else text
    boundary = len(instruction.strip()) + 1 if instruction else 0
    enc = tokenizer(joined, truncation=True, max_length=max_length, return_offsets_mapping=True)
    by_offsets = sum(1 for start, end in enc["offset_mapping"] if end > boundary or (start == end and start >= boundary))
    alone = len(tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"])
    return by_offsets == alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="converted SmolLM2-135M-Instruct directory")
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import llm2vec
    import torch
    import transformers
    from llm2vec import LLM2Vec

    torch.manual_seed(0)
    arrays: dict[str, np.ndarray] = {
        "plain_texts": np.array(PLAIN_TEXTS),
        "pair_instructions": np.array([p[0] for p in PAIRS]),
        "pair_texts": np.array([p[1] for p in PAIRS]),
    }
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "smollm2-135m-instruct"
        convert_for_transformers_444(Path(args.model).expanduser(), model_dir)
        for name, settings in CONFIGS.items():
            encoder = LLM2Vec.from_pretrained(str(model_dir), torch_dtype=torch.float32, **settings)
            # The #80 crash aborts a whole batch in llm2vec: pairs are encoded one at a time so that the pairs
            # llm2vec handles are all recorded; plain texts go in batches.
            plain = encoder.encode(PLAIN_TEXTS, batch_size=args.batch_size, show_progress_bar=False)
            rows, right = [], []
            for instruction, text in PAIRS:
                ok = llm2vec_mask_is_right(encoder.tokenizer, instruction, text, encoder.max_length)
                try:
                    rows.append(encoder.encode([[instruction, text]], show_progress_bar=False)[0])
                except RuntimeError:  # llm2vec issue #80
                    rows.append(torch.full((plain.shape[1],), float("nan")))
                    ok = False
                right.append(ok)
            arrays[f"{name}_plain"] = plain.float().numpy()
            arrays[f"{name}_pairs"] = torch.stack(rows).float().numpy()
            arrays[f"{name}_pairs_llm2vec_mask_right"] = np.array(right)
            arrays[f"{name}_settings"] = np.array(json.dumps(settings))
    arrays["versions"] = np.array(json.dumps({
        "llm2vec": getattr(llm2vec, "__version__", "0.2.3"), "transformers": transformers.__version__,
        "torch": torch.__version__}))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output, **arrays)
    print(f"wrote {output}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
