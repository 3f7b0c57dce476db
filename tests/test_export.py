"""Export to a sentence-transformers directory: same embeddings as LLM2Vec.encode, bidirectional wherever it loads,
a clear failure without llm2vec-fast, trainable with sentence-transformers' trainer, and bad input refused."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import slow_except

from llm2vec_fast import LLM2Vec
from llm2vec_fast.export import export_sentence_transformers
from llm2vec_fast.pipeline import hidden_states
from llm2vec_fast.pooling import POOLING_MODES
from llm2vec_fast.prompts import default_prompts

pytest.importorskip("sentence_transformers")

TEXTS = [
    "Rotary position embeddings rotate query and key vectors by an angle that grows with the position.",
    "A short one.",
    "x",
    "LLM2Vec turns a decoder-only language model into a text encoder in three simple steps, without labels.",
    "",
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; a row that is zero in both (the tiny model's EOS embedding is its zero padding row, so
    the empty text embeds to zeros) counts as equal, a row zero in one only as 0."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    both_zero = (np.linalg.norm(a, axis=-1) < 1e-12) & (np.linalg.norm(b, axis=-1) < 1e-12)
    return np.where(both_zero, 1.0, (a * b).sum(-1) / np.maximum(norms, 1e-30))


def _export(encoder, tmp_path, name="st"):
    return str(export_sentence_transformers(encoder, tmp_path / name))


@pytest.fixture(scope="module")
def exported_mean(tiny_smol, tmp_path_factory):
    encoder = LLM2Vec.from_pretrained(tiny_smol, pooling_mode="mean", max_length=64, doc_max_length=48)
    return encoder, str(export_sentence_transformers(encoder, tmp_path_factory.mktemp("export") / "st"))


@pytest.mark.parametrize("pooling_mode", slow_except(POOLING_MODES, "mean", "eos_token"))
def test_sentence_transformer_gives_llm2vec_embeddings(tiny_smol, tmp_path, pooling_mode):
    from sentence_transformers import SentenceTransformer

    encoder = LLM2Vec.from_pretrained(tiny_smol, pooling_mode=pooling_mode)
    model = SentenceTransformer(_export(encoder, tmp_path), trust_remote_code=True, device="cpu")
    assert model[0].encoder.model.config._attn_implementation.startswith("llm2vec_fast")

    ours = encoder.encode(TEXTS, batch_size=2)
    theirs = model.encode(TEXTS, batch_size=3)
    assert theirs.shape == ours.shape
    assert _cosines(theirs, ours).min() >= 0.99999

    instruction = default_prompts()["SciFact"]
    ours = encoder.encode([[instruction, text] for text in TEXTS])
    by_name = model.encode(TEXTS, prompt_name="SciFact")
    by_prompt = model.encode(TEXTS, prompt=instruction)
    assert _cosines(by_name, ours).min() >= 0.99999
    assert _cosines(by_prompt, ours).min() >= 0.99999
    if pooling_mode in ("mean", "weighted_mean"):  # the instruction is left out of pooling, yet changes the states
        assert _cosines(by_name, theirs).min() < 0.99999

    query = model.encode_query(TEXTS[:2])
    document = model.encode_document(TEXTS[:2])
    assert _cosines(query, encoder.encode([[default_prompts()["query"], t] for t in TEXTS[:2]])).min() >= 0.99999
    assert _cosines(document, encoder.encode(TEXTS[:2])).min() >= 0.99999


def test_directory_is_complete(exported_mean):
    encoder, path = exported_mean
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling", "README.md",
            "config_sentence_transformers.json", "llm2vec_config.json", "sentence_bert_config.json"} <= names
    modules = json.loads(open(os.path.join(path, "modules.json")).read())
    assert [m["type"] for m in modules] == ["llm2vec_fast.sentence_transformers.LLM2VecTransformer",
                                           "llm2vec_fast.sentence_transformers.LLM2VecPooling"]
    pooling = json.loads(open(os.path.join(path, "1_Pooling", "config.json")).read())
    assert pooling["pooling_mode_mean_tokens"] is True and pooling["include_prompt"] is False
    assert pooling["word_embedding_dimension"] == encoder.config.hidden_size
    st_config = json.loads(open(os.path.join(path, "config_sentence_transformers.json")).read())
    assert st_config["prompts"]["SciFact"] == default_prompts()["SciFact"]
    assert st_config["prompts"]["document"] == "" and st_config["prompts"]["query"].endswith(": ")
    assert "llm2vec-fast" in st_config["requirements"]
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert config["is_causal"] is False and config["use_bidirectional_attention"] is True
    settings = json.loads(open(os.path.join(path, "llm2vec_config.json")).read())
    assert settings == {"pooling_mode": "mean", "max_length": 64, "doc_max_length": 48, "skip_instruction": True}
    card = open(os.path.join(path, "README.md")).read()
    assert "trust_remote_code=True" in card and "mean" in card
    # The directory is an llm2vec directory too.
    again = LLM2Vec.from_pretrained(path)
    assert _cosines(again.encode(TEXTS), encoder.encode(TEXTS)).min() >= 0.99999


def test_plain_transformers_loads_it_bidirectional(exported_mean):
    """Without our patch, transformers reads is_causal=false: the first token sees the last one, and the states
    equal those of our attention."""
    from transformers import AutoModel

    encoder, path = exported_mean
    plain = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.tensor([encoder.tokenizer("The first token sees the last one")["input_ids"]])
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 7) % plain.config.vocab_size
    with torch.no_grad():
        states = plain(input_ids=ids).last_hidden_state
        assert not torch.allclose(states[0, 0], plain(input_ids=changed).last_hidden_state[0, 0])
        ours = hidden_states(encoder.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(states, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a subprocess that imports sentence-transformers
def test_without_llm2vec_fast_loading_says_to_install_it(exported_mean, tmp_path):
    """A Python where llm2vec-fast is neither importable nor installed (metadata hidden too). ~25 s on the loaded
    2-core machine: a fresh interpreter importing sentence-transformers is the point of the test."""
    _, path = exported_mean
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.metadata, sys

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "llm2vec_fast" or name.startswith("llm2vec_fast."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Hide())
        real_version = importlib.metadata.version
        def version(name):
            if name.replace("_", "-") == "llm2vec-fast":
                raise importlib.metadata.PackageNotFoundError(name)
            return real_version(name)
        importlib.metadata.version = version

        from sentence_transformers import SentenceTransformer
        try:
            SentenceTransformer({path!r}, trust_remote_code=True, device="cpu")
        except ImportError as error:
            print("IMPORT-ERROR:", error)
            sys.exit(3)
        print("LOADED")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "pip install" in result.stdout and "llm2vec-fast" in result.stdout
    assert "LOADED" not in result.stdout


def test_without_trust_remote_code_loading_stops_with_a_message(exported_mean):
    """sentence-transformers >= 6 imports module classes outside its own package only with trust_remote_code
    (sentence_transformers/util/misc.py, import_module_class): without the flag the load stops, naming the
    flag, and nothing causal is returned. Why the directory cannot do without our classes: docs/integrations.md."""
    from sentence_transformers import SentenceTransformer

    _, path = exported_mean
    with pytest.raises(ValueError, match="trust_remote_code=True") as error:
        SentenceTransformer(path, device="cpu")
    assert "llm2vec_fast.sentence_transformers.LLM2VecTransformer" in str(error.value)


def test_sentence_transformers_own_modules_load_without_the_flag_but_miss_llm2vec_instructions(exported_mean,
                                                                                                tmp_path):
    """The evidence for keeping our module classes (docs/integrations.md): sentence-transformers' own Transformer
    and Pooling(include_prompt=False) load without trust_remote_code and, through config.json's is_causal=false,
    run bidirectionally (transformers' SDPA, not our kernel): plain texts give LLM2Vec.encode's embeddings. With an
    instruction they do not: the prompt's tokens are counted by tokenizing it alone, and a BPE tokenizer merges
    the joining space into the text's first word, so that word is left out of pooling too ("x" loses its only
    token). Should a sentence-transformers release close the gap, this fails, and the export can switch."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    encoder, path = exported_mean
    text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}  # no chat template
    transformer = Transformer(path, model_kwargs={"dtype": torch.float32}, module_output_name="token_embeddings",
                              modality_config=text_only)
    native = SentenceTransformer(modules=[transformer, Pooling(encoder.config.hidden_size, pooling_mode="mean",
                                                               include_prompt=False)], device="cpu")
    native.save(str(tmp_path / "native"))
    reloaded = SentenceTransformer(str(tmp_path / "native"), device="cpu")  # no trust_remote_code needed
    assert reloaded[0].auto_model.config.is_causal is False
    texts = TEXTS[:4]  # not the empty text: pooled whole by llm2vec-fast, nothing by sentence-transformers
    assert _cosines(reloaded.encode(texts), encoder.encode(texts)).min() >= 0.99999
    instruction = default_prompts()["SciFact"]
    with_prompt = _cosines(reloaded.encode(texts, prompt=instruction),
                           encoder.encode([[instruction, text] for text in texts]))
    assert np.nan_to_num(with_prompt, nan=0.0).min() < 0.999


