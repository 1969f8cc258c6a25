"""``medtune data ...``: convert, check, stats, mix, leakage.

Each verb lives in the module that does its work and exposes ``register(subparsers)``; this file only
groups them under ``data``.
"""
import importlib

DATA_VERB_MODULES = (
    "medtune.data.convert",
    "medtune.data.checks",
    "medtune.data.stats",
    "medtune.data.mixture",
    "medtune.data.leakage",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="convert, check, describe, mix and de-leak datasets")
    verbs = parser.add_subparsers(dest="data_verb", metavar="VERB")
    for name in DATA_VERB_MODULES:
        importlib.import_module(name).register(verbs)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
