"""The MNTP stage: text blocks, the masking collator, settings, convergence against the full-logits loss, and a
short real run of SmolLM2-135M on wikitext."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from llm2vec_fast.training.arguments import DataArguments, parse_stage_arguments
from llm2vec_fast.training.collators import IGNORE_INDEX, MNTPDataCollator, resolve_mask_token
from llm2vec_fast.training.data import TextTooShortError, load_text_dataset, tokenize_into_blocks
from llm2vec_fast.training.mntp import train_mntp

from conftest import REPO_ROOT, build_tiny_model

# ---------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------

PAD_ID, BOS_ID, EOS_ID, MASK_ID, VOCAB = 0, 1, 2, 3, 1000


def word_tokenizer(words, *, with_blank=True):
    """A small word-level fast tokenizer: ids 0-2 special, then ``_`` (3) and ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for word in (["_"] if with_blank else []) + list(words):
        vocab.setdefault(word, len(vocab))
    vocab.setdefault("<unk>", len(vocab))
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def vocab_tokenizer(size=VOCAB):
    tokenizer = word_tokenizer([f"w{i}" for i in range(size - 5)])
    assert len(tokenizer) == size and resolve_mask_token(tokenizer, "blank") == (MASK_ID, False)
    return tokenizer


def random_features(n=64, length=128, seed=0, ragged=False):
    gen = torch.Generator().manual_seed(seed)
    features = []
    for row in range(n):
        size = length - (row % 7) * 5 if ragged else length
        ids = torch.randint(10, VOCAB, (size,), generator=gen)
        ids[0] = BOS_ID
        special = torch.zeros(size, dtype=torch.long)
        special[0] = 1
        features.append({"input_ids": ids.tolist(), "attention_mask": [1] * size, "special_tokens_mask": special.tolist()})
    return features


def make_collator(replacement="default", mask_probability=0.2, tokenizer=None, **kwargs):
    torch.manual_seed(123)
    return MNTPDataCollator.for_replacement(tokenizer or vocab_tokenizer(), replacement, mask_probability,
                                            vocab_size=VOCAB, **kwargs)


@pytest.mark.parametrize("probability", [0.2, 0.8])
def test_collator_mask_rate_and_labels(probability):
    features = random_features(ragged=True)
    batch = make_collator(mask_probability=probability)(features)
    original = torch.full_like(batch["input_ids"], PAD_ID)
    for row, f in enumerate(features):
        original[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
    labelled = batch["labels"] != IGNORE_INDEX
    maskable = (batch["attention_mask"] == 1) & (original != BOS_ID)
    rate = labelled.sum().item() / maskable.sum().item()
    assert abs(rate - probability) < 0.02, rate
    assert (batch["labels"][labelled] == original[labelled]).all(), "labels are the original ids"
    assert not labelled[~maskable].any(), "special and pad positions are never masked"
    assert (batch["input_ids"][~labelled] == original[~labelled]).all(), "unmasked positions are untouched"
    assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD_ID).all()


def test_collator_default_replacement_is_80_10_10():
    features = random_features(n=128)
    batch = make_collator(mask_probability=0.5)(features)
    original = torch.tensor([f["input_ids"] for f in features])
    labelled = batch["labels"] != IGNORE_INDEX
    got = batch["input_ids"][labelled]
    want = original[labelled]
    n = labelled.sum().item()
    as_mask = (got == MASK_ID).float().mean().item()
    unchanged = (got == want).float().mean().item()
    random = ((got != MASK_ID) & (got != want)).float().mean().item()
    # 8k masked tokens: three standard deviations of a 10% share are under 1%.
    assert n > 5000
    assert abs(as_mask - 0.8) < 0.015 and abs(unchanged - 0.1) < 0.012 and abs(random - 0.1) < 0.012, (
        as_mask, unchanged, random)
    assert ((got >= 0) & (got < VOCAB)).all()


def test_collator_all_mask_replaces_every_masked_token():
    batch = make_collator("all_mask", mask_probability=0.8)(random_features())
    labelled = batch["labels"] != IGNORE_INDEX
    assert (batch["input_ids"][labelled] == MASK_ID).all()
    assert (batch["input_ids"][~labelled] != MASK_ID).all()


