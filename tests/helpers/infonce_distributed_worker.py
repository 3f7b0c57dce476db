"""Launched by tests/test_infonce_distributed.py under torchrun (gloo, CPU): every rank takes its shard of one
global batch, runs ``info_nce_loss(..., gather_across_ranks=True)`` (with and without text ids) and the
Matryoshka loss module, and saves its loss and gradients, plus the parameter gradient of a small DDP-wrapped
encoder, to ``OUT_DIR/rank{r}.pt``."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llm2vec_fast.kernels import info_nce_loss  # noqa: E402


def global_batch(world: int, per_rank: int, negatives_per_rank: int, dim: int):
    generator = torch.Generator().manual_seed(1234)
    return (torch.randn(world * per_rank, dim, generator=generator),
            torch.randn(world * per_rank, dim, generator=generator),
            torch.randn(world * negatives_per_rank, dim, generator=generator))


def global_ids(world: int, per_rank: int, negatives_per_rank: int):
    """Text ids with duplicates across ranks: few distinct values, so that a rank's query has false negatives
    among other ranks' positives and negatives."""
    generator = torch.Generator().manual_seed(99)
    return (torch.randint(0, 4, (world * per_rank,), generator=generator),
            torch.randint(0, 4, (world * negatives_per_rank,), generator=generator))


COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "reduce_scatter_tensor",
               "reduce_scatter_single")


def counting_collectives(calls: list):
    """Wraps torch.distributed's collectives so that each call appends its name to ``calls``; returns an undo."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return counted
    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    return lambda: [setattr(dist, name, fn) for name, fn in originals.items()]


MATRYOSHKA_DIMS, MATRYOSHKA_WEIGHTS = (64, 16, 5), (1.0, 0.5, 2.0)
RUNS = [("torch", "auto", False), ("triton", "fused", False), ("torch", "auto", True), ("triton", "fused", True),
        ("triton", "gemm", True)]


def main() -> None:
    out_dir, per_rank, negatives_per_rank, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    queries, positives, negatives = global_batch(world, per_rank, negatives_per_rank, dim)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    neg_rows = slice(rank * negatives_per_rank, (rank + 1) * negatives_per_rank)
    positive_ids, negative_ids = global_ids(world, per_rank, negatives_per_rank)
    result = {}
    for impl, variant, masked in RUNS:
        q = queries[rows].clone().requires_grad_()
        p = positives[rows].clone().requires_grad_()
        n = negatives[neg_rows].clone().requires_grad_()
        ids = dict(positive_ids=positive_ids[rows], negative_ids=negative_ids[neg_rows]) if masked else {}
        loss = info_nce_loss(q, p, n, scale=50.0, gather_across_ranks=True, impl=impl, variant=variant, **ids)
        loss.backward()
        result[(impl, variant, masked)] = {"loss": loss.detach(), "queries": q.grad, "positives": p.grad,
                                           "negatives": n.grad}

    # The Matryoshka loss module gathers each truncation's slices: the value and gradients of the global sum.
    from llm2vec_fast.training.losses import InfoNCELoss

    collectives = {}
    for name, dims in (("plain", None), ("matryoshka", MATRYOSHKA_DIMS)):
        q, p, n = (t[r].clone().requires_grad_() for t, r in ((queries, rows), (positives, rows),
                                                               (negatives, neg_rows)))
        calls = []
        undo = counting_collectives(calls)
        loss = InfoNCELoss(scale=50.0, impl="torch", matryoshka_dims=dims,
                           matryoshka_weights=MATRYOSHKA_WEIGHTS if dims else None).score(q, p, n)
        loss.backward()
        undo()
        collectives[name] = calls
    result["matryoshka"] = {"loss": loss.detach(), "queries": q.grad, "positives": p.grad, "negatives": n.grad,
                            "collectives": collectives}

    # A linear encoder under DDP: the averaged parameter gradient is that of the global loss / world size.
    torch.manual_seed(0)
    encoder = torch.nn.Linear(dim, 16)
    model = torch.nn.parallel.DistributedDataParallel(encoder)
    loss = info_nce_loss(model(queries[rows]), model(positives[rows]), model(negatives[neg_rows]), scale=50.0,
                         gather_across_ranks=True, impl="torch")
    loss.backward()
    result["ddp_weight_grad"] = encoder.weight.grad.clone()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
