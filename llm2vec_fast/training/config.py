"""Recipe configs: one JSON file per recipe, overridden from the command line with ``--set key=value``."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["lr=3e-5", "lora.r=8", "name=abc"]`` -> ``{"lr": 3e-05, "lora.r": 8, "name": "abc"}``.

    Values are read as JSON where they parse as JSON, otherwise kept as strings.
    """
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[key.strip()] = value
    return overrides


def _set_dotted(config: dict[str, Any], dotted_key: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted_key!r}: {part!r} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a JSON config (or start empty) and apply ``key=value`` overrides; dotted keys reach into sections."""
    config: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
    for key, value in parse_overrides(overrides).items():
        _set_dotted(config, key, value)
    return config


def config_to_dataclass(cls: type[T], config: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, naming every unknown key instead of ignoring it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in config.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_to_dataclass(hint, value)
        values[name] = value
    return cls(**values)


def add_config_arguments(parser) -> None:
    """The ``--config FILE`` and ``--set key=value`` options every training stage takes."""
    parser.add_argument("--config", required=True, help="JSON recipe file, e.g. training/mntp/smollm2_135m.json")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value (JSON-parsed; dotted keys reach into sections); repeatable",
    )


def check_run_settings(settings: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """What every stage's settings need: a model, an output folder, and each named setting among its choices."""
    if not settings.model_name_or_path:
        raise ValueError("model_name_or_path is required (a hub id, local directory or 'smollm2-135m')")
    if not settings.output_dir:
        raise ValueError("output_dir is required")
    for name, allowed in choices.items():
        value = getattr(settings, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
