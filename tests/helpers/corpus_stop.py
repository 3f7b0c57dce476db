"""``llm2vec-fast`` with a ShardWriter that stops at a chosen point of a shard's write, so that the crash and
kill tests need neither a hook in the library's write path nor luck with timing.

    python tests/helpers/corpus_stop.py MODE N READY_FILE <llm2vec-fast arguments...>

After N complete shards, at shard N:
- ``exit``: the embeddings file is written and renamed, the record (which marks the shard complete) is not;
  the process dies at once (``os._exit(17)``, no clean-up).
- ``pause``: half of the embeddings' bytes are in its temporary file; READY_FILE is created and the process
  sleeps, for the test to SIGKILL it right there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from llm2vec_fast import cli, corpus

MODE, LIMIT, READY = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


class StoppingWriter(corpus.ShardWriter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written = 0

    def write_shard(self, k, array, record, rows):
        if self.written < LIMIT:
            super().write_shard(k, array, record, rows)
            self.written += 1
            return
        if MODE == "exit":
            self.write_embeddings(k, array, record, rows)
            os._exit(17)
        data = self.embeddings_bytes(k, array, record, rows)
        path = self.output / (corpus.shard_names(k, self.format)[0] + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        READY.touch()
        time.sleep(600)
        os._exit(18)  # never reached when the test kills it


corpus.ShardWriter = StoppingWriter
sys.exit(cli.main(sys.argv[4:]))
