"""The ``llm2vec-fast`` command line.

Each subcommand lives in the module that does the work; that module provides
``add_arguments(parser)`` and ``main(args) -> int | None``. Modules are imported only when their
subcommand runs, so ``llm2vec-fast --help`` stays fast.

``main`` is the program: a library error (a bad input, a missing file, an unknown model) becomes one line on
stderr and exit code 1 (the traceback too with ``--log-level DEBUG``). ``run`` is the same without that
conversion, for callers that want the exception.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import logging
import sys

TRAIN_STAGES = {stage: f"llm2vec_fast.training.{stage}" for stage in ("mntp", "simcse", "supervised")}
COMMANDS = {
    "encode": ("llm2vec_fast.corpus", "Encode a large corpus into embedding shards (resumable)."),
    "export": ("llm2vec_fast.export", "Export an encoder as a sentence-transformers model directory (TEI, vLLM)."),
    "eval": ("llm2vec_fast.mteb", "Evaluate an encoder on MTEB tasks, or offline on local files."),
    "recipe": ("llm2vec_fast.recipe", "Run the whole LLM2Vec recipe on a model and report the scores."),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# What a user can cause: a bad input or option, a missing or unwritable path, a model that does not resolve, a
# failed stage. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError)


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    # Its own dest: the training stages take TrainingArguments' ``--log_level`` (transformers' logging), which
    # must not receive this one's value.
    parser.add_argument("--log-level", dest="cli_log_level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging level (default INFO)")


def _chosen_words(argv: list[str]) -> list[str]:
    """The subcommand words (``encode``, or ``train mntp``) after the global options, however those are spelt
    (``--log-level DEBUG``, ``--log-level=DEBUG``, ``--log DEBUG``): the global options are parsed by argparse
    itself, and the first words that follow them name the subcommand."""
    globals_only = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    _add_global_options(globals_only)
    globals_only.add_argument("words", nargs=argparse.REMAINDER)
    try:
        known, _ = globals_only.parse_known_args(argv)
    except argparse.ArgumentError:  # a bad global option: the full parser reports it
        return []
    return list(itertools.takewhile(lambda word: not word.startswith("-"), known.words[:2]))


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The full parser; only the subcommand that ``argv`` chooses has its module imported for its arguments."""
    words = _chosen_words(argv)
    parser = argparse.ArgumentParser(prog="llm2vec-fast", description=__doc__.splitlines()[0])
    _add_global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="Train one LLM2Vec stage from a config file.")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, module in TRAIN_STAGES.items():
        sub = stages.add_parser(stage, help=f"the {stage} stage")
        sub.set_defaults(module=module)
        if words == ["train", stage]:
            importlib.import_module(module).add_arguments(sub)

    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(module=module)
        if words[:1] == [name]:
            importlib.import_module(module).add_arguments(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; library exceptions propagate."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.cli_log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(importlib.import_module(args.module).main(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """The program: ``run``, with a user's error as one line on stderr and exit code 1."""
    try:
        return run(argv)
    except USER_ERRORS as error:
        logging.getLogger(__name__).debug("Traceback of the error below", exc_info=True)
        message = str(error) or type(error).__name__
        print(f"llm2vec-fast: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
