"""MMMU (Yue et al., 2024), medical subjects, validation split: the MMMU/MMMU release's columns. Read only.

Layout, from the dataset card's features (HuggingFaceM4/MMMU and lmms-lab/MMMU, copies of MMMU/MMMU, list them)
and the file tree of MMMU/MMMU (one config per subject: ``<Subject>/{dev,validation,test}-00000-of-00001.parquet``,
loaded per subject and split by MMMU-Benchmark/MMMU ``mmmu/run_llava.py``): ``id``
(``validation_Clinical_Medicine_1``), ``question`` (with ``<image 1>`` ... markers), ``options`` (a string
holding a Python list, e.g. ``"['a', 'b']"``; a real list is taken too), ``answer`` (the letter; ``?`` in the test
split, whose answers are withheld), ``image_1`` ... ``image_7`` (``datasets`` images, stored in the Parquet file
as ``{bytes, path}`` structs; null where a question has fewer), ``question_type`` (``multiple-choice`` |
``open``), ``subfield``, ``img_type``, ``topic_difficulty``, ``explanation``.

The release's Parquet files read as downloaded (:mod:`medtune.data.formats.parquet`: rows streamed, each image's
bytes written unchanged to ``<file stem>_images/`` beside the file, named by content hash, pixels decoded late).
The same rows as JSON or JSON Lines with each ``image_k`` a path (or ``{"path": ...}``) read too. (VLMEvalKit's
``MMMU_DEV_VAL.tsv`` reads with the ``vlmevalkit`` format.)

* Only the medical subjects are kept (:data:`MEDICAL_SUBJECTS`, the "Health & Medicine" discipline: the subject
  is the ``id`` between the split and the number); ``subjects`` chooses others. Other rows are left out on
  purpose and counted as "not a chosen MMMU subject".
* Only the validation split by default (``split``), because test answers are withheld; other rows are counted
  as "another MMMU split".
* Multiple-choice rows become ``mcq`` samples; ``open`` rows become open questions. Image markers stay in the
  question text, and the images follow in ``image_1`` ... order.
"""
from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from medtune.data.formats import parquet
from medtune.data.formats.choices import letter_of, mcq_sample
from medtune.data.formats.records import (
    Skip,
    convert_records,
    iter_records,
    require,
    text_value,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Metadata, Sample, qa_sample

MEDICAL_SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                    "Pharmacy", "Public_Health")
IMAGE_KEYS = tuple(f"image_{i}" for i in range(1, 8))
MAPPED_KEYS = {"id", "question", "options", "answer", *IMAGE_KEYS}
_ID = re.compile(r"^(dev|validation|test)_(.+)_(\d+)$")
SPLITS = {"dev": "dev", "validation": "validation", "test": "test"}
READS_PARQUET = True


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str = "validation",
         subjects: tuple[str, ...] | list[str] = MEDICAL_SUBJECTS) -> Iterator[Sample]:
    convert = partial(mmmu_sample, split=split, subjects=tuple(subjects))
    return convert_records(path, parquet.records_or(path, iter_records), convert, tally=tally, strict=strict)


def sniff(record: dict) -> bool:
    return {"id", "question", "options", "answer", "image_1"} <= set(record)


def mmmu_sample(record: Any, where: int | str, *, split: str, subjects: tuple[str, ...]) -> Sample:
    qid, question, answer = require(record, "id", "question", "answer")
    qid = text_value(qid, "id")
    match = _ID.match(qid)
    if match is None:
        raise ValueError(f"id {qid!r} is not MMMU's <split>_<Subject>_<n>")
    row_split, subject = match.group(1), match.group(2)
    if subject not in subjects:
        raise Skip("not a chosen MMMU subject")
    if split and row_split != split:
        raise Skip("another MMMU split")
    images = [ImageRef.from_dict(record[key]) for key in IMAGE_KEYS if record.get(key) not in (None, "")]
    meta = Metadata(source="mmmu", task="vqa", split=SPLITS[row_split],
                    extra={"subject": subject, **{k: v for k, v in record.items() if k not in MAPPED_KEYS}})
    answer = text_value(answer, "answer").strip()
    withheld = answer in ("", "?")
    choices = _options(record.get("options"))
    if str(record.get("question_type", "multiple-choice")) == "multiple-choice" and choices:
        return mcq_sample(qid, text_value(question, "question"), choices,
                          None if withheld else letter_of(answer, choices), images, meta)
    meta.answer_type = "open"
    return qa_sample(qid, text_value(question, "question"), None if withheld else answer, images=images, meta=meta)


def _options(value: Any) -> list[str]:
    if value in (None, "", "[]"):
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError("field 'options' is not a list") from None
    if not isinstance(value, list):
        raise ValueError("field 'options' must be a list of option texts")
    return [text_value(v, "options").strip() for v in value]


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