@pytest.mark.parametrize("with_special_mask", [False, True])
def test_collator_never_masks_special_ids(with_special_mask):
    """Also where a feature's special_tokens_mask misses them (DataCollatorForLanguageModeling would mask an
    eos inside a concatenated block whose mask says 0 there)."""
    ids = [BOS_ID, EOS_ID] * 50 + list(range(10, 110))
    features = [{"input_ids": ids, **({"special_tokens_mask": [0] * len(ids)} if with_special_mask else {})}
                for _ in range(8)]
    batch = make_collator(mask_probability=1.0)(features)
    labelled = batch["labels"] != IGNORE_INDEX
    assert not labelled[:, :100].any() and labelled[:, 100:].all()


@pytest.mark.parametrize("kwargs,match", [(dict(mask_probability=0.0), "mask_probability"),
                                          (dict(replacement="bert"), "replacement")])
def test_collator_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_collator(**kwargs)


def test_random_replacements_come_from_the_tokenizer_not_the_padded_head_rows():
    tokenizer = vocab_tokenizer(40)  # a tokenizer of 40 tokens for a head padded to VOCAB rows
    collator = make_collator(mask_probability=1.0, tokenizer=tokenizer)
    features = [{"input_ids": [BOS_ID] + list(range(10, 40)) * 4} for _ in range(64)]
    batch = collator(features)
    labelled = batch["labels"] != IGNORE_INDEX
    replaced = batch["input_ids"][labelled & (batch["input_ids"] != MASK_ID) & (batch["input_ids"] != batch["labels"])]
    assert replaced.numel() > 100 and int(replaced.max()) < 40


def test_collator_rejects_ids_outside_vocabulary():
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        make_collator()([{"input_ids": [10, 20, VOCAB + 3]}])


# ---------------------------------------------------------------------------------------------------------------
# Mask token, text blocks, settings
# ---------------------------------------------------------------------------------------------------------------


def test_mask_token_types():
    tok = word_tokenizer(["a", "b"])
    assert resolve_mask_token(tok, "blank") == (tok.convert_tokens_to_ids("_"), False)
    assert resolve_mask_token(tok, "eos") == (tok.eos_token_id, False)
    size = len(tok)
    mask_id, added = resolve_mask_token(tok, "mask")
    assert added and mask_id == size and tok.mask_token == "<mask>"
    with pytest.raises(ValueError, match="'_' as a single token"):
        resolve_mask_token(word_tokenizer(["a"], with_blank=False), "blank")


def test_text_blocks_from_gz_and_jsonl(tmp_path):
    words = [f"w{i}" for i in range(50)]
    tok = word_tokenizer(words)
    text = tmp_path / "a.txt.gz"
    with gzip.open(text, "wt", encoding="utf-8") as handle:
        for i in range(30):
            handle.write(" ".join(words[i:i + 7]) + "\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": " ".join(words[:9])}) for _ in range(4)), encoding="utf-8")
    dataset = load_text_dataset(DataArguments(train_files=[str(text)]))
    blocks = tokenize_into_blocks(dataset, tok, 16)
    assert len(blocks) == (30 * 7) // 16
    assert all(len(ids) == 16 for ids in blocks["input_ids"])
    assert blocks[0]["input_ids"][:7] == tok(" ".join(words[:7]))["input_ids"]
    assert set(blocks.column_names) == {"input_ids", "attention_mask", "special_tokens_mask"}
    other = tokenize_into_blocks(load_text_dataset(DataArguments(train_files=[str(jsonl)], text_column="body")), tok, 9)
    assert len(other) == 4
    with pytest.raises(TextTooShortError, match="fewer than one block"):
        tokenize_into_blocks(dataset, tok, 10_000)
    with pytest.raises(FileNotFoundError, match="training file not found"):
        load_text_dataset(DataArguments(train_files=[str(tmp_path / "missing.txt")]))
    with pytest.raises(ValueError, match="no 'text' field"):
        load_text_dataset(DataArguments(train_files=[str(jsonl)]))


SMOLLM2_CONFIG = REPO_ROOT / "training/mntp/smollm2_135m.json"


