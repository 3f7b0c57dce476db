"""SimCSE and supervised contrastive stages: data handling, and short real-model runs on CPU."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch

from llm2vec_fast.kernels import info_nce_loss
from llm2vec_fast.training.contrastive import (
    ContrastiveCollator,
    ContrastiveExample,
    build_batches,
    build_model,
    embed,
)
from llm2vec_fast.training.simcse import read_sentences
from llm2vec_fast.training.supervised import (
    SupervisedDataSettings,
    read_supervised_rows,
    settings_from_config as supervised_settings,
    supervised_examples,
    train_supervised,
)


# ------------------------------------------------------------------------------------------------ data, no model
def test_batches_never_mix_datasets_and_leftovers_are_logged(caplog):
    examples = [ContrastiveExample(f"q{i}", f"p{i}", dataset="a") for i in range(10)]
    examples += [ContrastiveExample(f"q{i}", f"p{i}", dataset="b") for i in range(7)]
    examples += [ContrastiveExample(f"q{i}", f"p{i}", dataset="c") for i in range(2)]
    with caplog.at_level(logging.INFO):
        batches = build_batches(examples, 3, seed=1)
    assert len(batches) == 3 + 2
    assert all(len(batch) == 3 and len({ex.dataset for ex in batch}) == 1 for batch in batches)
    assert "the 1 remaining rows are left out" in caplog.text  # a (10 = 3*3 + 1) and b (7 = 2*3 + 1)
    assert "'c' has 2 rows, fewer than one batch" in caplog.text
    with pytest.raises(ValueError, match="no dataset fills one batch of 11"):
        build_batches(examples, 11)


def test_processes_train_in_step_on_slices_of_one_global_batch():
    """Under accelerate's sharding (item i to process i % world), each step's per-process batches are the
    slices of one global batch, so the loss gathered across processes never mixes datasets."""
    from accelerate.data_loader import prepare_data_loader

    from llm2vec_fast.training.contrastive import BatchDataset, deal_to_ranks

    world, per_process = 2, 3
    examples = [ContrastiveExample(f"q{name}{i}", f"p{name}{i}", dataset=name) for name in "ab" for i in range(13)]
    global_batches = build_batches(examples, per_process * world, seed=5)
    dataset = BatchDataset(deal_to_ranks(global_batches, world))
    seen = []
    for rank in range(world):
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=torch.utils.data.SequentialSampler(dataset),
                                             collate_fn=lambda items: items[0])
        seen.append(list(prepare_data_loader(loader, device=torch.device("cpu"), num_processes=world,
                                             process_index=rank, put_on_device=False)))
    assert len(seen[0]) == len(seen[1]) == len(global_batches) == 4
    for step, global_batch in enumerate(global_batches):
        assert seen[0][step] + seen[1][step] == global_batch
        assert len({ex.dataset for ex in seen[0][step] + seen[1][step]}) == 1
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        deal_to_ranks(global_batches, 4)


@pytest.mark.slow
def test_two_processes_train_each_step_on_one_global_batch(tiny_smol, tmp_path):
    """torchrun, 2 gloo processes, the real Trainer: at every step the two processes' batches are the two
    halves of one global batch from one dataset (so the loss gathered across them never mixes datasets)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    model_dir = tiny_smol
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"query": f"{name} question {i}", "positive": f"{name} answer {i}",
                                        "negative": f"{name} wrong {i}", "dataset": name}) + "\n"
                            for name in "ab" for i in range(12)))
    worker = Path(__file__).parent / "helpers" / "contrastive_ranks_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), str(model_dir), str(data), str(tmp_path)]
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the two-process run did not finish in 300 s")
    assert process.returncode == 0, stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    rows = read_supervised_rows(SupervisedDataSettings(train_files=[str(data)]))
    global_batches = build_batches(supervised_examples(rows, {"a": "", "b": ""}), 6, seed=42)
    for step in range(3):
        together = ranks[0][step] + ranks[1][step]
        assert len({dataset for dataset, _ in together}) == 1, together
        assert [query for _, query in together] == [example.query for example in global_batches[step]]


