"""GradCache: a contrastive step over a batch far larger than fits in memory (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"; luyug/GradCache).

1. Every chunk of every input group is encoded without a graph; the RNG state before each chunk is kept.
2. The loss is computed on the concatenated embeddings, which are leaves: its backward gives the gradient of
   the loss with respect to every embedding, and nothing else.
3. Every chunk is encoded again, with a graph, under its saved RNG state (so dropout, including the dropout
   seed our attention kernel draws from torch's RNG, is the same as in step 1), and back-propagated with its
   slice of the embedding gradient: ``(embeddings * cached_grad).sum().backward()``.

The parameter gradients equal those of one forward and backward over the whole batch encoded chunk by chunk
in one graph, with the same dropout; peak activation memory is that of one chunk.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

__all__ = ["RngState", "grad_cache_step", "split_into_chunks"]


class RngState:
    """Torch's CPU RNG state and the states of the CUDA devices in use, captured now; ``replay()`` runs a block
    from these states and afterwards puts the RNG back where it was."""

    def __init__(self, cuda_devices: Sequence[int] | None = None):
        self.cuda_devices = list(cuda_devices) if cuda_devices is not None else _cuda_devices_in_use()
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(device) for device in self.cuda_devices]

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu_state)
            for device, state in zip(self.cuda_devices, self.cuda_states):
                torch.cuda.set_rng_state(state, device)
            yield


def _cuda_devices_in_use() -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [torch.cuda.current_device()]


def split_into_chunks(inputs: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a dict of tensors with a common first dimension into dicts of at most ``chunk_size`` rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    rows = {t.shape[0] for t in inputs.values()}
    if len(rows) != 1:
        raise ValueError(f"all inputs of a group must have the same number of rows, got {sorted(rows)}")
    (n,) = rows
    return [{k: t[start:start + chunk_size] for k, t in inputs.items()} for start in range(0, n, chunk_size)]


def grad_cache_step(
    encode: Callable[[Any], torch.Tensor],
    groups: Sequence[Sequence[Any]],
    loss_fn: Callable[..., torch.Tensor],
    *,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    replay_rng: bool = True,
) -> torch.Tensor:
    """Run one GradCache forward/backward and return the loss (detached).

    Args:
        encode: chunk -> embeddings ``(rows, dim)``; called twice per chunk (without, then with a graph).
        groups: per loss argument (e.g. queries, positives, negatives), the list of its chunks; a group may be
            an empty list, in which case ``loss_fn`` receives ``None`` for it.
        loss_fn: ``loss_fn(*embeddings)`` -> scalar loss, each argument the group's embeddings ``(rows, dim)``.
        backward: how to back-propagate a chunk's surrogate (default ``tensor.backward()``; a Trainer passes
            ``accelerator.backward`` so that loss scaling and DeepSpeed hooks apply).
        no_sync: a context factory that suspends the DDP gradient all-reduce (``model.no_sync``); used for every
            chunk but the last so that gradients are reduced once.
        replay_rng: restore each chunk's RNG state before the second forward (turn off only to show why it is
            needed: without it dropout differs between the two forwards and the gradients are wrong).
    """
    backward = backward or (lambda tensor: tensor.backward())
    if not any(len(chunks) for chunks in groups):
        raise ValueError("grad_cache_step got no input chunks")

    # 1. Embeddings without a graph, remembering the RNG state of each chunk.
    states: list[list[RngState]] = []
    cached: list[torch.Tensor | None] = []
    sizes: list[list[int]] = []  # embeddings per chunk, to cut the embedding gradient the same way
    for chunks in groups:
        group_states, group_reps = [], []
        for chunk in chunks:
            group_states.append(RngState())
            with torch.no_grad():
                group_reps.append(encode(chunk))
        states.append(group_states)
        cached.append(torch.cat(group_reps).detach().requires_grad_() if group_reps else None)
        sizes.append([reps.shape[0] for reps in group_reps])

    # 2. The loss and its gradient with respect to the embeddings only.
    loss = loss_fn(*cached)
    leaves = [reps for reps in cached if reps is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads_iter = iter(grads)
    reps_grads = [None if reps is None else next(grads_iter) for reps in cached]

    # 3. Each chunk again, with a graph and the same randomness, back-propagated with its embedding gradient.
    work = [(chunk, state, grad_rows)
            for chunks, group_states, grad, group_sizes in zip(groups, states, reps_grads, sizes)
            for chunk, state, grad_rows in zip(chunks, group_states, _split_like(grad, group_sizes))]
    for index, (chunk, state, grad_rows) in enumerate(work):
        last = index == len(work) - 1
        sync = contextlib.nullcontext() if (last or no_sync is None) else no_sync()
        rng = state.replay() if replay_rng else contextlib.nullcontext()
        with sync:
            with rng:
                reps = encode(chunk)
            if grad_rows is None:  # the loss does not depend on this group
                grad_rows = torch.zeros_like(reps)
            if reps.shape != grad_rows.shape:
                raise RuntimeError(f"encode gave {tuple(reps.shape)} on the second pass but {tuple(grad_rows.shape)} "
                                   "on the first: it must be deterministic in its input shapes")
            backward((reps * grad_rows.to(reps.dtype)).sum())
    return loss.detach()


def _split_like(grad: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    """The embedding gradient cut into the chunks' embedding counts."""
    if grad is None:
        return [None] * len(sizes)
    return list(torch.split(grad, sizes))
