"""The ``llm2vec-fast`` command line.

Each subcommand lives in the module that does the work; that module provides
``add_arguments(parser)`` and ``main(args) -> int | None``. Modules are imported only when their
subcommand runs, so ``llm2vec-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

TRAIN_STAGES = {
    "mntp": "llm2vec_fast.training.mntp",
    "simcse": "llm2vec_fast.training.simcse",
    "supervised": "llm2vec_fast.training.supervised",
}
COMMANDS = {
    "encode": ("llm2vec_fast.corpus", "Encode a large corpus into embedding shards (resumable)."),
    "export": ("llm2vec_fast.export", "Export an encoder as a sentence-transformers model directory (TEI, vLLM)."),
    "eval": ("llm2vec_fast.mteb", "Evaluate an encoder on MTEB tasks, or offline on local files."),
    "recipe": ("llm2vec_fast.recipe", "Run the whole LLM2Vec recipe on a model and report the scores."),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2vec-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="Train one LLM2Vec stage from a config file.")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, module in TRAIN_STAGES.items():
        sub = stages.add_parser(stage, help=f"the {stage} stage")
        sub.set_defaults(module=module)
        # Only the chosen stage's module is imported to add its arguments.
        if len(argv) >= 2 and argv[0] == "train" and argv[1] == stage:
            importlib.import_module(module).add_arguments(sub)

    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(module=module)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Global options come first, so the subcommand is the first word that is not one of them.
    command_argv = argv[2:] if argv[:1] == ["--log-level"] else argv
    args = build_parser(command_argv).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = importlib.import_module(args.module).main(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
