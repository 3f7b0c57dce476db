"""One rank of a program that calls ``encode_corpus`` inside its own process group and goes on after an error
(a notebook, a service): the case where a failed rank's process stays alive.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/helpers/corpus_rank.py MODEL SOURCE OUTPUT DONE

Prints ``<rank> <ExceptionName>: <message>`` or ``<rank> ok``; rank 1 then stays alive until DONE exists (or
for 300 s), so that a rank 0 waiting for it waits until it is told or the group's timeout.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from llm2vec_fast.corpus import CorpusSettings, encode_corpus

model, source, output, done = sys.argv[1:5]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
try:
    encode_corpus(source, output, CorpusSettings(model=model, batch_size=4, shard_size=10, attention_impl="torch"))
    print(rank, "ok", flush=True)
except Exception as error:  # noqa: BLE001 - the program reports and goes on
    print(rank, f"{type(error).__name__}: {error}", flush=True)
if rank == 1:
    deadline = time.monotonic() + 300
    while not Path(done).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
