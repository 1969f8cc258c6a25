"""VQA-RAD (Lau et al., 2018): the MEVF split files ``trainset.json`` / ``testset.json`` and the official
``VQA_RAD Dataset Public.json``. Read only.

* The two kinds are told apart per record: public records carry ``qid_linked_id``. MEVF ``qid`` values are
  integers and do not match the public file's string ``qid``s; both become ``Sample.id`` as a string, so
  predictions keyed by either numbering can be matched.
* split: MEVF takes it from the file name (trainset -> train, testset -> test); the public file from
  ``phrase_type`` (``test_freeform`` / ``test_para`` -> test, else train). ``split=`` overrides both.
* ``image_organ`` -> ``meta.organ``; ``answer_type`` is normalised ("CLOSED " with a trailing space -> closed);
  numeric answers become text. Every other field (question_type, phrase_type, question_rephrase, ...) is kept
  in ``meta.extra`` under its own name.
* Images are ``image_name`` relative to the image root, by default ``images/`` (or the official
  ``VQA_RAD Image Folder/``) beside the file.
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

MAPPED_KEYS = {"qid", "image_name", "image_organ", "question", "answer", "answer_type"}


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    convert = partial(vqa_rad_sample, file_split=split or split_from_name(path), forced=split is not None)
    return convert_records(path, iter_records(path), convert, tally=tally, strict=strict)


def sniff(record: dict) -> bool:
    return {"qid", "image_name", "question", "answer"} <= set(record)


def vqa_rad_sample(record: Any, where: int | str, *, file_split: str | None, forced: bool) -> Sample:
    qid, image, question, answer = require(record, "qid", "image_name", "question", "answer")
    split = file_split
    if "qid_linked_id" in record and not forced:  # the official public JSON
        split = "test" if str(record.get("phrase_type", "")).startswith("test_") else "train"
    meta = Metadata(source="vqa-rad", task="vqa", organ=record.get("image_organ"), split=split,
                    answer_type=record.get("answer_type"),
                    extra={k: v for k, v in record.items() if k not in MAPPED_KEYS})
    return qa_sample(text_value(qid, "qid"), text_value(question, "question"), text_value(answer, "answer"),
                     images=[ImageRef(image)], meta=meta)


def image_root(path: str | os.PathLike) -> Path:
    return existing_subfolder(path, "images", "VQA_RAD Image Folder")
