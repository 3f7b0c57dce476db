"""SimCSE and supervised contrastive stages: data handling, and short real-model runs on CPU."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch

from llm2vec_fast.training.arguments import ContrastiveArguments, DataArguments, parse_stage_arguments
from llm2vec_fast.training.collators import ContrastiveCollator
from llm2vec_fast.training.contrastive import build_model
from llm2vec_fast.training.data import add_instructions, load_sentences, load_triplets
from llm2vec_fast.pipeline import embed
from llm2vec_fast.training.losses import CachedInfoNCELoss, InfoNCELoss
from llm2vec_fast.training.samplers import OneDatasetBatchSampler
from llm2vec_fast.training.supervised import train_supervised
from conftest import run_in_own_session, tiny_lora_model


def row(query, positive, negative=None, instruction="", dataset="default"):
    return {"query": query, "positive": positive, "negative": negative, "instruction": instruction,
            "dataset": dataset}


# ------------------------------------------------------------------------------------------------ data, no model
def test_batches_never_mix_datasets_and_leftovers_are_logged(caplog):
    datasets = ["a"] * 10 + ["b"] * 7 + ["c"] * 2
    with caplog.at_level(logging.INFO):
        sampler = OneDatasetBatchSampler(datasets, 3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2
    assert all(len(batch) == 3 and len({datasets[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == sorted(set(i for batch in batches for i in batch))
    assert "the 1 remaining rows are left out" in caplog.text  # a (10 = 3*3 + 1) and b (7 = 2*3 + 1)
    assert "'c' has 2 rows, fewer than one global batch" in caplog.text
    sampler.set_epoch(1)
    assert list(sampler) != batches, "a new epoch reshuffles"
    with pytest.raises(ValueError, match="no dataset fills one batch of 11"):
        OneDatasetBatchSampler(datasets, 11)


def test_no_duplicates_keeps_every_text_once_per_global_batch(caplog):
    """SNLI's shape: each premise recurs with several hypotheses. Without the option batches repeat a premise;
    with it none does, the rows that had to wait are counted, and batches still come from one dataset."""
    datasets = ["a"] * 24 + ["b"] * 12
    texts = [(f"premise {name}{i // 3}", f"hypothesis {name}{i}", None) for i, name in enumerate(datasets)]

    def repeats(batches):
        return sum(len(batch) - len({texts[i][0] for i in batch}) for batch in batches)

    assert repeats(OneDatasetBatchSampler(datasets, 2, world_size=2, seed=3).global_batch_list()) > 0
    sampler = OneDatasetBatchSampler(datasets, 2, world_size=2, seed=3, texts=texts)
    with caplog.at_level(logging.INFO):
        batches = sampler.global_batch_list()
    assert repeats(batches) == 0 and sampler.moved > 0 and f"{sampler.moved} times a row waited" in caplog.text
    assert all(len({datasets[i] for i in batch}) == 1 and len(batch) == 4 for batch in batches)
    assert len(batches) == 6 + 3 and len(sampler) == 2 * len(batches)  # here every row still finds a batch
    assert sorted(i for batch in batches for i in batch) == list(range(len(datasets)))


def test_processes_train_in_step_on_slices_of_one_global_batch():
    """Under accelerate's sharding (batch i to process i % world), each step's per-process batches are the
    slices of one global batch, so the loss gathered across processes never mixes datasets."""
    from accelerate.data_loader import prepare_data_loader

    world, per_process = 2, 3
    datasets = [name for name in "ab" for _ in range(13)]
    sampler = OneDatasetBatchSampler(datasets, per_process, world_size=world, seed=5)
    global_batches = sampler.global_batch_list()
    seen = []
    for rank in range(world):
        loader = torch.utils.data.DataLoader(range(len(datasets)), batch_sampler=sampler,
                                             collate_fn=lambda items: list(items))
        seen.append(list(prepare_data_loader(loader, device=torch.device("cpu"), num_processes=world,
                                             process_index=rank, put_on_device=False)))
    assert len(seen[0]) == len(seen[1]) == len(global_batches) == 4
    for step, global_batch in enumerate(global_batches):
        assert seen[0][step] + seen[1][step] == global_batch
        assert len({datasets[i] for i in global_batch}) == 1


@pytest.mark.slow
def test_two_processes_train_each_step_on_one_global_batch(tiny_smol, tmp_path):
    """torchrun, 2 gloo processes, the real Trainer: at every step the two processes' batches are the two
    halves of one global batch from one dataset (so the loss gathered across them never mixes datasets)."""
    rows = _run_two_processes(tiny_smol, tmp_path)
    triplets = load_triplets(DataArguments(train_files=[str(tmp_path / "rows.jsonl")]), ContrastiveArguments())
    global_batches = OneDatasetBatchSampler(triplets["dataset"], 3, world_size=2, seed=42).global_batch_list()
    for step in range(3):
        together = rows[0][step] + rows[1][step]
        assert len({dataset for dataset, _ in together}) == 1, together
        assert [query for _, query in together] == [triplets[i]["query"] for i in global_batches[step]]


def _run_two_processes(model_dir, tmp_path, *extra: str) -> list[list]:
    import os
    import sys
    from pathlib import Path

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"query": f"{name} question {i}", "positive": f"{name} answer {i}",
                                        "negative": f"{name} wrong {i}", "dataset": name}) + "\n"
                            for name in "ab" for i in range(12)))
    worker = Path(__file__).parent / "helpers" / "contrastive_ranks_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), str(model_dir), str(data), str(tmp_path), *extra]
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    run_in_own_session(command, env=env, timeout=300, what="the two-process run")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    return ranks


def test_collator_leaves_the_instruction_out_of_pooling(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    collator = ContrastiveCollator(tokenizer, max_length=64)
    instruction = "Retrieve semantically similar text"
    batch = collator([row("A man plays a guitar.", "Someone plays music.", "A dog sleeps.", instruction, "allnli"),
                      row("Hi", "Hello there, friend.", "Bye.", instruction)])
    assert set(batch) == {"query", "positive", "negative", "positive_ids", "negative_ids"} and len(batch["query"]) == 1
    query = batch["query"][0]
    # Pooled tokens decode to the query text alone; the instruction and its "; " joiner are not pooled.
    pooled = query["input_ids"][0][query["embed_mask"][0].bool()]
    assert tokenizer.decode(pooled).strip() == "A man plays a guitar."
    unpooled = query["input_ids"][0][query["attention_mask"][0].bool() & ~query["embed_mask"][0].bool()]
    assert tokenizer.decode(unpooled).strip() == instruction + ";"
    # Documents have no instruction: every real token is pooled; padding is on the left.
    negative = batch["negative"][0]
    assert torch.equal(negative["embed_mask"], negative["attention_mask"])
    assert negative["attention_mask"][:, -1].all() and not negative["attention_mask"][1, 0]  # "Bye." is shorter


def test_collator_treats_a_blank_instruction_as_none(smollm2_path):
    """As llm2vec's supervised data (and this collator before the pipeline): no "; " joiner for a blank one."""
    from transformers import AutoTokenizer

    collator = ContrastiveCollator(AutoTokenizer.from_pretrained(smollm2_path), max_length=64)
    blank, none = (collator([row("A man plays a guitar.", "Someone plays music.", "A dog sleeps.", instruction)])
                   for instruction in ("   ", ""))
    assert torch.equal(blank["query"][0]["input_ids"], none["query"][0]["input_ids"])
    assert torch.equal(blank["query"][0]["embed_mask"], none["query"][0]["embed_mask"])


