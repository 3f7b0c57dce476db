"""Two CPU processes (torchrun, gloo) with gather_across_ranks give the loss and gradients of one process over
the whole batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from llm2vec_fast.kernels import info_nce_loss

from conftest import run_in_own_session

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from infonce_distributed_worker import (MATRYOSHKA_DIMS, MATRYOSHKA_WEIGHTS, RUNS, global_batch,  # noqa: E402
                                        global_ids)

WORKER = Path(__file__).parent / "helpers" / "infonce_distributed_worker.py"
WORLD, PER_RANK, NEG_PER_RANK, DIM = 2, 5, 3, 64


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("infonce_dist")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               str(WORKER), str(out_dir), str(PER_RANK), str(NEG_PER_RANK), str(DIM)]
    run_in_own_session(command, env=env, timeout=240, what="the two-process run")  # the launcher and both workers
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(masked):
    queries, positives, negatives = (t.clone().requires_grad_() for t in global_batch(WORLD, PER_RANK, NEG_PER_RANK, DIM))
    positive_ids, negative_ids = global_ids(WORLD, PER_RANK, NEG_PER_RANK)
    ids = dict(positive_ids=positive_ids, negative_ids=negative_ids) if masked else {}
    loss = info_nce_loss(queries, positives, negatives, scale=50.0, impl="torch", **ids)
    loss.backward()
    return loss.detach(), queries.grad, positives.grad, negatives.grad


def test_the_masked_run_has_false_negatives_to_mask():
    positive_ids, negative_ids = global_ids(WORLD, PER_RANK, NEG_PER_RANK)
    # Query 0 of rank 0 has duplicates among rank 1's columns: only the gathered ids can mask them.
    other_rank = torch.cat([positive_ids[PER_RANK:], negative_ids[NEG_PER_RANK:]])
    assert (other_rank == positive_ids[0]).any()
    assert _single_process(True)[0] != _single_process(False)[0]


@pytest.mark.slow  # the torchrun run: two new processes
@pytest.mark.parametrize("impl,variant,masked", RUNS, ids=["-".join(map(str, run)) for run in RUNS])
def test_gathered_loss_and_gradients_equal_one_process(rank_results, impl, variant, masked):
    loss, grad_q, grad_p, grad_n = _single_process(masked)
    for rank, result in enumerate(rank_results):
        got = result[(impl, variant, masked)]
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        neg_rows = slice(rank * NEG_PER_RANK, (rank + 1) * NEG_PER_RANK)
        torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["queries"], grad_q[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["positives"], grad_p[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["negatives"], grad_n[neg_rows], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # the torchrun run: two new processes
def test_gathered_matryoshka_loss_equals_one_process(rank_results):
    """InfoNCELoss(matryoshka_dims=...) across 2 ranks: the documents gathered once, truncated per dim, the
    weighted sum global."""
    tensors = [t.clone().requires_grad_() for t in global_batch(WORLD, PER_RANK, NEG_PER_RANK, DIM)]
    loss = sum(w * info_nce_loss(*(t[:, :d] for t in tensors), scale=50.0, impl="torch")
               for d, w in zip(MATRYOSHKA_DIMS, MATRYOSHKA_WEIGHTS))
    grads = torch.autograd.grad(loss, tensors)
    for rank, result in enumerate(rank_results):
        got = result["matryoshka"]
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        neg_rows = slice(rank * NEG_PER_RANK, (rank + 1) * NEG_PER_RANK)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        for name, grad, part in zip(("queries", "positives", "negatives"), grads, (rows, rows, neg_rows)):
            torch.testing.assert_close(got[name], grad[part], rtol=1e-4, atol=1e-6)
        # Gathered once for every dim: the collectives of one plain InfoNCE loss, forward and backward.
        calls = got["collectives"]
        assert calls["matryoshka"] == calls["plain"] and len(calls["plain"]) > 0, calls


@pytest.mark.slow  # the torchrun run: two new processes
def test_ddp_parameter_gradient_is_global_gradient_over_world(rank_results):
    queries, positives, negatives = global_batch(WORLD, PER_RANK, NEG_PER_RANK, DIM)
    torch.manual_seed(0)
    encoder = torch.nn.Linear(DIM, 16)
    info_nce_loss(encoder(queries), encoder(positives), encoder(negatives), scale=50.0, impl="torch").backward()
    for result in rank_results:
        torch.testing.assert_close(result["ddp_weight_grad"] * WORLD, encoder.weight.grad, rtol=1e-4, atol=1e-6)
