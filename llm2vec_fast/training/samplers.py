"""Batch composition (sentence-transformers' ``BatchSamplers``): every global batch from one dataset."""

from __future__ import annotations

import collections
import logging
import random
from collections import defaultdict
from typing import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)


class OneDatasetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Row indices in batches of ``batch_size`` (per process); every ``world_size`` consecutive batches are the
    per-process slices of one global batch drawn from one dataset.

    Accelerate deals batch ``i`` of a batch sampler to process ``i % world_size``, so at every step the
    processes train on the slices of one global batch, and the loss gathered across them never scores a
    query against another dataset's documents. Each dataset's rows are shuffled and cut into full global
    batches (the remainder left out of the epoch, and logged); then the global batches are shuffled.
    ``set_epoch`` reshuffles, as the Trainer calls it.

    With ``texts`` (per row, the texts it puts in a batch: query, positive, negative), no text appears twice in
    one global batch (sentence-transformers' ``NO_DUPLICATES``): a row whose text is already in the batch being
    filled waits for a later one; ``moved`` counts those waits in the last epoch drawn (logged), and a dataset's
    rows that cannot fill one more batch without a repeat are left out of the epoch."""

    def __init__(self, datasets: Sequence[str], batch_size: int, *, world_size: int = 1, seed: int = 0,
                 texts: Sequence[Sequence[str | None]] | None = None):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        self.batch_size, self.world_size, self.seed, self.epoch = batch_size, world_size, seed, 0
        self.texts = None if texts is None else [frozenset(t for t in row if t is not None) for row in texts]
        if self.texts is not None and len(self.texts) != len(datasets):
            raise ValueError(f"texts has {len(self.texts)} rows, datasets {len(datasets)}")
        self.moved, self._epoch_batches = 0, None
        self.rows: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(datasets):
            self.rows[name].append(index)
        global_size = batch_size * world_size
        full = {name: len(rows) // global_size for name, rows in self.rows.items()}
        for name, rows in sorted(self.rows.items()):
            if not full[name]:
                logger.warning("dataset %r has %d rows, fewer than one global batch of %d: none of its rows are "
                               "used", name, len(rows), global_size)
            elif len(rows) % global_size:
                logger.info("dataset %r: %d batches of %d; the %d remaining rows are left out", name, full[name],
                            global_size, len(rows) % global_size)
        self.global_batches = sum(full.values())
        if not self.global_batches:
            sizes = {name: len(rows) for name, rows in self.rows.items()}
            raise ValueError(f"no dataset fills one batch of {global_size} rows (rows per dataset: {sizes}); "
                             "lower the batch size or add data")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batch_list(self) -> list[list[int]]:
        """This epoch's global batches, in order."""
        if self._epoch_batches is not None and self._epoch_batches[0] == self.epoch:
            return self._epoch_batches[1]
        rng = random.Random(self.seed + self.epoch)
        size = self.batch_size * self.world_size
        batches, self.moved = [], 0
        for name in sorted(self.rows):
            rows = list(self.rows[name])
            rng.shuffle(rows)
            if self.texts is None:
                batches += [rows[start:start + size] for start in range(0, len(rows) - size + 1, size)]
            else:
                batches += self._without_duplicates(rows, size)
        rng.shuffle(batches)
        if not batches:
            raise ValueError(f"no global batch of {size} rows can be made without repeating a text (each dataset "
                             "has too few distinct texts for this batch size): lower the batch size, or turn "
                             "no_duplicates off")
        if self.texts is not None:
            logger.info("epoch %d: %d global batches without a repeated text; %d times a row waited for a later "
                        "batch", self.epoch, len(batches), self.moved)
        self._epoch_batches = (self.epoch, batches)
        return batches

    def _without_duplicates(self, rows: list[int], size: int) -> list[list[int]]:
        """Fill each batch from the rows an earlier batch passed over (oldest first), then from the rest in order,
        skipping a row that repeats a text already in the batch. A batch stops reading once it is full, so an
        epoch costs about one pass over the rows plus the few that wait, not one pass per batch."""
        batches, pending, waiting = [], collections.deque(rows), []
        while len(waiting) + len(pending) >= size:
            batch, seen, still_waiting = [], set(), []

            def offer(index: int) -> None:
                nonlocal seen
                if not self.texts[index] & seen:
                    batch.append(index)
                    seen |= self.texts[index]
                else:
                    self.moved += 1
                    still_waiting.append(index)

            position = 0
            while position < len(waiting) and len(batch) < size:
                offer(waiting[position])
                position += 1
            still_waiting += waiting[position:]
            while pending and len(batch) < size:
                offer(pending.popleft())
            if len(batch) < size:  # the rest cannot fill a batch without repeating a text
                break
            batches.append(batch)
            waiting = still_waiting
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batch_list():
            for rank in range(self.world_size):
                yield batch[rank * self.batch_size:(rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self.global_batch_list()) * self.world_size
