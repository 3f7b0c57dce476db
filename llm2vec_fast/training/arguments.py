"""Stage settings: dataclasses parsed by ``HfArgumentParser`` (transformers' examples, llm2vec's
``experiments/run_*.py``), one schema for every stage: :class:`ModelArguments`, :class:`DataArguments`, the
stage's own arguments and Hugging Face's ``TrainingArguments`` (seed, batch size, output_dir, steps...).

A config is a flat JSON object of these fields (like llm2vec's ``train_configs``); ``--name value`` options on
the command line override it: ``llm2vec-fast train mntp --config training/mntp/smollm2_135m.json
--learning_rate 1e-4``. ``llm2vec-fast train mntp --help`` lists every setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from ..dtypes import MODEL_DTYPES
from ..kernels._dispatch import IMPLEMENTATIONS
from ..pooling import check_pooling_mode
from .losses import check_matryoshka
from .modeling import DEFAULT_LORA_TARGETS

MASK_TOKEN_TYPES = ("blank", "eos", "mask")
REPLACEMENTS = ("default", "all_mask")
LOSSES = ("fused", "full_logits")
NULL = "null"  # how a command line sets an optional setting back to None ("none" is a value for some)


def _field(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any):
    """A settings field: its ``--help`` text and argparse's ``choices`` in the metadata ``HfArgumentParser``
    reads; a list default is copied for every instance."""
    metadata = {"help": help, **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_MAX_WALL_SECONDS = ("stop the training loop cleanly after this many seconds (model loading not counted), save the "
                     "adapter and record steps done of planned in training_progress.json; null: no limit")


def check_max_wall_seconds(value) -> None:
    """The stages' ``max_wall_seconds``: None (no limit) or a positive number of seconds (not a bool, not NaN).
    The one check, for the config dataclasses and :class:`~llm2vec_fast.training.trainer.WallClockGuard`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"max_wall_seconds must be a positive number of seconds or null, got {value!r}")


@dataclass
class ModelArguments:
    model_name_or_path: str = _field(help="hub id, local directory or 'smollm2-135m'")
    merge_adapters: list[str] = _field([], "earlier stages' adapters merged into the base first")
    dtype: str = _field("auto", "model dtype; auto: bf16 where the device has it, else fp32", choices=MODEL_DTYPES)
    attention_impl: str = _field("auto", "our attention kernel; auto: Triton on CUDA, PyTorch SDPA elsewhere",
                                 choices=IMPLEMENTATIONS)
    attention_dropout: float | None = _field(None, "attention dropout (SimCSE: 0.3)")
    lora_r: int = _field(16, "LoRA rank")
    lora_alpha: int = _field(32, "LoRA alpha")
    lora_dropout: float = _field(0.05, "LoRA dropout")
    lora_target_modules: list[str] = _field(list(DEFAULT_LORA_TARGETS), "module names LoRA adapts")


@dataclass
class DataArguments:
    train_files: list[str] = _field([], "text (.txt), JSON lines (.jsonl) or CSV files, optionally .gz; relative to "
                                        "the current directory")
    dataset_name: str | None = _field(None, "or a datasets.load_dataset name (MNTP)")
    dataset_config_name: str | None = _field(None, "the dataset's configuration")
    dataset_split: str = _field("train", "the dataset's split")
    text_column: str = _field("text", "the text field of JSON lines / the dataset column")
    max_train_samples: int | None = _field(None, "keep the first N training samples (MNTP: blocks; SimCSE: "
                                                 "sentences; supervised: valid rows)")
    num_proc: int | None = _field(None, "tokenization processes")

    def __post_init__(self):
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be a positive integer or null, got {self.max_train_samples}")


@dataclass
class MNTPArguments:
    block_size: int = _field(512, "tokens per block (llm2vec's max_seq_length)")
    validation_fraction: float = _field(0.0, "held-out share of the blocks for evaluation")
    mask_probability: float = _field(0.2, "share of tokens masked (llm2vec's mlm_probability)")
    replacement: str = _field("default", "default: 80/10/10 mask/random/unchanged; all_mask: every masked token "
                                         "becomes the mask token", choices=REPLACEMENTS)
    mask_token_type: str = _field("blank", "blank ('_'), eos, or mask (an added '<mask>' token)",
                                  choices=MASK_TOKEN_TYPES)
    loss: str = _field("fused", "fused: our kernel, no (tokens, vocab) logits; full_logits: plain LM head + "
                                "cross-entropy", choices=LOSSES)
    loss_impl: str = _field("auto", "the fused loss's impl; auto: Triton on CUDA, chunked PyTorch elsewhere",
                            choices=IMPLEMENTATIONS)
    max_wall_seconds: float | None = _field(None, _MAX_WALL_SECONDS)

    def __post_init__(self):
        if not 0.0 < self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in (0, 1], got {self.mask_probability}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {self.block_size}")
        check_max_wall_seconds(self.max_wall_seconds)


