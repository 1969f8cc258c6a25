"""VLMEvalKit benchmark TSVs: the files ``vlmeval`` downloads into ``LMUData/`` (MMBench, GMAI-MMBench,
OmniMedVQA, MMMU_DEV_VAL, ... ). Read only.

Layout, from VLMEvalKit's ``ImageBaseDataset`` and ``ImageMCQDataset`` (open-compass/VLMEvalKit,
``vlmeval/dataset/image_base.py`` / ``image_mcq.py``) and the GMAI-MMBench README ("stored directly in TSV
format" for VLMEvalKit, base64 images, no ``answer`` in the test split):

* One row per question, tab-separated, with a header: ``index`` (the question id), ``question``, option
  columns ``A``, ``B``, ... (a multiple-choice row has at least ``A`` and ``B``; empty cells end the options),
  ``answer`` (the letter; absent or empty where withheld), ``image`` (base64 of the encoded image file) or
  ``image_path`` (a path), and optional ``hint``, ``category``, ``l2-category``, ``split`` columns.
* ``image`` may also be the ``index`` of an earlier row that holds the picture (VLMEvalKit stores a shared image
  once: a cell of 64 characters or fewer is such a reference) or a Python-style list of base64 strings for a
  multi-image question.
* A row without option columns is a free-answer question: ``closed`` when the answer is yes/no, else ``open``.
* ``hint`` is put before the question (``Hint: ...``), as VLMEvalKit's prompt builder does.

Images are written out, not decoded (:mod:`medtune.data.formats.embedded_images`, shared with the Parquet
readers): each base64 image's bytes go, unchanged, to ``<file stem>_images/`` beside the TSV, named by a hash of
their content (the same picture is stored once), and the sample refers to that file. Pixels are decoded only when
a question is asked, by :func:`medtune.data.images.load_image`, with the same limits as every other image (the
pixel-count guard runs before decoding). A base64 cell larger than :data:`MAX_IMAGE_CHARS` is refused for that
row. ``category`` -> ``meta.extra["category"]`` and so on: every
column but the base64 image is kept in ``meta.extra``; the option and ``answer`` cells of a multiple-choice row,
unstripped, are ``meta.extra["source_cells"]``, which the ``vlmevalkit`` metric family reads as VLMEvalKit does.
Options must use consecutive letters: a row with an option after an empty one is refused, naming both letters.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from medtune.data.files import readable_text_file
from medtune.data.formats.choices import LETTERS, letter_of, mcq_sample
from medtune.data.formats.embedded_images import EmbeddedImages
from medtune.data.formats.records import convert_records, split_from_name, text_value
from medtune.data.jsonl import Tally
from medtune.data.schema import SOURCE_CELLS, ImageRef, Metadata, Sample, qa_sample

MAX_IMAGE_CHARS = 256 << 20   # one base64 cell; far above any benchmark image, far below memory trouble
REFERENCE_CHARS = 64          # VLMEvalKit: an image cell this short names another row's image
MAPPED_KEYS = {"index", "question", "answer", "image", "image_path", "hint", "split", *LETTERS}
_WHITESPACE = re.compile(r"\s+")


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None,
         source: str = "vlmevalkit") -> Iterator[Sample]:
    convert = partial(vlmevalkit_sample, path=Path(path), images=ImageStore(Path(path)), source=source,
                      split=split or split_from_name(path))
    return convert_records(path, raw_records(path), convert, tally=tally, strict=strict)


def raw_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """TSV (or CSV, by suffix) rows as dicts with their line number; cells may hold a whole base64 image."""
    readable_text_file(path)
    if csv.field_size_limit() < MAX_IMAGE_CHARS:
        csv.field_size_limit(MAX_IMAGE_CHARS)  # process-wide; only ever raised, never lowered
    delimiter = "," if Path(path).suffix.lower() == ".csv" else "\t"
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, row


def sniff(record: dict) -> bool:
    """``index`` and ``question`` with an image column: VLMEvalKit's header (it refines ``pathvqa``)."""
    return {"index", "question"} <= set(record) and ("image" in record or "image_path" in record)


