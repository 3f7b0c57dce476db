"""One process of a 2-process (gloo, CPU) MNTP run under torch's FSDP2 (``fully_shard`` on every decoder layer
and on the root :class:`MNTPModel`, as accelerate's FSDP2 plugin wraps it): a few SGD steps on one batch, and
the same steps on an unsharded copy in this process. Writes both loss curves.

accelerate enables FSDP only on accelerators (on CPU its FSDP plugin falls back to DDP), so this applies
torch's FSDP2 directly, as accelerate does on GPUs.

Usage (under torchrun): mntp_fsdp_worker.py MODEL_DIR OUT_DIR
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from llm2vec_fast.training.arguments import MNTPArguments, ModelArguments
from llm2vec_fast.training.collators import MNTPDataCollator
from llm2vec_fast.training.mntp import build_mntp_model
from llm2vec_fast.training.modeling import load_tokenizer

model_dir, out_dir = sys.argv[1:3]
dist.init_process_group("gloo")
tokenizer = load_tokenizer(model_dir)
torch.manual_seed(0)
model = build_mntp_model(ModelArguments(model_name_or_path=model_dir, dtype="float32", attention_impl="torch",
                                        lora_r=4, lora_alpha=8, lora_dropout=0.0),
                         MNTPArguments(loss_impl="torch"), tokenizer)
for name, parameter in model.named_parameters():  # LoRA's B starts at zero: make the adapter do something
    if "lora_B" in name:
        torch.nn.init.normal_(parameter, std=0.05)
reference = copy.deepcopy(model)
for layer in model.body.base_model.model.layers:
    fully_shard(layer)
fully_shard(model)  # the root holds the embeddings and the LM head, used inside its forward by the loss
torch.manual_seed(1)
collator = MNTPDataCollator.for_replacement(tokenizer, "default", 0.4, vocab_size=model.loss.vocab_size)
batch = collator([{"input_ids": torch.randint(4, len(tokenizer) - 1, (24,)).tolist()} for _ in range(4)])
curves = {}
for name, net in (("fsdp", model), ("single", reference)):
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    curves[name] = []
    for _ in range(4):
        loss = net(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        curves[name].append(loss.item())
curves["sharded_head"] = type(model.loss.head.weight).__name__
(Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(curves))
dist.destroy_process_group()
