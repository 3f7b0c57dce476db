"""GradCache: a contrastive step over a batch far larger than fits in memory (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"; luyug/GradCache).

1. Every chunk of every input group is encoded without a graph; the RNG state before each chunk is kept.
2. The loss is computed on the concatenated embeddings, which are leaves: its backward gives the gradient of
   the loss with respect to every embedding, and nothing else.
3. Every chunk is encoded again, with a graph, under its saved RNG state (so dropout, including the dropout
   seed our attention kernel draws from torch's RNG, is the same as in step 1), and back-propagated with its
   slice of the embedding gradient: ``(embeddings * cached_grad).sum().backward()``.

The parameter gradients equal those of one forward and backward over the whole batch encoded chunk by chunk
in one graph, with the same dropout; peak activation memory is that of one chunk. :func:`grad_cache_step` is
the whole step; :class:`~llm2vec_fast.training.losses.CachedInfoNCELoss` runs step 3 from the loss's backward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch.utils.checkpoint import DefaultDeviceType, get_device_states, set_device_states

__all__ = ["RngState", "backward_chunks", "embed_without_graph", "grad_cache_step", "split_into_chunks"]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


class RngState:
    """The CPU RNG state and the states of every accelerator the given tensors live on, captured now, with
    ``torch.utils.checkpoint``'s own helpers (what activation checkpointing replays); ``replay()`` runs a block
    from these states and afterwards puts the RNG back where it was."""

    def __init__(self, *inputs: Any):
        self.device_type = DefaultDeviceType.get_device_type()
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*_tensors(list(inputs)))

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.device_states, device_type=self.device_type)
            yield


def split_into_chunks(inputs: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a dict of tensors with a common first dimension into dicts of at most ``chunk_size`` rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    rows = {t.shape[0] for t in inputs.values()}
    if len(rows) != 1:
        raise ValueError(f"all inputs of a group must have the same number of rows, got {sorted(rows)}")
    (n,) = rows
    return [{k: t[start:start + chunk_size] for k, t in inputs.items()} for start in range(0, n, chunk_size)]


def embed_without_graph(encode: Callable[[Any], torch.Tensor], groups: Sequence[Sequence[Any]]):
    """Step 1: per group, the concatenated embeddings (a leaf that requires grad; ``None`` for an empty group)
    and the RNG state before each of its chunks."""
    if not any(len(chunks) for chunks in groups):
        raise ValueError("grad_cache_step got no input chunks")
    cached, states = [], []
    for chunks in groups:
        group_states, reps = [], []
        for chunk in chunks:
            group_states.append(RngState(chunk))
            with torch.no_grad():
                reps.append(encode(chunk))
        states.append(group_states)
        cached.append(torch.cat(reps).detach().requires_grad_() if reps else None)
    return cached, states


def embedding_grads(loss: torch.Tensor, cached: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Step 2: the loss's gradient with respect to each group's embeddings (``None`` where it has none)."""
    leaves = [reps for reps in cached if reps is not None]
    grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
    return [None if reps is None else next(grads) for reps in cached]


def backward_chunks(encode: Callable[[Any], torch.Tensor], groups: Sequence[Sequence[Any]],
                    states: Sequence[Sequence[RngState]], grads: Sequence[torch.Tensor | None], *,
                    backward: Callable[[torch.Tensor], None] | None = None,
                    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                    replay_rng: bool = True) -> None:
    """Step 3: every chunk again, with a graph and its saved randomness, back-propagated with its rows of the
    embedding gradient. ``no_sync`` (DDP's ``model.no_sync``) is held for every chunk but the last, so that
    gradients are reduced once."""
    backward = backward or (lambda tensor: tensor.backward())
    work = [(chunk, state, grad, start == 0) for chunks, group_states, grad in zip(groups, states, grads)
            for start, (chunk, state) in enumerate(zip(chunks, group_states))]
    offset = 0
    for index, (chunk, state, grad, first) in enumerate(work):
        offset = 0 if first else offset
        sync = contextlib.nullcontext() if (index == len(work) - 1 or no_sync is None) else no_sync()
        with sync:
            with state.replay() if replay_rng else contextlib.nullcontext():
                reps = encode(chunk)
            rows = torch.zeros_like(reps) if grad is None else grad[offset:offset + reps.shape[0]]
            if reps.shape != rows.shape:
                raise RuntimeError(f"encode gave {tuple(reps.shape)} on the second pass but {tuple(rows.shape)} on "
                                   "the first: it must be deterministic in its input shapes")
            backward((reps * rows.to(reps.dtype)).sum())
        offset += reps.shape[0]


def grad_cache_step(encode: Callable[[Any], torch.Tensor], groups: Sequence[Sequence[Any]],
                    loss_fn: Callable[..., torch.Tensor], *, backward: Callable[[torch.Tensor], None] | None = None,
                    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                    replay_rng: bool = True) -> torch.Tensor:
    """Run one GradCache forward/backward and return the loss (detached).

    Args:
        encode: chunk -> embeddings ``(rows, dim)``; called twice per chunk (without, then with a graph).
        groups: per loss argument (e.g. queries, positives, negatives), the list of its chunks; a group may be
            an empty list, in which case ``loss_fn`` receives ``None`` for it.
        loss_fn: ``loss_fn(*embeddings)`` -> scalar loss, each argument the group's embeddings ``(rows, dim)``.
        backward: how to back-propagate a chunk's surrogate (default ``tensor.backward()``).
        no_sync: a context factory that suspends the DDP gradient all-reduce (``model.no_sync``).
        replay_rng: restore each chunk's RNG state before the second forward (turn off only to show why it is
            needed: without it dropout differs between the two forwards and the gradients are wrong)."""
    cached, states = embed_without_graph(encode, groups)
    loss = loss_fn(*cached)
    backward_chunks(encode, groups, states, embedding_grads(loss, cached), backward=backward, no_sync=no_sync,
                    replay_rng=replay_rng)
    return loss.detach()
