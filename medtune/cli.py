"""The ``medtune`` command: verbs grouped by pipeline stage.

Each stage package has a ``cli`` module with ``register(subparsers)``, which adds its verbs and sets
``func`` on each parser. Those modules import nothing heavy at import time (torch, transformers, web
servers load inside the verb's function), so ``medtune data ...`` starts fast and works without the
deep-learning extras installed.

Every verb shows progress with medtune's own display (:mod:`medtune.progress`: a bar on a terminal, plain lines
in a log); :func:`quiet_library_progress` turns off the Hugging Face libraries' bars once, here, for all of them.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
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
    if not args.verbose:  # httpx logs every request it makes (Gradio's start-up checks, an endpoint's answers)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    quiet_library_progress()
    try:
        result = args.func(args)
    except (UserError, OSError, ValueError) as error:
        # Input problems get one clear line; programming errors keep their traceback (and -v shows it always).
        message = None if args.verbose else user_message(error)
        if message is None:
            raise
        print(f"medtune {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


# Each library's switch for its own progress bars: the environment variable it reads when it is imported, and
# the function that turns them off once it has been.
LIBRARY_PROGRESS_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
LIBRARY_PROGRESS_OFF = (("transformers.utils.logging", "disable_progress_bar"),
                        ("huggingface_hub.utils", "disable_progress_bars"),
                        ("datasets.utils.logging", "disable_progress_bar"))


def quiet_library_progress() -> None:
    """Turn off the progress bars of transformers, the hub and datasets for this process and its children.

    Their bars ("Loading weights: 100%|...| 114/114", "Writing model shards") are drawn with carriage returns,
    which a log keeps as run-together lines, and they interleave with medtune's own display. The environment
    variables reach the libraries a verb imports later, without importing them here (``medtune data`` stays
    light); the libraries already imported (by a test, or ``python -c``) are switched off by their own call.
    """
    for variable in LIBRARY_PROGRESS_ENV:
        os.environ[variable] = "1"
    for module, switch_off in LIBRARY_PROGRESS_OFF:
        if module in sys.modules:
            getattr(sys.modules[module], switch_off)()


# An OS error about a path the user gave, in words (the errno's own text is terse: "[Errno 21] Is a directory").
_PATH_ERRORS = {PermissionError: "permission denied", IsADirectoryError: "is a folder, where a file is expected",
                NotADirectoryError: "is not a folder, where one is expected", FileExistsError: "already exists"}
# A device that cannot take what is being written, in words; the command can be run again once it can.
_DEVICE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
                  errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large for the file system"}


def user_message(error: Exception) -> str | None:
    """The one line to print for an input error, or None when the error is a bug (keep its traceback).

    medtune's own errors and a missing file say what they mean. An OS error naming a file (permission denied,
    a folder where a file is expected) is about the user's paths, wherever it was raised; so is text that is not
    UTF-8, which is what reading a binary file as text gives; so is a full or read-only disk.
    """
    if isinstance(error, (UserError, FileNotFoundError)) or type(error).__module__.startswith("medtune"):
        return str(error)
    for kind, words in _PATH_ERRORS.items():
        if isinstance(error, kind) and error.filename:
            return f"{error.filename}: {words}"
    if isinstance(error, OSError) and error.errno in _DEVICE_ERRORS:
        where = f"{error.filename}: " if error.filename else ""
        return (f"{where}{_DEVICE_ERRORS[error.errno]} (make room and run the command again: nothing half-written "
                "is picked up)")
    if isinstance(error, UnicodeDecodeError):
        return f"an input file is not UTF-8 text (a binary file where text is expected?): {error.reason}"
    return None


if __name__ == "__main__":
    # Run through the imported module so `python -m medtune.cli` shares one UserError class with the verbs.
    from medtune.cli import main as _main

    sys.exit(_main())
