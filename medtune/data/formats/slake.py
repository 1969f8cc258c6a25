"""SLAKE (Liu et al., 2021): the official ``train.json`` / ``validate.json`` / ``test.json``. Read only.

* ``qid`` -> ``Sample.id``; ``modality`` -> ``meta.modality``; ``location`` -> ``meta.organ``; ``answer_type``
  normalised; ``img_id``, ``q_lang``, ``base_type``, ``content_type`` and ``triple`` kept in ``meta.extra``.
* split from the file name (train, validate -> validation, test) unless ``split=`` is given.
* Both languages are read; ``meta.extra["q_lang"]`` tells them apart (the bundled copy is English only).
* ``img_name`` ("xmlab102/source.jpg") is relative to the official ``imgs/`` folder, the default image root
  when it exists beside the file.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from medtune.data.formats.records import (
    convert_records, existing_subfolder, iter_records, require, split_from_name, text_value,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Metadata, Sample, qa_sample

MAPPED_KEYS = {"qid", "img_name", "question", "answer", "answer_type", "modality", "location"}


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    convert = partial(slake_sample, split=split or split_from_name(path))
    return convert_records(path, iter_records(path), convert, tally=tally, strict=strict)


def sniff(record: dict) -> bool:
    return {"qid", "img_name", "question", "answer"} <= set(record)


def slake_sample(record: Any, where: int | str, *, split: str | None) -> Sample:
    qid, image, question, answer = require(record, "qid", "img_name", "question", "answer")
    meta = Metadata(source="slake", task="vqa", modality=record.get("modality"), organ=record.get("location"),
                    split=split, answer_type=record.get("answer_type"),
                    extra={k: v for k, v in record.items() if k not in MAPPED_KEYS})
    return qa_sample(text_value(qid, "qid"), text_value(question, "question"), text_value(answer, "answer"),
                     images=[ImageRef(image)], meta=meta)


def image_root(path: str | os.PathLike) -> Path:
    return existing_subfolder(path, "imgs")
