"""One process of a 2-process (gloo) supervised run on a tiny model: logs which rows it trained on per step.

Usage (under torchrun): contrastive_ranks_worker.py MODEL_DIR DATA_FILE OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import llm2vec_fast.training.contrastive as contrastive
from llm2vec_fast.training.supervised import settings_from_config, train_supervised

model_dir, data_file, out_dir = sys.argv[1:4]
seen = []
collate = contrastive.ContrastiveCollator.__call__


def logged_collate(self, items):
    seen.append([[example.dataset, example.query] for batch in items for example in batch])
    return collate(self, items)


contrastive.ContrastiveCollator.__call__ = logged_collate
settings = settings_from_config({
    "model_name_or_path": model_dir, "output_dir": str(Path(out_dir) / "adapter"),
    "data": {"train_files": [data_file]}, "instructions": {"a": "Find A", "b": "Find B"},
    "batch_size": 3, "chunk_size": None, "max_length": 16, "dtype": "float32", "attention_impl": "torch",
    "loss_impl": "torch", "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
    "training": {"max_steps": 3, "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1, "save_steps": 100,
                 "use_cpu": True},
})
train_supervised(settings)
rank = int(os.environ["RANK"])
# The first call is the collator's probe before training; the next 3 are the training steps (the loader may
# have fetched one more batch ahead).
(Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(seen[1:4]))
