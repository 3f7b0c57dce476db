"""False negatives and duplicate texts in the contrastive stages: the collator's text hashes, the loss modules
that mask with them (in one graph and through GradCache), bad ids, and the stage defaults (masking on, no
duplicate text in a global batch) with their off switches. The kernels' masked loss is tested in test_infonce.py."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llm2vec_fast.kernels import text_hashes
from llm2vec_fast.pipeline import embed
from llm2vec_fast.training.arguments import parse_stage_arguments
from llm2vec_fast.training.collators import ContrastiveCollator
from llm2vec_fast.training.losses import CachedInfoNCELoss, InfoNCELoss
from conftest import tiny_lora_model


def row(query, positive, negative=None, instruction="", dataset="a"):
    return {"query": query, "positive": positive, "negative": negative, "instruction": instruction,
            "dataset": dataset}


# Row 1's positive is row 0's; row 2's hard negative is row 0's positive; row 3's positive is row 2's negative.
DUPLICATED = [row("A man plays a guitar.", "Someone makes music.", "Nobody plays."),
              row("A woman sings a song.", "Someone makes music.", "It is silent."),
              row("Two dogs run.", "Animals move.", "Someone makes music."),
              row("Kids play outside.", "Someone makes music.", "Adults sit inside.")]


def hand_loss(q, pos, neg, positive_texts, negative_texts, scale, mask):
    """The cross-entropy written out: cosine scores times scale, the duplicates of each query's own positive
    (other than that positive) set to -inf when ``mask``."""
    docs = torch.cat([pos, neg])
    scores = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(docs, dim=1).T * scale
    texts = list(positive_texts) + list(negative_texts)
    losses = []
    for i in range(q.shape[0]):
        keep = [j for j in range(len(texts)) if j == i or not (mask and texts[j] == texts[i])]
        losses.append(torch.logsumexp(scores[i, keep], dim=0) - scores[i, i])
    return torch.stack(losses).mean()


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from llm2vec_fast.training.modeling import load_tokenizer

    return load_tokenizer(smollm2_path)



# ------------------------------------------------------------------------------------------------ the collator
def test_collator_hashes_the_documents_by_default_and_counts_false_negatives(tokenizer):
    collator = ContrastiveCollator(tokenizer, max_length=16)
    batch = collator(DUPLICATED)
    assert torch.equal(batch["positive_ids"], text_hashes([r["positive"] for r in DUPLICATED]))
    assert torch.equal(batch["negative_ids"], text_hashes([r["negative"] for r in DUPLICATED]))
    assert batch["positive_ids"].dtype == torch.int64 and batch["positive_ids"].shape == (4,)
    # Rows 0, 1, 3 share a positive (2 others each: 6) and row 2's negative is a copy of it (3 more).
    assert collator.stats["false_negatives"] == 9
    # SimCSE's rows: the query is its own positive; only other rows' copies count.
    simcse = ContrastiveCollator(tokenizer, max_length=16)
    out = simcse([row(s, s) for s in ("One.", "Two.", "One.")])
    assert "negative_ids" not in out and simcse.stats["false_negatives"] == 2
    off = ContrastiveCollator(tokenizer, max_length=16, text_ids=False)(DUPLICATED)
    assert set(off) == {"query", "positive", "negative"}


# ------------------------------------------------------------------------------------------------ the losses
@pytest.mark.parametrize("loss_class", [InfoNCELoss, CachedInfoNCELoss])
def test_loss_modules_leave_the_duplicates_out_as_computed_by_hand(tokenizer, loss_class):
    """A batch with a duplicated text: the loss module gives the hand-written masked loss; without the ids
    (the collator's off switch) llm2vec's unmasked one. GradCache (chunks of 3 over rows of 4) gives the same
    loss and the same gradients as one graph."""
    model = tiny_lora_model(len(tokenizer)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    texts = ([r["positive"] for r in DUPLICATED], [r["negative"] for r in DUPLICATED])
    results = {}
    for mask in (True, False):
        batch = ContrastiveCollator(tokenizer, max_length=16, chunk_size=3, text_ids=mask)(DUPLICATED)
        with torch.no_grad():
            q, pos, neg = (torch.cat([embed(model, c, "mean") for c in batch[g]])
                           for g in ("query", "positive", "negative"))
        want = hand_loss(q, pos, neg, *texts, scale=20.0, mask=mask)
        model.zero_grad()
        loss = loss_class("mean", scale=20.0, impl="torch")(model, batch)
        loss.backward()
        torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
        results[mask] = (loss.detach(), [p.grad.clone() for p in params])
    assert results[True][0] < results[False][0] - 1e-3, "masking removes columns: the loss must drop"
    if loss_class is CachedInfoNCELoss:
        model.zero_grad()
        batch = ContrastiveCollator(tokenizer, max_length=16, chunk_size=3)(DUPLICATED)
        InfoNCELoss("mean", scale=20.0, impl="torch")(model, batch).backward()
        for got, want in zip(results[True][1], params):
            torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_class", [InfoNCELoss, CachedInfoNCELoss])
def test_every_document_a_copy_of_the_positive_gives_zero_loss(tokenizer, loss_class):
    """Every positive and negative is one text: each query has only its own positive left, loss 0, gradients
    zero and finite (never NaN)."""
    model = tiny_lora_model(len(tokenizer)).train()
    rows = [row(f"Query number {i}.", "The same text.", "The same text.") for i in range(4)]
    batch = ContrastiveCollator(tokenizer, max_length=16, chunk_size=2)(rows)
    loss = loss_class("mean", scale=50.0, impl="torch")(model, batch)
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() and not g.abs().max() > 0 for g in grads if g is not None)


@pytest.mark.parametrize("change, error, message", [
    (lambda b: {**b, "positive_ids": b["positive_ids"][:3]}, ValueError, r"positive_ids must have shape \(4,\)"),
    (lambda b: {**b, "negative_ids": b["negative_ids"][None]}, ValueError, r"negative_ids must have shape \(4,\)"),
    (lambda b: {**b, "positive_ids": b["positive_ids"].to("meta")}, ValueError,
     "positive_ids must be on the embeddings' device"),
    (lambda b: {**b, "positive_ids": b["positive_ids"].tolist()}, TypeError, "positive_ids must be a torch.Tensor"),
    (lambda b: {k: v for k, v in b.items() if k != "negative_ids"}, ValueError, "negative_ids was not"),
])
def test_bad_ids_reaching_the_loss_module_are_named(tokenizer, change, error, message):
    model = tiny_lora_model(len(tokenizer))
    batch = change(ContrastiveCollator(tokenizer, max_length=16)(DUPLICATED))
    with pytest.raises(error, match=message):
        InfoNCELoss("mean", impl="torch")(model, batch)


# ------------------------------------------------------------------------------------------------ the stages
def _supervised(model_dir, data, out, **settings):
    from llm2vec_fast.training.supervised import train_supervised

    base = {"model_name_or_path": model_dir, "output_dir": str(out), "train_files": [str(data)],
            "instructions": {"a": "Find"}, "per_device_train_batch_size": 4, "chunk_size": None,
            "max_length": 16, "dtype": "float32", "attention_impl": "torch", "loss_impl": "torch", "lora_r": 2,
            "lora_alpha": 4, "lora_dropout": 0.0, "max_steps": 1, "learning_rate": 1e-3, "warmup_steps": 0,
            "logging_steps": 1, "save_steps": 100, "use_cpu": True, "scale": 20.0, "report_to": "none"}
    arguments = parse_stage_arguments("supervised", {**base, **settings})
    return arguments, train_supervised(*arguments)


def test_stage_masks_false_negatives_by_default_and_the_switch_gives_llm2vecs_loss(tiny_smol, tmp_path):
    """The supervised stage, one step on a tiny model: the logged loss of the first step (taken before the
    update) is the hand-written masked loss on the batch the sampler gave; ``mask_false_negatives false`` gives
    the unmasked one. Every batch of 4 from these rows repeats a positive, so no_duplicates is off here."""
    from llm2vec_fast.training.contrastive import build_model

    rows = [{"query": f"question {i}", "positive": ("answer one", "answer two")[i % 2],
             "negative": f"wrong {i}", "dataset": "a"} for i in range(8)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = {}
    for mask in (True, False):
        # Scale 1: a random model's scores are far apart at scale 20, where leaving a column out barely shows.
        settings = {"no_duplicates": False, "scale": 1.0}
        if not mask:
            settings["mask_false_negatives"] = False
        (model_args, _, args, _), run = _supervised(tiny_smol, data, tmp_path / f"mask{mask}", **settings)
        assert args.mask_false_negatives is mask
        first = [e["loss"] for e in run.log_history if "loss" in e][0]
        trainer = run.trainer
        batch_rows = [trainer.train_dataset[i] for i in trainer.batch_sampler.global_batch_list()[0]]
        batch = trainer.data_collator(batch_rows)
        torch.manual_seed(0)
        model = build_model(model_args).eval()  # the LoRA starts as the identity: the model before the step
        with torch.no_grad():
            q, pos, neg = (torch.cat([embed(model, c, "mean") for c in batch[g]])
                           for g in ("query", "positive", "negative"))
        want = hand_loss(q, pos, neg, [r["positive"] for r in batch_rows], [r["negative"] for r in batch_rows],
                         scale=1.0, mask=mask)
        assert first == pytest.approx(want.item(), abs=2e-4), (mask, first, want.item())
        logged[mask] = first
    assert logged[True] < logged[False] - 0.05


def test_stage_batches_hold_no_repeated_text_by_default(tiny_smol, tmp_path, caplog):
    """SNLI's shape (a premise with several hypotheses): by default no global batch repeats a text, the rows
    that waited are counted and logged; ``no_duplicates false`` gives llm2vec's batches, which repeat."""
    rows = [{"query": f"premise {i // 2}", "positive": f"hypothesis {i}", "negative": f"contradiction {i}",
             "dataset": "a"} for i in range(16)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def repeats(sampler):
        return sum(len(b) - len({rows[i]["query"] for i in b}) for b in sampler.global_batch_list())

    with caplog.at_level(logging.INFO, logger="llm2vec_fast"):
        (_, _, args, _), run = _supervised(tiny_smol, data, tmp_path / "default")
    sampler = run.trainer.batch_sampler
    assert args.no_duplicates and repeats(sampler) == 0 and sampler.moved > 0
    assert f"{sampler.moved} times a row waited" in caplog.text
    assert "0 (query, document) pairs were false negatives" in caplog.text  # none left for the mask
    _, run = _supervised(tiny_smol, data, tmp_path / "off", no_duplicates=False)
    assert repeats(run.trainer.batch_sampler) > 0


def test_no_duplicates_that_cannot_fill_a_batch_is_a_clear_error():
    from llm2vec_fast.training.samplers import OneDatasetBatchSampler

    texts = [("same query", f"answer {i}", None) for i in range(8)]
    with pytest.raises(ValueError, match="without repeating a text"):
        len(OneDatasetBatchSampler(["a"] * 8, 4, texts=texts))
