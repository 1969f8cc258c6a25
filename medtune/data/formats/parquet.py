"""Parquet files as the Hugging Face Hub releases them, read row by row for the formats that take them.

Several benchmarks are downloaded as Parquet (MMMU/MMMU: ``<Subject>/validation-00000-of-00001.parquet``;
wisdomik/Quilt_VQA; mint-medmax/medmax_eval_data: ``data/train-00000-of-00001.parquet``). A format whose module
sets ``READS_PARQUET = True`` reads its records through :func:`records_or`, which yields a Parquet file's rows as
the same dicts its JSON reader sees, so one converter serves both. Choices:

* A file is Parquet when it starts with the ``PAR1`` magic; the suffix plays no part (as in format detection).
* pyarrow (installed with ``datasets``) is imported here only, and only when a Parquet file is read; without it the
  error is one line that says ``pip install pyarrow``.
* Rows are streamed: ``ParquetFile.iter_batches`` hands over :data:`BATCH_ROWS` rows at a time, so memory holds
  one batch (and the row group it comes from), never the file: a test split with embedded images can be gigabytes.
* A cell holding a ``datasets`` ``Image`` (stored as ``struct<bytes: binary, path: string>``, the storage type of
  the ``Image`` feature) becomes a path: its bytes are written unchanged to ``<file stem>_images/`` by
  :class:`~medtune.data.formats.embedded_images.EmbeddedImages`, named by content hash as VLMEvalKit's base64
  cells are; a struct without bytes gives its own ``path``. A list of them (``Sequence(Image)``) becomes a list
  of paths. Pixels are decoded late, with the usual limits, when a question is asked.
* ``where`` is the 1-based row number, so an id made from a row's position equals the one a JSON Lines export of
  the same table gets from its line number. A cell that cannot become a path is that row's error (skipped and
  counted); a read error part-way ends the readable part of the file, counted as the file's unreadable tail.
* Format detection reads the schema's column names only (:func:`column_names`): reading rows would write images.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from medtune.data.formats.embedded_images import EmbeddedImages
from medtune.data.jsonl import RecordError
from medtune.errors import InputFileError

MAGIC = b"PAR1"
BATCH_ROWS = 64
_IMAGE_FIELDS = {"bytes", "path"}


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable file that starts with Parquet's magic bytes."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def records_or(path: str | os.PathLike, text_records: Callable[[str | os.PathLike], Iterable]) -> Iterator:
    """``path``'s rows when it is a Parquet file, else ``text_records(path)`` (the format's own text reader)."""
    return raw_records(path) if is_parquet(path) else iter(text_records(path))


def column_names(path: str | os.PathLike) -> list[str]:
    """The top-level column names of a Parquet file's schema."""
    return list(_open(path).schema_arrow.names)


def raw_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(row number, row dict)`` for every row, embedded images replaced by the paths they were written to."""
    parquet_file = _open(path)
    damaged = _read_errors()
    images = EmbeddedImages(Path(path))
    row = 0
    batches = parquet_file.iter_batches(batch_size=BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except damaged as error:  # a damaged page or row group
            yield row + 1, RecordError(path, f"row {row + 1}", f"unreadable Parquet data ({_reason(error)}); "
                                       "the rest of the file is unreadable", tail=True)
            return
        for record in batch.to_pylist():
            row += 1
            try:
                yield row, {key: _cell(value, images) for key, value in record.items()}
            except ValueError as problem:
                yield row, RecordError(path, row, str(problem), sample_id=_row_id(record))


def _cell(value: Any, images: EmbeddedImages) -> Any:
    """A cell as the JSON reader would see it: an image struct (or a list of them) becomes its path(s)."""
    if isinstance(value, dict) and set(value) == _IMAGE_FIELDS:
        if value["bytes"]:
            return images.write(value["bytes"]).path
        return value["path"] or None
    if isinstance(value, list) and value and all(isinstance(v, dict) and set(v) == _IMAGE_FIELDS for v in value):
        return [_cell(v, images) for v in value]
    return value


def _row_id(record: dict) -> str | None:
    for key in ("id", "question_id", "index"):
        if isinstance(record.get(key), (str, int)):
            return str(record[key])
    return None


def _open(path: str | os.PathLike):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputFileError(f"{path}: reading a Parquet file needs pyarrow: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except _read_errors() as error:  # ArrowInvalid for a damaged footer, OSError for an unreadable file
        raise InputFileError(f"{path}: not a readable Parquet file ({_reason(error)})") from None


def _read_errors() -> tuple[type[Exception], ...]:
    import pyarrow as pa
    return pa.ArrowException, OSError


def _reason(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