@dataclass
class ContrastiveArguments:
    pooling_mode: str = _field("mean", "mean, weighted_mean, eos_token or bos_token")
    max_length: int = _field(128, "tokens per text, instruction included")
    doc_max_length: int = _field(400, "the encoder's doc_max_length written to llm2vec_config.json (training cuts "
                                      "texts at max_length)")
    chunk_size: int | None = _field(None, "GradCache chunk (texts per forward); null: the whole batch at once")
    packed: bool = _field(True, "texts back to back without padding (varlen attention); false: left-padded batches")
    scale: float = _field(20.0, "InfoNCE scale (1 / temperature)")
    loss_impl: str = _field("auto", "InfoNCE impl; auto: Triton on CUDA, PyTorch elsewhere", choices=IMPLEMENTATIONS)
    gather_across_ranks: bool = _field(True, "with several processes, score every query against the global batch")
    no_duplicates: bool = _field(True, "no text twice in one global batch (sentence-transformers' NO_DUPLICATES); "
                                       "rows that would repeat one wait for a later batch (counted, logged); false: "
                                       "llm2vec's batches")
    mask_false_negatives: bool = _field(True, "leave out of each query's softmax the documents that are the same "
                                              "text as its positive (text hashes from the collator, gathered across "
                                              "ranks); false: llm2vec's loss")
    max_wall_seconds: float | None = _field(None, _MAX_WALL_SECONDS)
    csv_dataset: str = _field("allnli", "the dataset name of rows of a triplet CSV")
    dataset_from_file_name: bool = _field(False, "rows without 'dataset' take their file's name (llm2vec's "
                                                 "echo-data layout)")
    hard_negatives: bool = _field(True, "every row must have a negative; false: in-batch negatives only")
    skip_bad_rows: bool = _field(False, "false: a row missing a field or with an empty text is an error; true: "
                                        "skipped and counted")
    instructions: dict | str | None = _field(None, "JSON object dataset -> instruction (or list), added to E5's")
    matryoshka_dims: list[int] | None = _field(None, "Matryoshka training: leading dimensions, strictly decreasing "
                                                     "(e.g. 4096 1024 256 64); the InfoNCE loss is summed over the "
                                                     "embeddings truncated to each; null: plain InfoNCE")
    matryoshka_weights: list[float] | None = _field(None, "one weight per matryoshka_dims entry "
                                                          "(sentence-transformers' MatryoshkaLoss); null: 1 each")

    def __post_init__(self):
        check_pooling_mode(self.pooling_mode)
        if isinstance(self.instructions, str):
            self.instructions = json.loads(self.instructions)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows or null, got {self.chunk_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        # `--matryoshka_dims null` parses as [None]; the embedding size is checked once the model's config is read.
        self.matryoshka_dims = None if self.matryoshka_dims in (None, [None]) else self.matryoshka_dims
        self.matryoshka_weights = None if self.matryoshka_weights in (None, [None]) else self.matryoshka_weights
        check_matryoshka(self.matryoshka_dims, self.matryoshka_weights)
        check_max_wall_seconds(self.max_wall_seconds)


STAGE_ARGUMENTS = {"mntp": MNTPArguments, "simcse": ContrastiveArguments, "supervised": ContrastiveArguments}
# Each stage's defaults where they differ from the dataclasses' (llm2vec's train_configs and run_*.py).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mntp": {"activation_checkpointing": True, "prediction_loss_only": True},
    "simcse": {"learning_rate": 3e-5, "max_steps": 1000, "logging_steps": 50, "save_steps": 200,
               "per_device_train_batch_size": 128, "attention_dropout": 0.3},
    "supervised": {"learning_rate": 2e-4, "warmup_steps": 300, "max_steps": 1000, "logging_steps": 50,
                   "save_steps": 200, "per_device_train_batch_size": 512, "chunk_size": 64, "max_length": 512,
                   "scale": 50.0},
}
# The nested configs of before, section.key -> the flat name; keys not listed keep their name.
OLD_KEYS = {"data.max_train_blocks": "max_train_samples", "data.max_sentences": "max_train_samples",
            "data.max_rows": "max_train_samples", "data.block_size": "block_size",
            "data.validation_fraction": "validation_fraction", "batch_size": "per_device_train_batch_size",
            "gradient_checkpointing": "activation_checkpointing"}
OLD_SECTIONS = {"data": "", "training": "", "lora": "lora_"}


class _Parser(HfArgumentParser):
    """Errors as exceptions (library code raises; only cli.py exits)."""

    def error(self, message):
        raise ValueError(message)


def stage_parser(stage: str, **kwargs) -> HfArgumentParser:
    """The stage's parser, its stage defaults set; optional settings take ``null``, lists may be empty."""
    if stage not in STAGE_ARGUMENTS:
        raise ValueError(f"unknown stage {stage!r}; stages are {sorted(STAGE_ARGUMENTS)}")
    dataclass_types = (ModelArguments, DataArguments, STAGE_ARGUMENTS[stage], TrainingArguments)
    parser = _Parser(dataclass_types, **kwargs)
    _loosen(parser, dataclass_types)
    parser.set_defaults(**STAGE_DEFAULTS[stage])
    return parser


