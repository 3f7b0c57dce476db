"""The command line itself: global options however spelt, errors as argparse errors or one line, and only the
chosen subcommand's module imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

from llm2vec_fast import cli

ENCODE = ["encode", "--model", "m", "--input", "in.jsonl", "--output", "out"]


@pytest.mark.parametrize("head", [["--log-level=DEBUG"], ["--log-level", "DEBUG"], ["--log-level=debug"],
                                  ["--log", "DEBUG"]])
def test_log_level_before_the_subcommand_in_any_spelling(head):
    argv = [*head, *ENCODE]
    args = cli.build_parser(argv).parse_args(argv)
    assert (args.cli_log_level, args.command, args.model, args.input) == ("DEBUG", "encode", "m", "in.jsonl")


def test_log_level_before_a_training_stage():
    """The global level is not a training setting: TrainingArguments' own ``log_level`` (transformers' logging,
    lower-case choices) is left alone unless given after the stage."""
    from llm2vec_fast.training.arguments import overrides_from

    argv = ["--log-level=WARNING", "train", "mntp", "--config", "c.json", "--learning_rate", "1e-4"]
    args = cli.build_parser(argv).parse_args(argv)
    assert (args.cli_log_level, args.stage, args.config) == ("WARNING", "mntp", "c.json")
    assert overrides_from(args, "mntp") == {"learning_rate": 1e-4}


def test_the_global_default_stays_out_of_a_stage_and_a_level_after_the_stage_is_the_stages():
    # Without any --log-level the global default ("INFO") must not reach the stage's own log_level either,
    # which refuses it (every recipe stage failed so).
    argv = ["train", "mntp", "--config", "c.json", "--max_steps", "3"]
    args = cli.build_parser(argv).parse_args(argv)
    assert (args.cli_log_level, args.max_steps) == ("INFO", 3) and "log_level" not in vars(args)
    argv = ["train", "mntp", "--config", "c.json", "--log-level", "debug"]
    args = cli.build_parser(argv).parse_args(argv)
    assert (args.cli_log_level, args.log_level) == ("INFO", "debug")


@pytest.mark.parametrize("head", [["--log-level", "LOUD"], ["--log-level=LOUD"]])
def test_unknown_log_level_is_an_argparse_error(head, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*head, *ENCODE])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --log-level: invalid choice: 'LOUD'" in err and "Traceback" not in err


def _imported_after(argv: list[str]) -> set[str]:
    """The llm2vec_fast modules a fresh interpreter holds after building the parser for ``argv``."""
    code = ("import json, sys; from llm2vec_fast import cli\n"
            f"try:\n    cli.build_parser({argv!r}).parse_args({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('llm2vec_fast.'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


SUBCOMMAND_MODULES = {"llm2vec_fast.corpus", "llm2vec_fast.export", "llm2vec_fast.mteb", "llm2vec_fast.recipe",
                      "llm2vec_fast.training.mntp", "llm2vec_fast.training.simcse",
                      "llm2vec_fast.training.supervised"}


@pytest.mark.parametrize("argv,chosen", [
    (["--help"], set()),
    (["--log-level=DEBUG", "encode", "--model", "m", "--input", "i", "--output", "o"], {"llm2vec_fast.corpus"}),
    (["--log-level", "INFO", "recipe", "--help"], {"llm2vec_fast.recipe"}),
    pytest.param(["--log-level=INFO", "train", "simcse", "--help"], {"llm2vec_fast.training.simcse"},
                 marks=pytest.mark.slow),  # imports the training stack: 7 s of CPU
])
def test_only_the_chosen_subcommands_module_is_imported(argv, chosen):
    assert _imported_after(argv) & SUBCOMMAND_MODULES == chosen


def test_a_library_error_is_one_line_and_exit_code_1(tmp_path, capsys, monkeypatch):
    import llm2vec_fast.recipe as recipe_module

    def fail(args):
        raise FileNotFoundError("no recipe 'x': not a file")

    monkeypatch.setattr(recipe_module, "main", fail)
    assert cli.main(["recipe", "x", "--output", str(tmp_path), "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "llm2vec-fast: error: no recipe 'x': not a file\n"
    with pytest.raises(FileNotFoundError):  # run() leaves the exception to the caller
        cli.run(["recipe", "x", "--output", str(tmp_path), "--data-dir", str(tmp_path)])
