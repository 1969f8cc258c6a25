"""LLaVA-Med / Med-MoE VQA test files: LLaVA conversation records plus ``answer_type``. Read only.

``[{"id", "image", "conversations" (or "conversatons", sic), "answer_type": "CLOSED" | "OPEN" | "close" ...}]``
as Med-MoE's ``run_eval.py`` reads them. The record ``id`` is kept as ``Sample.id`` (it is the
``question_id`` that answer files refer to); ``answer_type`` is normalised into ``meta.answer_type``;
``meta.answer`` is the last assistant turn (the reference answer); ``source`` is taken from the record when it
has one, else ``llava-med-vqa``. Other fields are kept in ``meta.extra``.
"""
from __future__ import annotations

import dataclasses
import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from medtune.data.formats.llava import KNOWN_KEYS, llava_sample
from medtune.data.formats.llava import sniff as llava_sniff
from medtune.data.formats.records import TurnStats, convert_records, iter_records, split_from_name
from medtune.data.jsonl import Tally
from medtune.data.schema import Sample

MAPPED_KEYS = KNOWN_KEYS | {"answer_type", "source", "split"}


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    stats = TurnStats()
    convert = partial(llava_med_vqa_sample, path=path, stats=stats, split=split or split_from_name(path))
    yield from convert_records(path, iter_records(path), convert, tally=tally, strict=strict)
    stats.add_notes(tally, path)


def sniff(record: dict) -> bool:
    """A LLaVA record with an ``answer_type``: a VQA test file (this format refines ``llava``)."""
    return llava_sniff(record) and "answer_type" in record


def llava_med_vqa_sample(record: Any, where: int | str, *, path, stats: TurnStats, split: str | None) -> Sample:
    sample = llava_sample(record, where, path=path, stats=stats, known_keys=MAPPED_KEYS)
    answers = [m.text for m in sample.messages if m.role == "assistant"]
    # replace() re-runs validation, which normalises answer_type ("close", "CLOSED ") and names a bad one.
    sample.meta = dataclasses.replace(
        sample.meta, answer_type=record.get("answer_type"), answer=answers[-1] if answers else None,
        source=str(record.get("source") or "llava-med-vqa"), split=record.get("split") or split,
        task=sample.meta.task or "vqa")
    return sample


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
