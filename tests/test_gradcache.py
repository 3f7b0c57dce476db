"""GradCache: chunked steps give the gradients of the whole batch, with dropout replayed."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from llm2vec_fast import patch
from llm2vec_fast.kernels import info_nce_loss
from llm2vec_fast.pooling import pool
from llm2vec_fast.training.gradcache import RngState, grad_cache_step, split_into_chunks

BATCH, SEQ, CHUNK = 6, 11, 4



pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dropout: float):
    model = build_tiny_model("llama")
    patch(model, attention_impl="torch", attention_dropout=dropout)
    return model.train()


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 123, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for row, length in enumerate([11, 7, 9, 4, 11, 6]):
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _encode(model):
    def encode(chunk):
        hidden = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]).last_hidden_state
        return pool(hidden, chunk["attention_mask"], "mean")
    return encode


def _loss(queries, positives, negatives=None):
    return info_nce_loss(queries, positives, negatives, scale=20.0, impl="torch")


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _reference_step(model, groups, seed):
    """The whole batch in one graph, each chunk encoded in the same order (so the same dropout draws)."""
    torch.manual_seed(seed)
    encode = _encode(model)
    reps = [torch.cat([encode(chunk) for chunk in chunks]) for chunks in groups]
    loss = _loss(*reps)
    loss.backward()
    return loss.detach(), _grads(model)


def _grad_cache(model, groups, seed, **kwargs):
    torch.manual_seed(seed)
    loss = grad_cache_step(_encode(model), groups, _loss, **kwargs)
    return loss, _grads(model)


def _groups(simcse: bool):
    queries = _batch(1)
    positives = queries if simcse else _batch(2)
    groups = [split_into_chunks(queries, CHUNK), split_into_chunks(positives, CHUNK)]
    if not simcse:
        groups.append(split_into_chunks(_batch(3), CHUNK))
    return groups


@pytest.mark.parametrize("simcse", [True, False], ids=["simcse-same-text", "with-negatives"])
def test_chunked_gradients_equal_whole_batch_with_dropout(simcse):
    groups = _groups(simcse)
    model = _model(0.3)
    ref_loss, ref_grads = _reference_step(model, groups, seed=7)
    model.zero_grad(set_to_none=True)
    loss, grads = _grad_cache(model, groups, seed=7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert ref_grads.keys() == grads.keys() and len(grads) > 10
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_rng_replay_the_gradients_differ():
    # The control for the test above: dropout is really on and the replay is what makes the gradients agree.
    groups = _groups(simcse=True)
    model = _model(0.3)
    _, ref_grads = _reference_step(model, groups, seed=7)
    model.zero_grad(set_to_none=True)
    _, grads = _grad_cache(model, groups, seed=7, replay_rng=False)
    worst = max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
                for n in ref_grads)
    assert worst > 1e-2


def test_without_dropout_chunks_equal_one_forward_of_the_whole_batch():
    queries, positives = _batch(1), _batch(2)
    model = _model(0.0)
    encode = _encode(model)
    ref_loss = _loss(encode(queries), encode(positives))
    ref_loss.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = grad_cache_step(encode, [split_into_chunks(queries, 2), split_into_chunks(positives, 5)], _loss)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_rng_state_replay_restores_afterwards():
    torch.manual_seed(0)
    state = RngState()
    first = torch.rand(3)
    after = torch.get_rng_state()
    with state.replay():
        torch.testing.assert_close(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_bad_chunking_is_named():
    with pytest.raises(ValueError, match="chunk_size"):
        split_into_chunks(_batch(1), 0)
    with pytest.raises(ValueError, match="same number of rows"):
        split_into_chunks({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, 2)
    with pytest.raises(ValueError, match="no input chunks"):
        grad_cache_step(lambda c: c, [[], []], _loss)
