"""One process of a 2-process (gloo) supervised run on a tiny model: logs which rows it trained on per step.

Usage (under torchrun): contrastive_ranks_worker.py MODEL_DIR DATA_FILE OUT_DIR [--name value ...]
"""

import json
import os
import sys
from pathlib import Path

from llm2vec_fast.training.arguments import parse_stage_arguments
from llm2vec_fast.training.collators import ContrastiveCollator
from llm2vec_fast.training.supervised import train_supervised

model_dir, data_file, out_dir = sys.argv[1:4]
seen = []
collate = ContrastiveCollator.__call__


def logged_collate(self, rows):
    seen.append([[row["dataset"], row["query"]] for row in rows])
    return collate(self, rows)


ContrastiveCollator.__call__ = logged_collate
arguments = parse_stage_arguments("supervised", {
    "model_name_or_path": model_dir, "output_dir": str(Path(out_dir) / "adapter"), "train_files": [data_file],
    "instructions": {"a": "Find A", "b": "Find B"}, "per_device_train_batch_size": 3, "chunk_size": None,
    "max_length": 16, "dtype": "float32", "attention_impl": "torch", "loss_impl": "torch", "lora_r": 2,
    "lora_alpha": 4, "lora_dropout": 0.0, "max_steps": 3, "learning_rate": 1e-3, "warmup_steps": 0,
    "logging_steps": 1, "save_steps": 100, "use_cpu": True,
}, sys.argv[4:])
run = train_supervised(*arguments)
rank = int(os.environ["RANK"])
# The first call is the collator's probe before training; the next 3 are the training steps (the loader may
# have fetched one more batch ahead).
(Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(seen[1:4]))
