"""The ``medtune`` command: verbs grouped by pipeline stage.

Each stage package has a ``cli`` module with ``register(subparsers)``, which adds its verbs and sets
``func`` on each parser. Those modules import nothing heavy at import time (torch, transformers, web
servers load inside the verb's function), so ``medtune data ...`` starts fast and works without the
deep-learning extras installed.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medtune import __version__
from medtune.errors import UserError

# (module, what it adds). Order is the order in `medtune --help`.
STAGE_MODULES = (
    "medtune.data.cli",   # data convert | check | stats | mix | leakage
    "medtune.models.cli",  # model build | info
    "medtune.train.cli",  # train, merge
    "medtune.eval.cli",   # eval
    "medtune.serve.cli",  # chat, serve, web
    "medtune.demo.cli",   # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune",
        description="Train, evaluate and serve biomedical multimodal assistants.",
    )
    parser.add_argument("--version", action="version", version=f"medtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in STAGE_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (UserError, FileNotFoundError, ValueError) as error:
        # Input problems get one clear line; programming errors keep their traceback.
        if args.verbose or not _is_user_facing(error):
            raise
        print(f"medtune {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _is_user_facing(error: Exception) -> bool:
    return isinstance(error, (UserError, FileNotFoundError)) or type(error).__module__.startswith("medtune")


if __name__ == "__main__":
    # Run through the imported module so `python -m medtune.cli` shares one UserError class with the verbs.
    from medtune.cli import main as _main

    sys.exit(_main())
