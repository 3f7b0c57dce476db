#!/bin/bash
# Investigation: the supervised stage with 60 instead of 25 steps, same everything else; then the same evaluation.
# Run after `llm2vec-fast recipe smollm2-135m --output $OUT` (needs its mntp and simcse adapters).
set -e
cd "$(dirname "$0")/../../.."
export OUT DATA
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/smollm2}
DATA=${DATA:-../shared/data}
python -m llm2vec_fast.cli train supervised --config training/supervised/smollm2_135m.json \
  --set model_name_or_path=smollm2-135m --set output_dir=$OUT/supervised60 \
  --set "merge_adapters=[\"$OUT/mntp\", \"$OUT/simcse\"]" --set seed=42 \
  --set "data.train_files=[\"$DATA/snli/nli_triplets.csv\"]" --set attention_impl=torch --set loss_impl=torch \
  --set dtype=float32 --set gradient_checkpointing=false --set max_length=48 --set batch_size=16 --set chunk_size=null \
  --set training.max_steps=60 --set training.learning_rate=2e-4 --set training.warmup_steps=3 \
  --set training.logging_steps=5 --set training.save_steps=1000
python - <<'PY'
import logging, os, torch
from pathlib import Path
logging.basicConfig(level="INFO")
torch.set_num_threads(1)
from llm2vec_fast.recipe import load_recipe, evaluate_variant
r = load_recipe(Path("training/recipes/smollm2_135m/recipe.json"))
v = {"name": "supervised60", "label": "+ MNTP + SimCSE + supervised (60 steps)", "bidirectional": True,
     "stages": ["mntp", "simcse", "supervised60"]}
res = evaluate_variant(r, v, Path(os.environ.get("OUT", "runs/smollm2")), Path(os.environ.get("DATA", "../shared/data")))
print({k: round(100 * x["main_score"], 1) for k, x in res.items()})
PY