def vlmevalkit_sample(record: Any, where: int | str, *, path: Path, images: ImageStore, source: str,
                      split: str | None) -> Sample:
    if not isinstance(record, dict):
        raise ValueError(f"row is not a table row (got {type(record).__name__})")
    index = _cell(record, "index")
    question = _cell(record, "question")
    if not index or not question:
        raise ValueError("missing field 'index'" if not index else "missing field 'question'")
    refs = images.refs(index, _cell(record, "image"), _cell(record, "image_path"))
    hint = _cell(record, "hint")
    if hint and hint.lower() != "nan":
        question = f"Hint: {hint}\n{question}"
    extra = {k: v for k, v in record.items() if k not in MAPPED_KEYS and k is not None and v not in (None, "")}
    meta = Metadata(source=source, task="vqa", split=_cell(record, "split") or split, extra=extra)
    answer = _cell(record, "answer") or None
    choices = options(record)
    if choices:
        # the cells as written, for the family that reads them as VLMEvalKit's pandas does
        meta.extra[SOURCE_CELLS] = {key: record.get(key) or "" for key in (*LETTERS, "answer") if key in record}
        return mcq_sample(index, question, choices, letter_of(answer, choices), refs, meta)
    if answer is not None:
        meta.answer_type = "closed" if answer.strip().lower() in ("yes", "no") else "open"
    return qa_sample(index, question, answer, images=refs, meta=meta)


def options(record: dict) -> list[str]:
    """The texts of columns A, B, ... up to the first empty one (VLMEvalKit writes "nan" for a missing one). An
    option after an empty one is refused: its letter would move (VLMEvalKit keeps the gap)."""
    choices, gap = [], None
    for letter in LETTERS:
        value = _cell(record, letter)
        if not value or value.lower() == "nan":
            gap = gap or letter
        elif gap:
            raise ValueError(f"option {letter} follows the empty option {gap}: options must be consecutive letters")
        else:
            choices.append(value)
    return choices if len(choices) >= 2 else []


def _cell(record: dict, key: str) -> str:
    value = record.get(key)
    return "" if value is None else text_value(value, key).strip()


class ImageStore(EmbeddedImages):
    """Writes a TSV's base64 images to ``<stem>_images/`` beside it (content-named) and remembers, by row
    index, which files a row's images went to, so a later row can refer to them."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.by_index: dict[str, list[ImageRef]] = {}

    def refs(self, index: str, image: str, image_path: str) -> list[ImageRef]:
        if image:
            refs = self._from_cell(image)
        elif image_path:
            refs = [ImageRef(p) for p in _list_cell(image_path)]
        else:
            refs = []  # a text-only question is still a question
        self.by_index[index] = refs
        return refs

    def _from_cell(self, cell: str) -> list[ImageRef]:
        if len(cell) <= REFERENCE_CHARS:
            if cell not in self.by_index:
                raise ValueError(f"image {cell!r} refers to row index {cell}, which no earlier row has")
            return self.by_index[cell]
        if len(cell) > MAX_IMAGE_CHARS:
            raise ValueError(f"base64 image of {len(cell):,} characters is over the limit of {MAX_IMAGE_CHARS:,}")
        return [self._write(encoded) for encoded in _list_cell(cell)]

    def _write(self, encoded: str) -> ImageRef:
        try:
            data = base64.b64decode(_WHITESPACE.sub("", encoded), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image cell is neither base64 nor a row index") from None
        if not data:
            raise ValueError("image cell decodes to no bytes")
        return self.write(data)


def _list_cell(cell: str) -> list[str]:
    """A cell holding one value, or VLMEvalKit's ``['a', 'b']`` list of values."""
    if cell.startswith("[") and cell.endswith("]"):
        try:
            values = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            raise ValueError("image cell looks like a list but does not parse") from None
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
            raise ValueError("image list must hold non-empty strings")
        return values
    return [cell]


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