@pytest.mark.parametrize(
    "override,match",
    [
        (["--replacement", "bert"], "replacement"),
        (["--mask_probability", "0"], "mask_probability"),
        (["--mask_token_type", "unk"], "mask_token_type"),
        (["--lora_rank", "8"], "lora_rank"),
        (["--learning_rate", "fast"], "invalid float value: 'fast'"),
    ],
)
def test_settings_errors_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        parse_stage_arguments("mntp", SMOLLM2_CONFIG, override)


def test_command_line_overrides_the_config_with_typed_values():
    model, data, mntp, training = parse_stage_arguments(
        "mntp", SMOLLM2_CONFIG, ["--learning_rate", "1e-3", "--max_train_samples", "8", "--merge_adapters",
                                 "--lora_target_modules", "q_proj", "v_proj", "--activation_checkpointing", "false"])
    assert training.learning_rate == 1e-3 and training.max_steps == 200 and training.seed == 42
    assert data.max_train_samples == 8 and model.merge_adapters == [] and model.lora_target_modules == ["q_proj",
                                                                                                        "v_proj"]
    assert training.activation_checkpointing is False and mntp.block_size == 128
    assert parse_stage_arguments("mntp", SMOLLM2_CONFIG, {"max_train_samples": None})[1].max_train_samples is None


def test_old_nested_configs_are_refused_naming_the_new_keys(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model_name_or_path": "m", "output_dir": "o", "data": {"max_train_blocks": 8},
                               "lora": {"r": 8}, "training": {"seed": 1}}))
    with pytest.raises(ValueError, match="old nested format.*max_train_samples.*lora_r.*seed"):
        parse_stage_arguments("mntp", old)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_name_or_path": "m", "output_dir": "o", "bogus": 1}))
    with pytest.raises(ValueError, match="unknown setting.*bogus"):
        parse_stage_arguments("mntp", unknown)


def test_cli_help_lists_every_setting(capsys):
    from llm2vec_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", "mntp", "--help"])
    shown = capsys.readouterr().out
    for name in ("--mask_probability", "--block_size", "--lora_r", "--learning_rate", "--seed", "--output_dir",
                 "--per_device_train_batch_size", "--config"):
        assert name in shown, name


@pytest.mark.parametrize("name", ["smollm2_135m", "meta_llama3_8b", "mistral_7b"])
def test_recipes_load(name):
    model, data, mntp, training = parse_stage_arguments("mntp", REPO_ROOT / f"training/mntp/{name}.json")
    assert model.lora_r == 16 and model.lora_alpha == 32 and model.lora_dropout == 0.05
    if name == "mistral_7b":
        assert mntp.mask_probability == 0.8 and mntp.replacement == "all_mask"
    if name == "meta_llama3_8b":
        assert mntp.mask_probability == 0.2 and mntp.block_size == 512


# ---------------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------------


def tiny_llama_dir(tmp_path, vocab_words, vocab_size=None):
    tok = word_tokenizer(vocab_words)
    model = build_tiny_model("llama", causal_lm=True, vocab_size=vocab_size or len(tok), pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, tie_word_embeddings=False)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_run_config(tmp_path, model_dir, text_file, **top):
    config = {
        "model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "out"), "train_files": [str(text_file)],
        "block_size": 32, "dtype": "float32", "attention_impl": "torch", "activation_checkpointing": True,
        "per_device_train_batch_size": 4, "learning_rate": 3e-3, "lr_scheduler_type": "constant", "max_steps": 30,
        "logging_steps": 1, "save_strategy": "no", "seed": 7, "use_cpu": True,
    }
    config.update(top)
    return config


def train(config):
    return train_mntp(*parse_stage_arguments("mntp", config))


def losses(run):
    return [entry["loss"] for entry in run.log_history if "loss" in entry]


