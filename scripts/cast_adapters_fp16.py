"""Store a recipe's committed LoRA adapters in float16, checked, and say so in their stage markers.

    python scripts/cast_adapters_fp16.py training/recipes/smollm2_135m/adapters [--data-dir D] [--texts N] [--dry-run]

The adapters were trained and saved in float32 (19.6 MiB each for SmolLM2-135M, r=16 on all linear layers);
half of that travels better (the tracked tree must fit what is copied to a GPU machine). For every stage folder
this script casts ``adapter_model.safetensors`` to float16 in a temporary copy, encodes real sentences with each
stage's chain (the stage on top of the adapters its marker says were merged under it) once from the float32 and
once from the float16 files, and replaces the files only when every embedding has cosine >= 0.9999 to its
float32 twin. ``recipe_stage.json`` keeps what training recorded (its ``made_from`` digests are those of the
float32 adapters the stage was trained on) and gains ``stored_as``: the cast, the float32 and float16 digests and
sizes, and the smallest cosine measured, so that a reader (and tests/test_recipe.py) can follow the chain from
the committed files back to what training used.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llm2vec_fast import LLM2Vec
from llm2vec_fast.builtin_models import smollm2_135m_path
from llm2vec_fast.recipe import STAGE_MARKER, adapter_fingerprint

WEIGHTS = "adapter_model.safetensors"
MIN_COSINE = 0.9999
INSTRUCTION = "Retrieve semantically similar text"


def sentences(data_dir: Path, count: int) -> list[str]:
    path = data_dir / "wiki_sentences" / "wiki_sentences.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = [line.strip() for line, _ in zip(handle, range(count * 3)) if line.strip()]
    return lines[::3][:count]


def chain_of(adapters: Path, stage: str) -> list[str]:
    marker = json.loads((adapters / stage / STAGE_MARKER).read_text(encoding="utf-8"))
    return [Path(p).name for p in marker["settings"]["merge_adapters"]] + [stage]


def embeddings(base: str, folder: Path, chain: list[str], texts: list[str]) -> torch.Tensor:
    encoder = LLM2Vec.from_pretrained(base, [str(folder / s) for s in chain], merge_peft=True, pooling_mode="mean",
                                      max_length=128, attention_impl="torch")
    return encoder.encode([[INSTRUCTION, t] for t in texts], batch_size=16, convert_to_tensor=True,
                          convert_to_numpy=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", type=Path, help="folder of stage folders (mntp/, simcse/, supervised/)")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"),
                        help="the shared data folder, for wiki_sentences (default ../shared/data)")
    parser.add_argument("--texts", type=int, default=64, help="sentences encoded per chain (default 64)")
    parser.add_argument("--dry-run", action="store_true", help="measure, but replace nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    stages = sorted(p.name for p in args.adapters.iterdir() if (p / STAGE_MARKER).is_file())
    for stage in stages:
        tensors = load_file(args.adapters / stage / WEIGHTS)
        if any(t.dtype != torch.float32 for t in tensors.values()):
            sys.exit(f"{stage}: {WEIGHTS} is not all float32; nothing to cast")
    base, texts = smollm2_135m_path(), sentences(args.data_dir, args.texts)
    with tempfile.TemporaryDirectory() as scratch:
        half = Path(scratch)
        for stage in stages:
            shutil.copytree(args.adapters / stage, half / stage)
            tensors = load_file(args.adapters / stage / WEIGHTS)
            save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, half / stage / WEIGHTS,
                      metadata={"format": "pt"})
        lowest = {}
        for stage in stages:
            chain = chain_of(args.adapters, stage)
            full, cast = embeddings(base, args.adapters, chain, texts), embeddings(base, half, chain, texts)
            cosine = torch.nn.functional.cosine_similarity(full.double(), cast.double(), dim=-1)
            lowest[stage] = float(cosine.min())
            print(f"{' + '.join(chain)}: {len(texts)} texts, cosine fp16 vs fp32: min {cosine.min():.9f} "
                  f"(1 - min = {1 - cosine.min():.2e}), mean {cosine.mean():.9f}", flush=True)
        failed = {s: c for s, c in lowest.items() if c < MIN_COSINE}
        if failed:
            sys.exit(f"cosine below {MIN_COSINE} for {failed}: the float32 adapters are kept")
        if args.dry_run:
            return 0
        for stage in stages:
            folder = args.adapters / stage
            marker = json.loads((folder / STAGE_MARKER).read_text(encoding="utf-8"))
            before = {"sha256": adapter_fingerprint(folder), "bytes": (folder / WEIGHTS).stat().st_size}
            shutil.copy(half / stage / WEIGHTS, folder / WEIGHTS)
            marker["stored_as"] = {
                "dtype": "float16",
                "cast": "trained and saved in float32, then cast to float16 by scripts/cast_adapters_fp16.py "
                        "(round to nearest); made_from above holds the float32 digests training used",
                "trained_sha256": before["sha256"], "trained_bytes": before["bytes"],
                "sha256": adapter_fingerprint(folder), "bytes": (folder / WEIGHTS).stat().st_size,
                "check": f"{len(texts)} wiki sentences, chain {' + '.join(chain_of(args.adapters, stage))}: "
                         f"cosine to the float32 embeddings >= {lowest[stage]:.9f}",
            }
            (folder / STAGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            print(f"{stage}: {before['bytes']} -> {marker['stored_as']['bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
