"""PathVQA (He et al., 2020) as image/question/answer records: ``{qid, image, question, answer,
answer_type?, split?}`` in a JSON list or JSON Lines. Read only.

* ``qid`` -> ``Sample.id`` (``<file stem>-<index>`` when a file has none).
* PathVQA ships no answer type; the usual convention, used here when ``answer_type`` is absent, is that a
  yes/no answer makes the question closed and anything else open.
* split from the record's ``split``, else the file name, unless ``split=`` is given. Other fields
  (``upstream_image_path`` ...) are kept in ``meta.extra``. Images are relative to ``images/`` beside the file.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from medtune.data.formats.records import (
    convert_records, existing_subfolder, iter_records, record_id, require, split_from_name, text_value,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Metadata, Sample, qa_sample

MAPPED_KEYS = {"qid", "image", "question", "answer", "answer_type", "split"}
YES_NO = ("yes", "no")


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    convert = partial(pathvqa_sample, path=path, forced_split=split, file_split=split_from_name(path))
    return convert_records(path, iter_records(path), convert, tally=tally, strict=strict)


def sniff(record: dict) -> bool:
    return {"image", "question", "answer"} <= set(record) and "conversations" not in record


def pathvqa_sample(record: Any, where: int | str, *, path, forced_split: str | None,
                   file_split: str | None) -> Sample:
    image, question, answer = require(record, "image", "question", "answer")
    answer = text_value(answer, "answer")
    answer_type = record.get("answer_type") or ("closed" if answer.strip().lower() in YES_NO else "open")
    meta = Metadata(source="pathvqa", task="vqa", modality="pathology",
                    split=forced_split or record.get("split") or file_split, answer_type=answer_type,
                    extra={k: v for k, v in record.items() if k not in MAPPED_KEYS})
    return qa_sample(record_id(record, path, where, "qid"), text_value(question, "question"), answer,
                     images=[ImageRef(image)], meta=meta)


def image_root(path: str | os.PathLike) -> Path:
    return existing_subfolder(path, "images")