def test_collator_leaves_the_instruction_out_of_pooling(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    collator = ContrastiveCollator(tokenizer, max_length=64)
    instruction = "Retrieve semantically similar text"
    batch = collator([[ContrastiveExample("A man plays a guitar.", "Someone plays music.", "A dog sleeps.",
                                          instruction=instruction, dataset="allnli"),
                       ContrastiveExample("Hi", "Hello there, friend.", "Bye.", instruction=instruction)]])
    assert set(batch) == {"query", "positive", "negative"}
    query = batch["query"]
    # Pooled tokens decode to the query text alone; the instruction and its "; " joiner are not pooled.
    row = query["input_ids"][0][query["embed_mask"][0].bool()]
    assert tokenizer.decode(row).strip() == "A man plays a guitar."
    unpooled = query["input_ids"][0][query["attention_mask"][0].bool() & ~query["embed_mask"][0].bool()]
    assert tokenizer.decode(unpooled).strip() == instruction + ";"
    # Documents have no instruction: every real token is pooled; padding is on the left.
    negative = batch["negative"]
    assert torch.equal(negative["embed_mask"], negative["attention_mask"])
    assert negative["attention_mask"][:, -1].all() and not negative["attention_mask"][1, 0]  # "Bye." is shorter


def _write_jsonl(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("pooling_mode", ["mean", "eos_token"])
def test_training_tokenizes_texts_as_the_encoder_does(smollm2_path, pooling_mode):
    """With eos_token pooling the encoder appends the family's end marker and pools it; training must too."""
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


def _tiny_lora_model(vocab_size: int):
    from conftest import build_tiny_model

    from llm2vec_fast import patch
    from llm2vec_fast.training.modeling import LoraSettings, add_lora

    model = build_tiny_model("llama", vocab_size=vocab_size)
    patch(model, attention_impl="torch")
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, parameter in model.named_parameters():  # LoRA's B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model


NLI_ROWS = [("A man plays a guitar on the street.", "Someone makes music.", "Nobody is playing."),
            ("Hi", "Hello there, friend.", "Bye."),
            ("Two dogs run through a field of tall grass.", "Animals are outside.", "The dogs sleep indoors."),
            ("A woman reads.", "A person looks at a book.", "A woman is swimming in the sea."),
            ("Kids.", "Children are present in the picture taken at noon.", "Adults only.")]


def test_packed_groups_embed_as_padded_ones_and_split_into_chunks(smollm2_path):
    from llm2vec_fast.training.contrastive import split_group, texts_in_group
    from llm2vec_fast.training.modeling import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    examples = [[ContrastiveExample(q, p, n, instruction="Retrieve semantically similar text") for q, p, n in NLI_ROWS]]
    padded = ContrastiveCollator(tokenizer, max_length=12)(examples)
    packed = ContrastiveCollator(tokenizer, max_length=12, packed=True)(examples)
    assert "attention_mask" not in packed["query"] and packed["query"]["input_ids"].shape[0] == 1
    # No padding: the packed group holds exactly the padded group's real tokens.
    assert packed["query"]["input_ids"].numel() == int(padded["query"]["attention_mask"].sum())
    model = _tiny_lora_model(len(tokenizer)).eval()
    with torch.no_grad():
        for group in ("query", "positive", "negative"):
            want = embed(model, padded[group], "mean")
            torch.testing.assert_close(embed(model, packed[group], "mean"), want, rtol=1e-5, atol=1e-5)
            chunks = split_group(packed[group], 2)
            assert [texts_in_group(chunk) for chunk in chunks] == [2, 2, 1]
            assert [texts_in_group(chunk) for chunk in split_group(padded[group], 2)] == [2, 2, 1]
            got = torch.cat([embed(model, chunk, "mean") for chunk in chunks])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcache_over_packed_chunks_gives_the_whole_batch_gradients(smollm2_path):
    from llm2vec_fast.training.contrastive import split_group
    from llm2vec_fast.training.gradcache import grad_cache_step
    from llm2vec_fast.training.modeling import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    batch = ContrastiveCollator(tokenizer, max_length=12, packed=True)(
        [[ContrastiveExample(q, p, n) for q, p, n in NLI_ROWS]])
    model = _tiny_lora_model(len(tokenizer)).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(*reps):
        return info_nce_loss(*reps, scale=20.0, impl="torch")

    loss_fn(*(embed(model, batch[group], "mean") for group in ("query", "positive", "negative"))).backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad()
    groups = [split_group(batch[group], 2) for group in ("query", "positive", "negative")]
    grad_cache_step(lambda chunk: embed(model, chunk, "mean"), groups, loss_fn)
    for got, expected in zip((p.grad for p in params), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_bad_rows_are_errors_or_skipped_with_a_count(tmp_path, caplog):
    path = tmp_path / "rows.jsonl.gz"
    _write_jsonl(path, [
        {"query": "q1", "positive": "p1", "negative": "n1", "dataset": "nq"},
        {"query": "q2", "positive": "p2", "dataset": "nq"},
        {"query": "  ", "positive": "p3", "negative": "n3", "dataset": "nq"},
        {"query": "q4", "positive": "p4", "negative": "n4", "dataset": "nq"},
    ])
    with pytest.raises(ValueError, match=r"rows.jsonl.gz:2: missing 'negative'"):
        read_supervised_rows(SupervisedDataSettings(train_files=[str(path)]))
    with caplog.at_level(logging.WARNING):
        rows = read_supervised_rows(SupervisedDataSettings(train_files=[str(path)], skip_bad_rows=True))
    assert [row["query"] for row in rows] == ["q1", "q4"]
    assert "skipped 2 rows" in caplog.text
    no_negatives = read_supervised_rows(SupervisedDataSettings(train_files=[str(path)], hard_negatives=False,
                                                               skip_bad_rows=True))
    assert len(no_negatives) == 3 and "negative" not in no_negatives[0]


def test_unknown_dataset_needs_an_instruction():
    rows = [{"query": "q", "positive": "p", "negative": "n", "dataset": "mine"}]
    with pytest.raises(ValueError, match=r"no instruction for dataset\(s\) \['mine'\]"):
        supervised_examples(rows, {})
    (example,) = supervised_examples(rows, {"mine": "Find the answer"})
    assert example.instruction == "Find the answer" and example.negative == "n"


def test_snli_triplets_and_sentences_load(shared_data, tmp_path):
    rows = read_supervised_rows(SupervisedDataSettings(train_files=[str(shared_data / "snli" / "nli_triplets.csv")],
                                                       max_rows=50))
    assert len(rows) == 50 and rows[0]["dataset"] == "allnli"
    assert rows[0]["query"].startswith("Two women are embracing")
    text = tmp_path / "s.txt"
    text.write_text("one\n\n  \ntwo\n", encoding="utf-8")
    assert read_sentences([str(text)]) == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="not found"):
        read_sentences([str(tmp_path / "missing.txt")])


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="unknown SupervisedSettings setting"):
        supervised_settings({"model_name_or_path": "m", "output_dir": "o", "bogus": 1})
    with pytest.raises(ValueError, match="batch_size at the top level|set 'per_device_train_batch_size'"):
        supervised_settings({"model_name_or_path": "m", "output_dir": "o", "data": {"train_files": ["x"]},
                             "training": {"per_device_train_batch_size": 4}})


# ------------------------------------------------------------------------------------------------ SmolLM2 runs
# Sized for CI's CPU budget: 20 steps of 4 rows, short texts (a SmolLM2 step costs seconds in fp32 on one core).
STEPS = 20


@pytest.fixture
def one_thread():
    # On a shared 2-core machine, OpenMP threads waiting on each other cost more than a second core gives.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _held_out_loss(model, collator, examples, scale, pooling="mean"):
    model.eval()
    batch = collator([examples])
    with torch.no_grad():
        reps = [embed(model, batch[group], pooling) for group in ("query", "positive", "negative") if group in batch]
        return info_nce_loss(*reps, scale=scale, impl="torch").item()


def _losses(run):
    return [entry["loss"] for entry in run.log_history if "loss" in entry]


@pytest.mark.slow
def test_simcse_cli_run_lowers_the_loss_and_the_adapter_reloads(smollm2_path, shared_data, tmp_path, one_thread):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.cli import main as cli_main
    from llm2vec_fast.training.modeling import load_tokenizer

    out = tmp_path / "simcse"
    sentences = read_sentences([str(shared_data / "wiki_sentences" / "wiki_sentences.txt.gz")], 100)
    code = cli_main([
        "train", "simcse", "--config", "training/simcse/smollm2_135m.json",
        "--set", f"model_name_or_path={smollm2_path}", "--set", f"output_dir={out}", "--set", "merge_adapters=[]",
        "--set", "data.max_sentences=80", "--set", "batch_size=4", "--set", "max_length=16",
        "--set", f"training.max_steps={STEPS}", "--set", "training.logging_steps=1",
        "--set", "training.learning_rate=1e-3", "--set", f"training.save_steps={STEPS}",
    ])
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == STEPS and all(map(lambda x: x == x, losses))
    assert (out / "adapter_config.json").is_file() and (out / "llm2vec_config.json").is_file()

    # Held-out sentences (not among the 80 trained on), no dropout: the trained encoder separates them better.
    held_out = [ContrastiveExample(s, s) for s in sentences[80:96]]
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

    settings = supervised_settings({
        "model_name_or_path": smollm2_path, "output_dir": str(tmp_path / "supervised"),
        "data": {"train_files": [str(shared_data / "snli" / "nli_triplets.csv")], "max_rows": 80},
        "instructions": {"allnli": "Retrieve semantically similar text"},
        "batch_size": 4, "chunk_size": 3, "max_length": 16, "scale": 50.0, "dtype": "float32",
        "training": {"max_steps": STEPS, "learning_rate": 1e-3, "warmup_steps": 2, "logging_steps": 1,
                     "save_steps": STEPS},
    })
    run = train_supervised(settings)  # batches of 4 in chunks of 3: every step is a GradCache step
    losses = _losses(run)
    assert len(losses) == STEPS and all(map(lambda x: x == x, losses))

    rows = read_supervised_rows(SupervisedDataSettings(train_files=settings.data.train_files, max_rows=96))[80:]
    held_out = supervised_examples(rows, settings.instructions, seed=0)
    collator = ContrastiveCollator(run.trainer.processing_class, max_length=16)
    trained_model = run.trainer.model
    after = _held_out_loss(trained_model, collator, held_out, 50.0)
    before_model = build_model(settings)  # the same base with a fresh LoRA, which starts as the identity
    before = _held_out_loss(before_model, collator, held_out, 50.0)
    assert after < before, (before, after)

    # The saved adapter, loaded by the encoder, gives the trained model's embeddings.
    encoder = LLM2Vec.from_pretrained(smollm2_path, peft_model_name_or_path=settings.output_dir,
                                      attention_impl="torch")
    texts = [row["positive"] for row in rows[:4]]
    docs = collator.tokenize([("", t) for t in texts])
    with torch.no_grad():
        expected = embed(trained_model.eval(), docs, "mean")
    got = encoder.encode(texts, batch_size=4, convert_to_tensor=True, convert_to_numpy=False)
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stage,key", [("simcse", "max_sentences"), ("supervised", "max_rows")])
def test_non_positive_row_limits_are_refused(stage, key, tmp_path):
    import importlib

    module = importlib.import_module(f"llm2vec_fast.training.{stage}")
    config = {"model_name_or_path": "smollm2-135m", "output_dir": str(tmp_path),
              "data": {"train_files": ["x.txt"], key: 0}}
    with pytest.raises(ValueError, match=key):
        module.settings_from_config(config)
