"""PathMMU (Sun et al., 2024): ``data.json`` of the jamessyx/PathMMU release, images under ``images/``. Read only.

Layout, from the benchmark's loader (PathMMU-Benchmark/PathMMU, ``eval/utils/data_utils.py``): one JSON object
``{subset: {split: [question, ...]}}`` with subsets ``PubMed``, ``SocialPath``, ``EduContent``, ``Atlas``,
``PathCLS`` and splits ``val``, ``test``, ``test_tiny``; each question is
``{"No", "question", "options": ["(A) text", ...], "answer": "A..." (its first character is the letter),
"img": "<path under images/>"}``. The loader skips questions whose image is missing; here they are read and the
missing image is reported when the question is asked.

* ``subset`` and ``split`` options choose one part (default: every part); the sample id is
  ``<subset>_<split>-<No>`` (``No`` alone repeats across parts). ``meta.split`` is ``validation`` for ``val``
  and ``test`` for ``test`` / ``test_tiny`` (the exact split is ``meta.extra["pathmmu_split"]``).
* A JSON list (or JSON Lines) of such questions, e.g. one part saved on its own, is read too: then the id is
  ``No`` and the subset/split come from ``subset`` / ``split`` fields when present.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from medtune.data.files import readable_text_file
from medtune.data.formats.choices import letter_of, mcq_sample
from medtune.data.formats.records import (
    Skip,
    convert_records,
    existing_subfolder,
    iter_records,
    require,
    text_value,
)
from medtune.data.jsonl import RecordError, Tally
from medtune.data.schema import ImageRef, Metadata, Sample

MAPPED_KEYS = {"No", "question", "options", "answer", "img", "subset", "split"}
SPLITS = {"val": "validation", "test": "test", "test_tiny": "test"}
_OPTION_PREFIX = re.compile(r"^\s*\(?[A-Za-z]\)\s*")


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, subset: str | None = None,
         split: str | None = None) -> Iterator[Sample]:
    convert = partial(pathmmu_sample, subset=subset, split=split)
    return convert_records(path, raw_records(path), convert, tally=tally, strict=strict)


def raw_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """The questions of ``data.json`` with ``subset`` / ``split`` added, or the records of a list file."""
    path = readable_text_file(path)
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(4096).lstrip("\ufeff \t\r\n")
    if not head.startswith("{") or head.startswith('{"No"'):
        yield from iter_records(path)
        return
    try:  # data.json is a few MB: one nested object, read whole
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except ValueError as error:
        yield "[?]", RecordError(path, "line 1", f"not valid JSON ({error})", tail=True)
        return
    for subset_name, splits in (data.items() if isinstance(data, dict) else []):
        for split_name, questions in (splits.items() if isinstance(splits, dict) else []):
            for i, question in enumerate(questions if isinstance(questions, list) else []):
                if isinstance(question, dict):
                    question = {**question, "subset": subset_name, "split": split_name}
                yield f"{subset_name}.{split_name}[{i}]", question


def sniff(record: dict) -> bool:
    return {"No", "question", "options", "answer", "img"} <= set(record)


def pathmmu_sample(record: Any, where: int | str, *, subset: str | None, split: str | None) -> Sample:
    number, question, options, answer, image = require(record, "No", "question", "options", "answer", "img")
    part_subset, part_split = record.get("subset"), record.get("split")
    if (subset and part_subset != subset) or (split and part_split != split):
        raise Skip("another PathMMU subset or split")
    if not isinstance(options, list):
        raise ValueError("field 'options' must be a list of \"(A) text\" strings")
    choices = [_OPTION_PREFIX.sub("", text_value(o, "options")).strip() for o in options]
    answer = text_value(answer, "answer").strip()
    letter = letter_of(answer[0], choices) if answer else None
    number = text_value(number, "No")
    sample_id = f"{part_subset}_{part_split}-{number}" if part_subset and part_split else number
    extra = {k: v for k, v in record.items() if k not in MAPPED_KEYS}
    extra.update({"subset": part_subset, "pathmmu_split": part_split} if part_subset else {})
    meta = Metadata(source="pathmmu", task="vqa", split=SPLITS.get(str(part_split)), extra=extra)
    return mcq_sample(sample_id, text_value(question, "question"), choices, letter,
                      [ImageRef(text_value(image, "img"))], meta)


def image_root(path: str | os.PathLike) -> Path:
    return existing_subfolder(path, "images")