@pytest.mark.slow
def test_sentence_transformers_trainer_fine_tunes_it(exported_mean, tmp_path, monkeypatch):
    """A few MultipleNegativesRankingLoss steps with SentenceTransformerTrainer: our attention is in the graph
    (called with inputs that need gradients), the weights move, and the trained model saves and reloads. ~25 s
    here, nearly all of it the trainer's own set-up (accelerate, datasets), not the 3 tiny steps."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    patching = importlib.import_module("llm2vec_fast.attention_adapter")  # where patched models call the kernel

    _, path = exported_mean
    model = SentenceTransformer(path, trust_remote_code=True, device="cpu")
    calls = []
    real = patching.bidirectional_attention

    def counting(q, k, v, **kwargs):
        calls.append(q.requires_grad)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(patching, "bidirectional_attention", counting)
    pairs = Dataset.from_dict({
        "anchor": ["What is RoPE?", "Who wrote LLM2Vec?", "How do transformers attend?", "What is SimCSE?"] * 2,
        "positive": ["Rotary position embeddings.", "BehnamGhader et al. wrote it.", "With attention heads.",
                     "Contrastive learning with dropout noise."] * 2,
    })
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, seed=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs,
                                         loss=MultipleNegativesRankingLoss(model))
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert any(calls), "our attention never ran with gradients"
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(moved) > len(before) // 2

    monkeypatch.setattr(patching, "bidirectional_attention", real)
    model.save(str(tmp_path / "trained"))
    reloaded = SentenceTransformer(str(tmp_path / "trained"), trust_remote_code=True, device="cpu")
    assert _cosines(reloaded.encode(TEXTS), model.encode(TEXTS)).min() >= 0.99999
    assert json.loads(open(tmp_path / "trained" / "config.json").read())["is_causal"] is False


def test_export_refuses_a_non_empty_output_and_writes_nothing(exported_mean, tmp_path):
    encoder, _ = exported_mean
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_sentence_transformers(encoder, target)
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["taken"]  # no staging directory left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    export_sentence_transformers(encoder, empty)
    assert (empty / "modules.json").is_file()


def test_export_refuses_an_architecture_without_bidirectional_attention(tmp_path):
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32)).eval()
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]")
    encoder = LLM2Vec(bert, tokenizer)
    with pytest.raises(ValueError, match="cannot export BertModel as a bidirectional encoder"):
        export_sentence_transformers(encoder, tmp_path / "bert")
    assert not (tmp_path / "bert").exists()


def test_export_cli(tiny_smol, tmp_path, capsys):
    from llm2vec_fast.cli import main

    assert main(["export", "--model", tiny_smol, "--pooling-mode", "last_token", "--max-length", "32",
                 "--output", str(tmp_path / "cli")]) == 0
    pooling = json.loads((tmp_path / "cli" / "1_Pooling" / "config.json").read_text())
    assert pooling["llm2vec_pooling_mode"] == "last_token" and pooling["pooling_mode_lasttoken"] is True
    capsys.readouterr()
    # The program turns the library's FileExistsError into one line and exit code 1; nothing is overwritten.
    assert main(["export", "--model", tiny_smol, "--output", str(tmp_path / "cli")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


def test_export_merges_an_adapter_and_leaves_the_encoder_as_it_was(tiny_smol, tmp_path):
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from llm2vec_fast import is_patched

    torch.manual_seed(1)
    lora = get_peft_model(AutoModel.from_pretrained(tiny_smol),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    encoder = LLM2Vec.from_pretrained(tiny_smol, peft_model_name_or_path=str(tmp_path / "adapter"))
    assert hasattr(encoder.model, "merge_and_unload")
    plain = LLM2Vec.from_pretrained(tiny_smol)
    assert _cosines(encoder.encode(TEXTS[:2]), plain.encode(TEXTS[:2])).max() < 0.9999  # the adapter matters

    path = export_sentence_transformers(encoder, tmp_path / "st", adapters=[str(tmp_path / "adapter")])
    assert hasattr(encoder.model, "merge_and_unload") and is_patched(encoder.model)
    model = SentenceTransformer(str(path), trust_remote_code=True, device="cpu")
    assert _cosines(model.encode(TEXTS), encoder.encode(TEXTS)).min() >= 0.99999
    assert str(tmp_path / "adapter") in (path / "README.md").read_text()


def test_the_card_names_the_matryoshka_dims_the_adapter_was_trained_with(tiny_smol, tmp_path):
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    adapter = tmp_path / "simcse"
    get_peft_model(AutoModel.from_pretrained(tiny_smol), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        adapter)
    # What run_training writes beside a contrastive adapter: every setting the run used.
    (adapter / "simcse_settings.json").write_text(json.dumps({"matryoshka_dims": [48, 16], "scale": 20.0}))
    encoder = LLM2Vec.from_pretrained(tiny_smol, peft_model_name_or_path=str(adapter))
    path = export_sentence_transformers(encoder, tmp_path / "st", adapters=[str(adapter)])
    card = (path / "README.md").read_text()
    assert "matryoshka_dims=[48, 16]" in card and "truncate_dim=16" in card
    # What the card says works: sentence-transformers' truncate_dim gives the leading dimensions.
    model = SentenceTransformer(str(path), trust_remote_code=True, device="cpu", truncate_dim=16)
    full = encoder.encode(TEXTS[:2])
    np.testing.assert_allclose(model.encode(TEXTS[:2]), full[:, :16], rtol=1e-4, atol=1e-5)
    # Without Matryoshka training the card says nothing of it; dims given to the export are written too.
    plain = export_sentence_transformers(LLM2Vec.from_pretrained(tiny_smol), tmp_path / "plain")
    assert "Matryoshka" not in (plain / "README.md").read_text()
    given = export_sentence_transformers(LLM2Vec.from_pretrained(tiny_smol), tmp_path / "given",
                                         matryoshka_dims=[32, 8])
    assert "matryoshka_dims=[32, 8]" in (given / "README.md").read_text()
