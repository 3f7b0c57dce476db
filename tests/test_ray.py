"""Ray Data: ``llm2vec_fast.ray.EmbedBatch`` gives ``encode_corpus``'s embeddings, called directly and as the
class of ``map_batches`` on a local Ray instance with 2 CPU actors; a batch without its columns is an error
naming them."""

from __future__ import annotations

import json

import numpy as np
import pytest

TEXTS = [f"Row {i}: {'a few words ' * (i % 5)}about something." for i in range(30)]
TEXTS[7] = ""
IDS = [f"doc-{i}" for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def corpus_run(tiny_model_dir, tmp_path_factory):
    """The same rows through ``encode_corpus`` (truncated and normalized): (input .jsonl, embeddings, ids)."""
    from llm2vec_fast.corpus import CorpusSettings, encode_corpus, load_output

    root = tmp_path_factory.mktemp("corpus")
    source = root / "input.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(IDS, TEXTS)), encoding="utf-8")
    settings = CorpusSettings(model=tiny_model_dir, batch_size=4, shard_size=16, attention_impl="torch",
                              truncate_dim=48, normalize=True)
    encode_corpus(source, root / "out", settings)
    vectors, ids = load_output(root / "out")
    return source, vectors, ids


OPTIONS = {"batch_size": 4, "attention_impl": "torch", "truncate_dim": 48, "normalize": True}


def test_a_batch_gives_encode_corpus_embeddings_in_numpy_and_arrow(tiny_model_dir, corpus_run):
    import pandas as pd
    import pyarrow as pa

    from llm2vec_fast.ray import EmbedBatch

    _, expected, ids = corpus_run
    embed = EmbedBatch(tiny_model_dir, **OPTIONS)
    out = embed({"id": np.array(IDS[3:20], dtype=object), "text": np.array(TEXTS[3:20], dtype=object)})
    assert set(out) == {"id", "embedding"} and list(out["id"]) == ids[3:20]
    assert out["embedding"].shape == (17, 48) and out["embedding"].dtype == np.float32
    np.testing.assert_allclose(out["embedding"], expected[3:20], rtol=1e-4, atol=1e-5)
    # A pandas batch too, keeping a column.
    frame = pd.DataFrame({"id": IDS[:5], "text": TEXTS[:5], "lang": ["en"] * 5})
    out = EmbedBatch(tiny_model_dir, keep_columns=["lang"], **OPTIONS)(frame)
    assert list(out["lang"]) == ["en"] * 5
    np.testing.assert_allclose(out["embedding"], expected[:5], rtol=1e-4, atol=1e-5)

    arrow = EmbedBatch(tiny_model_dir, output_format="arrow", **OPTIONS)({"id": IDS[:6], "text": TEXTS[:6]})
    assert isinstance(arrow, pa.Table) and arrow.schema.field("embedding").type == pa.list_(pa.float32(), 48)
    np.testing.assert_allclose(np.stack(arrow.column("embedding").to_numpy(zero_copy_only=False)), expected[:6],
                               rtol=1e-4, atol=1e-5)


def test_a_batch_without_its_columns_or_with_a_non_text_is_an_error_naming_them(tiny_model_dir):
    from llm2vec_fast.ray import EmbedBatch, MissingColumnError

    embed = EmbedBatch(tiny_model_dir, attention_impl="torch")
    with pytest.raises(MissingColumnError, match=r"no column 'text' \(text_column\); its columns are \['body', 'id'\]"):
        embed({"id": np.array(["a"]), "body": np.array(["hello"])})
    with pytest.raises(MissingColumnError, match=r"no column 'id' \(id_column\); its columns are \['text'\]"):
        embed({"text": np.array(["hello"])})
    try:
        embed({"body": np.array(["hello"])})
    except KeyError as error:  # a KeyError, whose message reads as a sentence, not as a quoted key
        assert str(error).startswith("the batch has no column 'text'")
    with pytest.raises(ValueError, match=r"column 'text' of id 'b' is null, not a string"):
        embed({"id": np.array(["a", "b"], dtype=object), "text": np.array(["hello", None], dtype=object)})
    with pytest.raises(ValueError, match=r"precision 'int8' needs ranges"):
        EmbedBatch(tiny_model_dir, attention_impl="torch", precision="int8")
    with pytest.raises(ValueError, match=r"truncate_dim 65 is larger than the embedding size 64"):
        EmbedBatch(tiny_model_dir, attention_impl="torch", truncate_dim=65)
    with pytest.raises(ValueError, match=r"unknown prompt_name 'nope'"):
        EmbedBatch(tiny_model_dir, attention_impl="torch", prompt_name="nope")


def test_the_encoder_is_set_up_as_encode_corpus_sets_it_up_compile_included(tiny_model_dir, monkeypatch):
    from llm2vec_fast import corpus
    from llm2vec_fast.encoder import LLM2Vec
    from llm2vec_fast.ray import EmbedBatch

    setups, compiled = [], []
    prepare = corpus.prepare_encoder
    monkeypatch.setattr(corpus, "prepare_encoder", lambda settings, encoder=None: setups.append(settings) or prepare(
        settings, encoder))
    monkeypatch.setattr(LLM2Vec, "compile_model", lambda self, backend="inductor": compiled.append(backend) or self)
    embed = EmbedBatch(tiny_model_dir, compile=True, prompt_name="query", **OPTIONS)
    assert compiled == ["inductor"] and setups == [embed.settings] and embed.settings.compile is True
    assert embed.instruction == embed.encoder.prompts["query"]
    with pytest.raises(TypeError, match=r"EmbedBatch takes no \['shard_size'\]"):
        EmbedBatch(tiny_model_dir, shard_size=10, **OPTIONS)


@pytest.mark.slow
def test_map_batches_with_two_actors_equals_encode_corpus(tiny_model_dir, corpus_run, tmp_path):
    ray = pytest.importorskip("ray", reason="ray not installed")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm2vec_fast.ray import EmbedBatch

    source, expected, ids = corpus_run
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # Two actors of half a CPU each leave a CPU for the read task (whole-CPU actors would take both).
        ds = ray.data.read_json(str(source)).map_batches(
            EmbedBatch, fn_constructor_kwargs={"model": tiny_model_dir, "output_format": "arrow", **OPTIONS},
            batch_size=8, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)
        ds.write_parquet(str(tmp_path / "embeddings"))
        stats = ds.stats()
        table = pq.read_table(tmp_path / "embeddings")
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 48)
        got = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_numpy(zero_copy_only=False)))
        assert sorted(got) == sorted(ids) and len(table) == len(ids)
        np.testing.assert_allclose(np.stack([got[i] for i in ids]), expected, rtol=1e-4, atol=1e-5)

        # Ray's own tensor column (numpy output), from in-memory rows.
        rows = ray.data.from_items([{"id": i, "text": t} for i, t in zip(IDS, TEXTS)]).map_batches(
            EmbedBatch, fn_constructor_kwargs={"model": tiny_model_dir, **OPTIONS}, batch_size=8,
            compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5).take_all()
        got = {row["id"]: row["embedding"] for row in rows}
        np.testing.assert_allclose(np.stack([got[i] for i in ids]), expected, rtol=1e-4, atol=1e-5)
    finally:
        ray.shutdown()
    assert "MapBatches(EmbedBatch)" in stats