@pytest.mark.slow  # 2 x 30 training steps, the fused loss through Triton's interpreter
def test_tiny_llama_fused_loss_follows_full_logits_loss(tmp_path):
    """30 steps: our fused loss (Triton, interpreter) and the plain full-logits loss give the same curve."""
    words = [f"w{i}" for i in range(110)]
    model_dir = tiny_llama_dir(tmp_path, words)
    gen = torch.Generator().manual_seed(0)
    text = tmp_path / "text.txt"
    # A learnable stream: every sentence walks the vocabulary in steps of 3 from a random start.
    lines = []
    for _ in range(300):
        start = int(torch.randint(0, 110, (1,), generator=gen))
        lines.append(" ".join(words[(start + 3 * j) % 110] for j in range(12)))
    text.write_text("\n".join(lines), encoding="utf-8")
    runs = {}
    for loss in ("fused", "full_logits"):
        config = tiny_run_config(tmp_path / loss, model_dir, text, loss=loss, loss_impl="triton",
                                 mask_probability=0.4)
        runs[loss] = losses(train(config))
    fused, full = torch.tensor(runs["fused"]), torch.tensor(runs["full_logits"])
    assert len(fused) == len(full) == 30
    # Same data, same seeds: the curves agree closely at first; later steps amplify summation-order differences.
    torch.testing.assert_close(fused[:10], full[:10], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused, full, rtol=1e-2, atol=1e-2)
    assert fused[-5:].mean() < fused[:5].mean() - 0.1, fused


def test_text_too_short_fails_before_training(tmp_path, caplog):
    words = [f"w{i}" for i in range(20)]
    model_dir = tiny_llama_dir(tmp_path, words)
    text = tmp_path / "short.txt"
    text.write_text("w1 w2 w3\n", encoding="utf-8")
    config = tiny_run_config(tmp_path, model_dir, text)
    with pytest.raises(TextTooShortError, match="fewer than one block"):
        train(config)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_lm_head_fails_before_training(tmp_path):
    words = [f"w{i}" for i in range(40)]
    model_dir = tiny_llama_dir(tmp_path, words, vocab_size=30)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words * 5), encoding="utf-8")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train(tiny_run_config(tmp_path, model_dir, text))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_mntp_lowers_loss_and_adapter_reloads(tmp_path, smollm2_path, shared_data):
    from peft import PeftModel

    from llm2vec_fast.training.modeling import load_base_model

    run = train_mntp(*parse_stage_arguments("mntp", SMOLLM2_CONFIG, {
        "output_dir": str(tmp_path / "mntp"),
        "train_files": [str(shared_data / "wikitext" / "wikitext-2-raw.test.txt.gz")],
        "max_train_samples": 80, "validation_fraction": 0, "dtype": "float32",
        "activation_checkpointing": False,  # CPU time: no recomputation (checkpointing is tested on the tiny model)
        "max_steps": 20, "per_device_train_batch_size": 2, "learning_rate": 3e-4, "warmup_steps": 0,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "use_cpu": True,
    }))
    curve = torch.tensor(losses(run))
    assert len(curve) == 20 and torch.isfinite(curve).all()
    assert curve[-5:].mean() < curve[:5].mean() - 0.2, curve

    out = tmp_path / "mntp"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    trained = run.trainer.model.body.eval()  # MNTPModel holds the PEFT body
    ids = torch.tensor([[28120, 314, 1345, 79, 260, 3345, 30, 1085]])
    with torch.no_grad():
        want = trained(input_ids=ids).last_hidden_state
        base = load_base_model(smollm2_path, dtype=torch.float32, attention_impl="torch").eval()
        untrained = base(input_ids=ids).last_hidden_state
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()
        got = reloaded(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untrained, want, atol=1e-3), "training changed the model"


@pytest.mark.slow
def test_mntp_model_trains_under_fsdp_on_two_processes(tmp_path):
    """torchrun, 2 gloo processes, torch's FSDP2 with the LM head sharded in the root unit: the head and loss
    live inside the wrapped module, so the sharded training steps give the unsharded model's losses. (On CPU
    accelerate falls back from FSDP to DDP, so the worker applies FSDP2 itself, as accelerate does on GPUs.)"""
    import os
    import subprocess
    import sys

    model_dir = tiny_llama_dir(tmp_path, [f"w{i}" for i in range(60)])
    worker = REPO_ROOT / "tests" / "helpers" / "mntp_fsdp_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(model_dir), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        curves = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert curves["sharded_head"] == "DTensor"
        torch.testing.assert_close(torch.tensor(curves["fsdp"]), torch.tensor(curves["single"]), rtol=1e-4,
                                   atol=1e-5)
        assert curves["fsdp"][-1] < curves["fsdp"][0] - 0.1, curves


def test_unknown_text_file_type_is_refused(tmp_path):
    from llm2vec_fast.training.data import read_file

    path = tmp_path / "rows.tsv"
    path.write_text("a\tb\n1\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_file(path)