def _write_jsonl(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("pooling_mode", ["mean", "eos_token"])
def test_training_tokenizes_texts_as_the_encoder_does(smollm2_path, pooling_mode):
    """Training and encoding share the pipeline's TextTokenizer; what this still checks is that training gives it
    the encoder's wrapping: with eos_token pooling the family's end marker is appended and pooled."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.training.contrastive import model_wrapping
    from llm2vec_fast.training.modeling import load_tokenizer

    texts = ["A man plays a guitar.", "Hello there, friend."]
    encoder = LLM2Vec.from_pretrained(smollm2_path, pooling_mode=pooling_mode, attention_impl="torch")
    collator = ContrastiveCollator(load_tokenizer(smollm2_path), max_length=64,
                                   wrap=model_wrapping(smollm2_path, pooling_mode))
    batch = collator.tokenize([("", text) for text in texts])
    for row, encoded in enumerate(encoder.tokenize_texts([("", text) for text in texts])):
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == encoded.input_ids
        assert batch["embed_mask"][row][real].tolist() == encoded.embed_mask
    tokenizer = collator.tokenizer
    last_pooled = batch["input_ids"][0][batch["embed_mask"][0].bool()][-1:]
    if pooling_mode == "eos_token":  # SmolLM2 is a llama: llm2vec's " </s>" marker ends the text and is pooled
        assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]).endswith("</s>")
    else:
        assert tokenizer.decode(last_pooled).strip() == "."
    query = collator.tokenize([("Retrieve semantically similar text", texts[0])])
    pooled = query["input_ids"][0][query["embed_mask"][0].bool()]
    assert tokenizer.decode(pooled).strip().startswith("A man plays a guitar.")



NLI_ROWS = [("A man plays a guitar on the street.", "Someone makes music.", "Nobody is playing."),
            ("Hi", "Hello there, friend.", "Bye."),
            ("Two dogs run through a field of tall grass.", "Animals are outside.", "The dogs sleep indoors."),
            ("A woman reads.", "A person looks at a book.", "A woman is swimming in the sea."),
            ("Kids.", "Children are present in the picture taken at noon.", "Adults only.")]


def test_packed_groups_embed_as_padded_ones_and_in_chunks(smollm2_path):
    from llm2vec_fast.training.modeling import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    rows = [row(q, p, n, instruction="Retrieve semantically similar text") for q, p, n in NLI_ROWS]
    padded = ContrastiveCollator(tokenizer, max_length=12)(rows)
    packed = ContrastiveCollator(tokenizer, max_length=12, packed=True, chunk_size=2)(rows)
    whole = ContrastiveCollator(tokenizer, max_length=12, packed=True)(rows)
    assert "attention_mask" not in whole["query"][0] and whole["query"][0]["input_ids"].shape[0] == 1
    # No padding: the packed group holds exactly the padded group's real tokens.
    assert whole["query"][0]["input_ids"].numel() == int(padded["query"][0]["attention_mask"].sum())
    assert [chunk["cu_seqlens"].shape[0] - 1 for chunk in packed["query"]] == [2, 2, 1]
    model = tiny_lora_model(len(tokenizer)).eval()
    with torch.no_grad():
        for group in ("query", "positive", "negative"):
            want = embed(model, padded[group][0], "mean")
            torch.testing.assert_close(embed(model, whole[group][0], "mean"), want, rtol=1e-5, atol=1e-5)
            got = torch.cat([embed(model, chunk, "mean") for chunk in packed[group]])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two tiny LoRA models with SmolLM2's 49k-token vocabulary, forward and backward
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_cached_loss_gives_the_whole_batch_loss_and_gradients_with_dropout(smollm2_path, packed):
    """CachedInfoNCELoss (GradCache inside the loss, re-encoding from the loss's backward) equals InfoNCELoss
    over the same chunks in one graph: same loss, same LoRA gradients, attention dropout on."""
    from llm2vec_fast.training.modeling import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    batch = ContrastiveCollator(tokenizer, max_length=12, packed=packed, chunk_size=2)(
        [row(q, p, n) for q, p, n in NLI_ROWS])
    model = tiny_lora_model(len(tokenizer), attention_dropout=0.3).train()
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for loss_class in (InfoNCELoss, CachedInfoNCELoss):
        model.zero_grad()
        torch.manual_seed(3)
        loss = loss_class("mean", scale=20.0, impl="torch")(model, batch)
        (loss / 2).backward()  # what reaches the loss (here gradient accumulation over 2) scales every chunk
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (want_loss, want), (got_loss, got) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    torch.manual_seed(4)  # other dropout draws: the agreement above is not one of identical models
    InfoNCELoss("mean", scale=20.0, impl="torch")(model, batch).backward()
    assert not torch.allclose(params[-1].grad, want[-1] * 2, atol=1e-6)


def test_bad_rows_are_errors_or_skipped_with_a_count(tmp_path, caplog):
    path = tmp_path / "rows.jsonl.gz"
    _write_jsonl(path, [
        {"query": "q1", "positive": "p1", "negative": "n1", "dataset": "nq"},
        {"query": "q2", "positive": "p2", "dataset": "nq"},
        {"query": "  ", "positive": "p3", "negative": "n3", "dataset": "nq"},
        {"query": "q4", "positive": "p4", "negative": "n4", "dataset": "nq"},
    ])
    files = DataArguments(train_files=[str(path)])
    with pytest.raises(ValueError, match=r"rows.jsonl.gz:2: missing 'negative'"):
        load_triplets(files, ContrastiveArguments())
    with caplog.at_level(logging.WARNING):
        rows = load_triplets(files, ContrastiveArguments(skip_bad_rows=True))
    assert rows["query"] == ["q1", "q4"]
    assert "skipped 2 rows" in caplog.text
    no_negatives = load_triplets(files, ContrastiveArguments(hard_negatives=False, skip_bad_rows=True))
    assert len(no_negatives) == 3 and "negative" not in no_negatives.column_names


def test_unknown_dataset_needs_an_instruction():
    import datasets

    rows = datasets.Dataset.from_list([{"query": "q", "positive": "p", "negative": "n", "dataset": "mine"}])
    with pytest.raises(ValueError, match=r"no instruction for dataset\(s\) \['mine'\]"):
        add_instructions(rows, {})
    (example,) = add_instructions(rows, {"mine": "Find the answer"})
    assert example["instruction"] == "Find the answer" and example["negative"] == "n"


def test_snli_triplets_and_sentences_load(shared_data, tmp_path):
    rows = load_triplets(DataArguments(train_files=[str(shared_data / "snli" / "nli_triplets.csv")],
                                       max_train_samples=50), ContrastiveArguments())
    assert len(rows) == 50 and rows[0]["dataset"] == "allnli"
    assert rows[0]["query"].startswith("Two women are embracing")
    text = tmp_path / "s.txt"
    text.write_text("one\n\n  \ntwo\n", encoding="utf-8")
    assert load_sentences(DataArguments(train_files=[str(text)]))["query"] == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sentences(DataArguments(train_files=[str(tmp_path / "missing.txt")]))


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="bogus"):
        parse_stage_arguments("supervised", {"model_name_or_path": "m", "output_dir": "o", "bogus": 1})
    with pytest.raises(ValueError, match="chunk_size"):
        parse_stage_arguments("supervised", {"model_name_or_path": "m", "output_dir": "o", "chunk_size": 0})


@pytest.mark.parametrize("stage", ["simcse", "supervised"])
def test_stage_configs_load_with_one_schema(stage):
    from conftest import REPO_ROOT

    for name in ("smollm2_135m", "meta_llama3_8b", "mistral_7b"):
        model, data, args, training = parse_stage_arguments(stage, REPO_ROOT / f"training/{stage}/{name}.json",
                                                            ["--bf16", "false"])  # this CPU has no bf16
        assert training.seed == 42 and training.per_device_train_batch_size >= 16 and training.output_dir
        assert model.lora_r == 16 and data.train_files


# ------------------------------------------------------------------------------------------------ SmolLM2 runs
# Sized for CI's CPU budget: 20 steps of 4 rows, short texts (a SmolLM2 step costs seconds in fp32 on one core).
STEPS = 20



def _held_out_loss(model, collator, rows, scale, pooling="mean"):
    model.eval()
    with torch.no_grad():
        return InfoNCELoss(pooling, scale=scale, impl="torch")(model, collator(rows)).item()


def _losses(run):
    return [entry["loss"] for entry in run.log_history if "loss" in entry]


@pytest.mark.slow
def test_simcse_cli_run_lowers_the_loss_and_the_adapter_reloads(smollm2_path, shared_data, tmp_path, one_thread):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.cli import main as cli_main
    from llm2vec_fast.training.modeling import load_tokenizer

    out = tmp_path / "simcse"
    sentences = load_sentences(DataArguments(train_files=[str(shared_data / "wiki_sentences" /
                                                              "wiki_sentences.txt.gz")], max_train_samples=100))
    code = cli_main([
        "train", "simcse", "--config", "training/simcse/smollm2_135m.json", "--model_name_or_path", smollm2_path,
        "--output_dir", str(out), "--merge_adapters", "--max_train_samples", "80",
        "--per_device_train_batch_size", "4", "--max_length", "16", "--max_steps", str(STEPS), "--logging_steps", "1",
        "--learning_rate", "1e-3", "--save_steps", str(STEPS), "--doc_max_length", "300",
    ])
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == STEPS and all(map(lambda x: x == x, losses))
    assert (out / "adapter_config.json").is_file()
    # The encoder settings come from the run's settings, not constants of the training code.
    assert json.loads((out / "llm2vec_config.json").read_text()) == {
        "pooling_mode": "mean", "max_length": 16, "doc_max_length": 300, "skip_instruction": True}
    settings = json.loads((out / "simcse_settings.json").read_text())
    assert settings["per_device_train_batch_size"] == 4 and settings["seed"] == 42 and settings["max_length"] == 16

    # Held-out sentences (not among the 80 trained on), no dropout: the trained encoder separates them better.
    held_out = [row(s, s) for s in sentences["query"][80:96]]
    collator = ContrastiveCollator(load_tokenizer(smollm2_path), max_length=16)
    base = LLM2Vec.from_pretrained(smollm2_path, attention_impl="torch")
    trained = LLM2Vec.from_pretrained(smollm2_path, peft_model_name_or_path=str(out), attention_impl="torch")
    before = _held_out_loss(base.model, collator, held_out, 20.0)
    after = _held_out_loss(trained.model, collator, held_out, 20.0)
    assert after < before, (before, after)


@pytest.mark.slow
def test_supervised_gradcache_run_lowers_the_loss_and_the_adapter_reloads(smollm2_path, shared_data, tmp_path,
                                                                         one_thread):
    from llm2vec_fast import LLM2Vec

    arguments = parse_stage_arguments("supervised", {
        "model_name_or_path": smollm2_path, "output_dir": str(tmp_path / "supervised"),
        "train_files": [str(shared_data / "snli" / "nli_triplets.csv")], "max_train_samples": 80,
        "instructions": {"allnli": "Retrieve semantically similar text"},
        "per_device_train_batch_size": 4, "chunk_size": 3, "max_length": 16, "scale": 50.0, "dtype": "float32",
        "max_steps": STEPS, "learning_rate": 1e-3, "warmup_steps": 2, "logging_steps": 1, "save_steps": STEPS,
    })
    run = train_supervised(*arguments)  # batches of 4 in chunks of 3: every step is a GradCache step
    assert isinstance(run.trainer.loss, CachedInfoNCELoss)
    losses = _losses(run)
    assert len(losses) == STEPS and all(map(lambda x: x == x, losses))

    model_args, data_args, args, _ = arguments
    data_args.max_train_samples = 96
    held_out = add_instructions(load_triplets(data_args, args), args.instructions).select(range(80, 96)).to_list()
    collator = ContrastiveCollator(run.trainer.processing_class, max_length=16)
    trained_model = run.trainer.model
    after = _held_out_loss(trained_model, collator, held_out, 50.0)
    before_model = build_model(model_args)  # the same base with a fresh LoRA, which starts as the identity
    before = _held_out_loss(before_model, collator, held_out, 50.0)
    assert after < before, (before, after)

    # The saved adapter, loaded by the encoder, gives the trained model's embeddings.
    encoder = LLM2Vec.from_pretrained(smollm2_path, peft_model_name_or_path=run.output_dir, attention_impl="torch")
    texts = [r["positive"] for r in held_out[:4]]
    docs = collator.tokenize([("", t) for t in texts])
    with torch.no_grad():
        expected = embed(trained_model.eval(), docs, "mean")
    got = encoder.encode(texts, batch_size=4, convert_to_tensor=True, convert_to_numpy=False)
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stage", ["simcse", "supervised"])
def test_non_positive_row_limits_are_refused(stage, tmp_path):
    with pytest.raises(ValueError, match="max_train_samples"):
        parse_stage_arguments(stage, {"model_name_or_path": "smollm2-135m", "output_dir": str(tmp_path),
                                      "train_files": ["x.txt"], "max_train_samples": 0})
