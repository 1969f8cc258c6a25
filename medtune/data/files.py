"""What every command checks about a file the user names before reading it, so a bad path is one clear line.

:func:`readable_text_file` is called by the data readers, format detection and the CLI verbs that take a recipe,
spec or data file. It reads the first few kilobytes once and tells apart, each with its own message: a path that
does not exist (``FileNotFoundError``, "no such file"), a folder, an empty file, a file the user may not read,
and a binary file where text is expected (named by its magic bytes when they are common: PNG, JPEG, DICOM, ...).

Parquet is the one binary format medtune reads (the Hugging Face releases of MMMU, Quilt-VQA and MedMax's
evaluation set). A Parquet file passes where the caller says so (``parquet=True``: the format registry, which then
refuses it for a format that reads only text, and the evaluation CLI's task data and ground-truth files); a
recipe, a model spec or a predictions file is still text only.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from medtune.errors import InputFileError

_HEAD_BYTES = 4096
PARQUET = "a Parquet file"
# Leading bytes of binary files people pass by mistake, for a message that says what the file is.
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x1f\x8b", "gzip-compressed"),
          (b"PK\x03\x04", "a zip archive"), (b"PAR1", PARQUET), (b"%PDF", "a PDF document"),
          (b"\x93NUMPY", "a NumPy array"))


def readable_text_file(path: str | os.PathLike, what: str = "data file", *, parquet: bool = False) -> Path:
    """``path`` as a Path once it is known to be a non-empty, readable, UTF-8 text file (or a Parquet file, where
    ``parquet``: see the module docstring); else one clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise InputFileError(f"{path} is a folder, not a {what}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except PermissionError:
        raise InputFileError(f"{path}: permission denied (cannot read the {what})") from None
    except OSError as error:
        raise InputFileError(f"{path}: cannot read the {what} ({error.strerror or type(error).__name__})") from None
    if not head:
        raise InputFileError(f"{path}: empty file (0 bytes), not a {what}")
    kind = binary_kind(head)
    if kind == PARQUET and parquet:
        return path
    if kind is not None:
        raise InputFileError(f"{path}: {kind}, not a {what} (expected UTF-8 text)")
    return path


def binary_kind(head: bytes) -> str | None:
    """What a file's first bytes say it is when it is not UTF-8 text; None for text."""
    if head[128:132] == b"DICM":
        return "a DICOM file"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if b"\x00" in head:
        return "a binary file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut at the end of the sample
            return "a binary file (not UTF-8 text)"
    return None


def hash_file(path: str | os.PathLike, digest=None):
    """``digest`` (a new SHA-256 by default) updated with the file's bytes, read in 1 MiB chunks (data files can
    be gigabytes); OSError as ``open`` raises it."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hash_file(path).hexdigest()
