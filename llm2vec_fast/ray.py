"""Ray Data: a corpus that outgrows one machine, encoded by actors across a cluster.

``EmbedBatch`` is the callable class for ``ray.data.Dataset.map_batches``: Ray builds it once per actor (the
encoder loads in ``__init__``, on the actor's GPU where it has one) and calls it on each batch::

    import ray
    from llm2vec_fast.ray import EmbedBatch

    ds = ray.data.read_parquet("corpus/")                 # or read_json("corpus.jsonl")
    ds = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model": "smollm2-135m", "text_column": "text",
                                                           "id_column": "id"},
                        batch_size=256, compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1)  # a GPU each
    ds.write_parquet("embeddings/")

A batch is a dict of columns (Ray's default numpy format; pandas and pyarrow batches are taken too); the result
is ``{id_column: ids, *keep_columns, embedding_column: (n, dim) array}`` (or the same as a ``pyarrow.Table``
with ``output_format="arrow"``). The embeddings are those of
``encode_corpus`` with the same settings (the same text preparation, truncation, normalization and precision;
equal to float tolerance, since the batches hold other texts), so that a corpus encoded with Ray and one
encoded with ``llm2vec-fast encode`` can be searched together.

Ray itself is not imported here: the class is plain Python (``pip install 'llm2vec-fast[ray]'`` for Ray).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import corpus
from .corpus import CorpusSettings, embed_texts, embedding_column, stored_embeddings

OUTPUT_FORMATS = ("numpy", "arrow")
# CorpusSettings' fields that say how a file is read or a run is written, which a batch has no use for.
_RUN_ONLY = ("text_field", "id_field", "calibration_rows", "format", "shard_size", "on_bad_row", "max_bad_rows")


class MissingColumnError(KeyError):
    """A batch without a column that ``EmbedBatch`` was told to read (the message names it and those present)."""

    def __str__(self) -> str:  # KeyError's own would show the message quoted, as a key
        return str(self.args[0])


def _columns(batch: Any) -> dict[str, Any]:
    """A batch in any of Ray's formats as a dict of columns."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if hasattr(batch, "column_names") and hasattr(batch, "column"):  # pyarrow.Table
        return {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
    if hasattr(batch, "columns") and hasattr(batch, "__getitem__"):  # pandas.DataFrame
        return {str(name): batch[name].to_numpy() for name in batch.columns}
    raise TypeError(f"a batch must be a dict of columns, a pandas DataFrame or a pyarrow Table, got "
                    f"{type(batch).__name__}")


class EmbedBatch:
    """Texts of a batch -> their embeddings, with an encoder built once (see the module docstring).

    ``model``, ``adapters`` and the keyword ``settings`` are ``CorpusSettings``' fields (``prompt_name``,
    ``batch_size``, ``truncate_dim``, ``normalize``, ``precision``, ``device``, ``compile``, ...), and the encoder is
    set up by ``encode_corpus``'s code (``corpus.prepare_encoder``). int8/uint8 need ``ranges``: a ``(2, dim)``
    array or the path of a run's ``quantization-ranges.npy`` (a batch's own range would differ from batch to
    batch). ``output_format``: ``numpy`` (the embeddings as an ``(n, dim)`` array, Ray's tensor column) or
    ``arrow`` (a ``pyarrow.Table`` with the fixed-size list column of ``encode_corpus``'s Parquet shards)."""

    def __init__(self, model: str, adapters: Sequence[str] = (), *, text_column: str = "text",
                 id_column: str | None = "id", embedding_column: str = "embedding", keep_columns: Sequence[str] = (),
                 ranges: Any = None, output_format: str = "numpy", **settings: Any):
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        unused = sorted(set(settings) & set(_RUN_ONLY))
        if unused:
            raise TypeError(f"EmbedBatch takes no {unused}: they are settings of a corpus run (the columns are "
                            f"text_column and id_column)")
        if embedding_column in (text_column, id_column, *keep_columns):
            raise ValueError(f"embedding_column {embedding_column!r} is also an input column it would overwrite")
        self.settings = CorpusSettings(model=model, adapters=list(adapters), **settings)
        self.settings.validate()
        self.output_format, self.text_column, self.id_column = output_format, text_column, id_column
        self.embedding_column, self.keep_columns = embedding_column, list(keep_columns)
        corpus.check_model(self.settings)  # a model name that names nothing fails in one line, before loading
        self.encoder, self.device, self.instruction = corpus.prepare_encoder(self.settings)
        self.width = self.settings.truncate_dim or int(self.encoder.model.config.hidden_size)
        self.ranges = None
        if self.settings.precision in ("int8", "uint8"):
            if ranges is None:
                raise ValueError(f"precision {self.settings.precision!r} needs ranges: a (2, dim) array, or the "
                                 f"quantization-ranges.npy of an llm2vec-fast encode run with --precision "
                                 f"{self.settings.precision}")
            self.ranges = np.load(ranges) if isinstance(ranges, (str, Path)) else np.asarray(ranges, np.float32)
            if self.ranges.shape != (2, self.width):
                raise ValueError(f"ranges must be (2, {self.width}) for embeddings of {self.width} dimensions, got "
                                 f"{self.ranges.shape}")

    def __call__(self, batch: Any) -> dict[str, Any]:
        columns = _columns(batch)
        for role, name in (("text_column", self.text_column), ("id_column", self.id_column),
                           *(("keep_columns", c) for c in self.keep_columns)):
            if name is not None and name not in columns:
                raise MissingColumnError(f"the batch has no column {name!r} ({role}); its columns are "
                                         f"{sorted(columns)}")
        texts = list(columns[self.text_column])
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                where = (f"id {columns[self.id_column][position]!r}" if self.id_column is not None
                         else f"batch row {position}")
                raise ValueError(f"column {self.text_column!r} of {where} is "
                                 f"{'null' if text is None else type(text).__name__}, not a string")
        vectors = (embed_texts(self.encoder, self.settings, self.instruction, texts, self.device)[0] if texts
                   else np.zeros((0, self.width), np.float32))
        result = {name: columns[name] for name in ([self.id_column] if self.id_column else []) + self.keep_columns}
        embeddings = stored_embeddings(vectors, self.settings, self.ranges)
        if self.output_format == "numpy":
            result[self.embedding_column] = embeddings
            return result
        import pyarrow as pa

        table = {name: pa.array(list(values) if isinstance(values, np.ndarray) and values.dtype == object else values)
                 for name, values in result.items()}
        table[self.embedding_column] = embedding_column(embeddings)
        return pa.table(table)
