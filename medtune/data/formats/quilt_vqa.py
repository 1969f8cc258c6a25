"""Quilt-VQA (Seyfioglu et al., 2024): the wisdomik/Quilt_VQA release. Read only.

The release (its dataset card's file list) holds ``quilt_vqa.zip`` (images), ``quiltvqa_test_w_ans.json`` (the
answered test set as LLaVA conversation records with ``answer_type`` OPEN / CLOSED, the file Quilt-LLaVA's
``quilt_eval.py`` scores against), ``quiltvqa_test_wo_ans.jsonl`` (questions only) and the table the Hub serves
(Parquet, split ``train``) whose columns are ``image`` (a ``datasets`` image: a ``{bytes, path}`` struct in the
Parquet file), ``question``, ``answer``, ``answer_type``, ``context`` (the narration snippet the question came
from); these are the columns that code loading it with ``datasets`` (``load_dataset("wisdomik/Quilt_VQA",
split="train")``) filters on (``answer_type`` OPEN / CLOSED) and drops (``context``).

Both answered layouts read here, record by record:

* conversation records (``conversations`` + ``answer_type``): as the ``llava-med-vqa`` reader reads them, with
  ``source`` ``quilt-vqa``; the record's ``question_id`` or ``id`` is the question id.
* table rows, as JSON or as the Parquet file downloaded (:mod:`medtune.data.formats.parquet`: rows streamed, each
  image's bytes written unchanged to ``<file stem>_images/`` beside it, named by content hash, decoded late):
  ``question_id`` / ``id`` when present, else ``<file stem>-<row>`` (the 1-based row); ``context`` and any other
  column stay in ``meta.extra``.

``answer_type`` is normalised (OPEN -> open, CLOSED -> closed). Images are relative to ``images/`` beside the
file when that folder exists (the zip unpacks to it), else the file's folder; a Parquet file's always to its folder,
where its ``<stem>_images/`` is.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from medtune.data.formats import llava_med_vqa, parquet
from medtune.data.formats.records import (
    TurnStats,
    convert_records,
    existing_subfolder,
    iter_records,
    record_id,
    require,
    split_from_name,
    text_value,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Metadata, Sample, qa_sample

MAPPED_KEYS = {"question_id", "id", "image", "question", "answer", "answer_type", "split"}
READS_PARQUET = True


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    stats = TurnStats()
    convert = partial(quilt_vqa_sample, path=path, stats=stats, split=split or split_from_name(path) or "test")
    yield from convert_records(path, parquet.records_or(path, iter_records), convert, tally=tally, strict=strict)
    stats.add_notes(tally, path)


def sniff(record: dict) -> bool:
    """The table layout (``context`` tells it from PathVQA's rows; this format refines ``pathvqa``)."""
    return {"image", "question", "answer", "answer_type", "context"} <= set(record)


def quilt_vqa_sample(record: Any, where: int | str, *, path, stats: TurnStats, split: str) -> Sample:
    if isinstance(record, dict) and llava_med_vqa.sniff(record):
        record = {**record, "id": record.get("question_id", record.get("id"))}
        sample = llava_med_vqa.llava_med_vqa_sample(record, where, path=path, stats=stats, split=split)
        sample.meta = dataclasses.replace(sample.meta, source="quilt-vqa")
        return sample
    image, question, answer = require(record, "image", "question", "answer")
    meta = Metadata(source="quilt-vqa", task="vqa", split=record.get("split") or split,
                    answer_type=record.get("answer_type"),
                    extra={k: v for k, v in record.items() if k not in MAPPED_KEYS})
    return qa_sample(record_id(record, path, where, "question_id", "id"), text_value(question, "question"),
                     text_value(answer, "answer"), images=[ImageRef(text_value(image, "image"))], meta=meta)


def image_root(path: str | os.PathLike) -> Path:
    if parquet.is_parquet(path):
        return Path(path).parent
    return existing_subfolder(path, "images", "quilt_vqa")
