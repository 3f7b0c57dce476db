"""Encoding on several devices (or CPU processes) at once, as sentence-transformers' ``start_multi_process_pool``.

``pool = encoder.start_multi_process_pool(["cuda:0", "cuda:1"])`` starts one spawned process per device, each
holding a copy of the encoder; ``encoder.encode(texts, pool=pool)`` (or ``encode(texts, device=[...])``, which
starts and stops a pool around one call) cuts the inputs into chunks that the processes take from one queue,
and puts the results back in input order. Normalization, ``truncate_dim`` and ``precision`` are applied by the
caller on the gathered embeddings, so that int8 ranges are calibrated over all of them.

The encoder is sent unpatched (the patch's state does not survive pickling) and each process patches its copy
again with the same attention implementation.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import traceback
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

_POLL_SECONDS = 1.0


def default_devices() -> list[str]:
    """Every CUDA device, else 2 CPU processes."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu", "cpu"]


def start_multi_process_pool(encoder, devices: Sequence[str | torch.device] | None = None) -> dict[str, Any]:
    """Start one process per entry of ``devices`` (default :func:`default_devices`); returns the pool
    ``{"input": queue, "output": queue, "processes": [...]}`` that ``encode(..., pool=pool)`` uses. Stop it with
    :func:`stop_multi_process_pool`."""
    from .bidirectional import patch_settings, unpatched

    devices = default_devices() if devices is None else [str(d) for d in devices]
    if not devices:
        raise ValueError("start_multi_process_pool needs at least one device, got an empty list")
    for device in devices:
        torch.device(device)  # a bad device name fails here, not in a child process
    cpu_workers = sum(torch.device(d).type == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    context = torch.multiprocessing.get_context("spawn")
    inputs, outputs = context.Queue(), context.Queue()
    processes = []
    # Spawned processes pickle their arguments in start(): the encoder goes out unpatched, is patched again here
    # on leaving the block, and each process patches its own copy.
    settings = patch_settings(encoder.model)
    with unpatched(encoder.model):
        for device in devices:
            process = context.Process(target=_worker, args=(device, encoder, settings, threads, inputs, outputs),
                                      daemon=True)
            process.start()
            processes.append(process)
    logger.info("Started %d encoding processes on %s", len(processes), ", ".join(devices))
    return {"input": inputs, "output": outputs, "processes": processes}


def stop_multi_process_pool(pool: dict[str, Any]) -> None:
    """Ask every process of ``pool`` to finish, wait for it, and close the queues."""
    for _ in pool["processes"]:
        pool["input"].put(None)
    for process in pool["processes"]:
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
    pool["input"].close()
    pool["output"].close()


def _worker(device: str, encoder, settings: dict | None, threads: int, inputs, outputs) -> None:
    if settings is not None:
        from .bidirectional import patch

        patch(encoder.model, **settings)
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    encoder.model.to(device)
    while True:
        task = inputs.get()
        if task is None:
            return
        chunk, pairs, kwargs = task
        try:
            embeddings = encoder.encode(pairs, device=device, convert_to_tensor=True, **kwargs)
            outputs.put((chunk, embeddings, None))
        except Exception:  # the caller raises it, with this traceback
            outputs.put((chunk, None, traceback.format_exc()))


def encode_multi_process(pairs: list[tuple[str, str]], pool: dict[str, Any], *, chunk_size: int | None = None,
                         **encode_kwargs: Any):
    """``[instruction, text]`` pairs through the processes of ``pool``: a ``(n, dim)`` float32 CPU tensor in input
    order (a list of per-text tensors for ``output_value="token_embeddings"``). ``encode_kwargs`` go to each
    process's ``LLM2Vec.encode`` (batch_size, output_value, max_batch_tokens, packed)."""
    processes = pool["processes"]
    if chunk_size is None:
        chunk_size = min(5000, max(1, math.ceil(len(pairs) / (10 * len(processes)))))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunks = [pairs[start:start + chunk_size] for start in range(0, len(pairs), chunk_size)]
    for index, chunk in enumerate(chunks):
        pool["input"].put((index, [list(pair) for pair in chunk], encode_kwargs))
    results: dict[int, Any] = {}
    while len(results) < len(chunks):
        try:
            index, embeddings, error = pool["output"].get(timeout=_POLL_SECONDS)
        except queue.Empty:
            dead = [p for p in processes if not p.is_alive()]
            if dead:
                raise RuntimeError(f"{len(dead)} encoding process(es) died (exit codes "
                                   f"{[p.exitcode for p in dead]}); stop the pool and start a new one") from None
            continue
        if error is not None:
            raise RuntimeError(f"encoding chunk {index} failed in a pool process:\n{error}")
        results[index] = embeddings
    ordered = [results[i] for i in range(len(chunks))]
    if encode_kwargs.get("output_value") == "token_embeddings":
        return [e for chunk in ordered for e in chunk]
    return torch.cat([e.reshape(-1, e.shape[-1]) for e in ordered])
