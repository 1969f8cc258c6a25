"""OmniMedVQA (Hu et al., 2024): one JSON list per source dataset under ``QA_information/Open-access/`` (and
``Restricted-access/``). Read only.

Record layout, from the released JSON files (field names as in the release; one file, ``Chest CT Scan.json``, was
reported to spell ``modality_type`` as ``modality`` once, so both are read)::

    {"dataset": ..., "question_id": ..., "question_type": ..., "question": ..., "gt_answer": "<option text>",
     "image_path": "Images/<dataset>/...", "option_A": ..., "option_B": ..., "option_C"?, "option_D"?,
     "modality_type": ...}

* ``question_id`` is the id; ``gt_answer`` is the option text, mapped to its letter (a record whose answer is no
  option is bad input, counted). Options are the ``option_X`` fields present, in letter order.
* ``modality_type`` -> ``meta.modality``; ``dataset`` and ``question_type`` stay in ``meta.extra``.
* ``image_path`` is relative to the release's root (the folder holding ``Images/`` and ``QA_information/``):
  the default image root is that folder when the file sits in ``QA_information/<access>/``, else the file's own.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from medtune.data.formats.choices import LETTERS, letter_of, mcq_sample
from medtune.data.formats.records import (
    convert_records,
    iter_records,
    require,
    split_from_name,
    text_value,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Metadata, Sample

MAPPED_KEYS = {"question_id", "question", "gt_answer", "image_path", "modality_type", "modality",
               *(f"option_{letter}" for letter in LETTERS)}


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    convert = partial(omnimedvqa_sample, split=split or split_from_name(path))
    return convert_records(path, iter_records(path), convert, tally=tally, strict=strict)


def sniff(record: dict) -> bool:
    return {"question_id", "question", "gt_answer", "option_A"} <= set(record)


def omnimedvqa_sample(record: Any, where: int | str, *, split: str | None) -> Sample:
    qid, question, answer, image = require(record, "question_id", "question", "gt_answer", "image_path")
    choices = []
    for letter in LETTERS:
        value = record.get(f"option_{letter}")
        if value in (None, ""):
            break
        choices.append(text_value(value, f"option_{letter}").strip())
    meta = Metadata(source="omnimedvqa", task="vqa", split=split,
                    modality=record.get("modality_type") or record.get("modality"),
                    extra={k: v for k, v in record.items() if k not in MAPPED_KEYS})
    letter = letter_of(text_value(answer, "gt_answer"), choices)
    return mcq_sample(text_value(qid, "question_id"), text_value(question, "question"), choices, letter,
                      [ImageRef(text_value(image, "image_path"))], meta)


def image_root(path: str | os.PathLike) -> Path:
    path = Path(path).resolve()
    if path.parent.parent.name == "QA_information":
        return path.parent.parent.parent
    return path.parent
