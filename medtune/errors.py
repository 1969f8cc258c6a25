"""The error classes every layer raises: the ground floor, importing nothing from medtune.

The CLI (``medtune.cli``) prints a :class:`UserError` (and the other input errors below, which subclass it or
``ValueError``) as one line with exit code 2; a programming error keeps its traceback. Engine modules raise
these and never import the CLI.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2, no traceback."""


class RecipeError(UserError, ValueError):
    """A training or mixture recipe that cannot run; the message starts with the key path or file
    (``stages[0].lr.llm: ...``, ``mix.yaml: datasets[1].ratio: ...``)."""


class SpecError(UserError, ValueError):
    """A model spec that cannot be built: the message names the field and what is wrong."""


class InputFileError(UserError, ValueError):
    """A file or folder the user named cannot be used as given: a folder where a file is expected, an empty
    file, one that may not be read, or one of the wrong type (a PNG where text is expected)."""


def suggestion(value, known, *, list_known: bool = True) -> str:
    """The hint an error about an unknown name ends with: ``did you mean X?`` for the closest known name, else
    ``known: a, b, ...`` (or nothing, with ``list_known=False``, where the message already lists them)."""
    import difflib

    known = [str(name) for name in known]
    close = difflib.get_close_matches(str(value), known, n=1)
    if close:
        return f"did you mean {close[0]}?"
    return f"known: {', '.join(known)}" if list_known else ""