def _loosen(parser: argparse.ArgumentParser, dataclass_types) -> None:
    hints = {}
    for dtype in dataclass_types:
        hints.update(typing.get_type_hints(dtype))
    for action in parser._actions:  # argparse has no public way to visit the actions it holds
        hint = hints.get(action.dest)
        if hint is None:
            continue
        if action.nargs == "+":
            action.nargs = "*"
        if type(None) in typing.get_args(hint) and action.type is not None:
            action.type = _nullable(action.type)


def _nullable(convert):
    def parse(text: str):
        return None if text == NULL else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


def setting_names(stage: str) -> set[str]:
    return {f.name for dtype in (ModelArguments, DataArguments, STAGE_ARGUMENTS[stage], TrainingArguments)
            for f in dataclasses.fields(dtype)}


def flat_old_config(config: dict[str, Any]) -> dict[str, Any]:
    """A nested config of before (``data``/``lora``/``training`` sections) as the flat settings it means."""
    flat = {}
    for key, value in config.items():
        if key in OLD_SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                flat[OLD_KEYS.get(f"{key}.{inner}", OLD_SECTIONS[key] + inner)] = inner_value
        else:
            flat[OLD_KEYS.get(key, key)] = value
    return flat


def read_config(path: str | Path | None, stage: str) -> dict[str, Any]:
    """A flat JSON config; an old nested one is refused with the flat keys it should use."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    flat = flat_old_config(config)
    if flat.keys() != config.keys():
        renamed = {key: value for key, value in flat.items() if key not in config}
        raise ValueError(f"config file {path} is in the old nested format; settings are flat now. Use: "
                         f"{json.dumps(renamed)} (keys {', '.join(sorted(renamed))})")
    unknown = sorted(set(config) - setting_names(stage))
    if unknown:
        raise ValueError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; see "
                         f"`llm2vec-fast train {stage} --help`")
    return config


def to_argv(settings: dict[str, Any]) -> list[str]:
    """``{"learning_rate": 1e-4, "train_files": ["a", "b"]}`` -> ``["--learning_rate", "0.0001", "--train_files",
    "a", "b"]``: config values go through the same parsing (and type checks) as the command line's."""
    argv = []
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", "null" if value is None else str(value).lower() if isinstance(value, bool)
                     else str(value)]
    return argv


def parse_stage_arguments(stage: str, config: str | Path | dict[str, Any] | None = None,
                          overrides: dict[str, Any] | list[str] | None = None):
    """``(ModelArguments, DataArguments, MNTPArguments | ContrastiveArguments, TrainingArguments)`` from a flat
    config (file or dict) and overrides (a dict, or command-line words such as ``["--learning_rate", "1e-4"]``)."""
    settings = read_config(config, stage) if not isinstance(config, dict) else dict(config)
    if isinstance(overrides, dict):
        settings.update(overrides)
        overrides = None
    parser = stage_parser(stage)
    try:
        model, data, stage_args, training = parser.parse_args_into_dataclasses(
            args=to_argv(settings) + list(overrides or []))
    except TypeError as error:
        raise ValueError(f"bad {stage} setting: {error}") from None
    if not training.output_dir:
        raise ValueError("output_dir is required")
    return model, data, stage_args, training


def resolved_settings(stage: str, config: str | Path | dict[str, Any] | None,
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a config and overrides give, each typed as the stage reads it, defaults left out: what
    "the same settings" means for the recipe's staleness check (a reformatted file gives the same)."""
    settings = read_config(config, stage) if not isinstance(config, dict) else flat_old_config(config)
    settings.update(overrides or {})
    parser = stage_parser(stage)
    namespace = vars(parser.parse_known_args(["--model_name_or_path", "-", *to_argv(settings)])[0])
    unknown = sorted(set(settings) - set(namespace))
    if unknown:
        raise ValueError(f"unknown {stage} setting(s): {', '.join(unknown)}")
    return {key: namespace[key] for key in settings}


def add_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """``--config FILE`` and every setting as an option, for the ``llm2vec-fast train <stage>`` subcommand.

    An option given on the command line overrides the config; one not given leaves the config's value."""
    parser.add_argument("--config", default=None, help="flat JSON settings, e.g. training/mntp/smollm2_135m.json")
    source = stage_parser(stage)
    for action in source._actions:
        if not action.option_strings or action.dest == "help":
            continue
        action.help = f"{action.help or ''} (default: {action.default})"
        action.default, action.required = argparse.SUPPRESS, False
        parser._add_action(action)


def overrides_from(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """The settings given on the command line (the parsed ``llm2vec-fast train <stage>`` options)."""
    names = setting_names(stage)
    return {key: value for key, value in vars(args).items() if key in names}


def stage_command(stage: str, train):
    """``(add_arguments, main)`` of ``llm2vec-fast train <stage>``: its options, and ``train(model_args, data_args,
    stage_args, training_args)`` on the config and the options given."""
    def main(args: argparse.Namespace) -> int:
        train(*parse_stage_arguments(stage, args.config, overrides_from(args, stage)))
        return 0

    return functools.partial(add_arguments, stage=stage), main
