"""MedXpertQA MM (Zuo et al., 2025): ``MM/test.jsonl`` / ``MM/dev.jsonl`` of the TsinghuaC3I/MedXpertQA release,
images in ``images.zip``. Read only.

Layout, from the dataset card: JSON Lines of ``{"id": "MM-<n>", "question": "<text>\\nAnswer Choices: (A) ...
(E) ...", "options": {"A": ..., ..., "E": ...}, "label": "<letter>", "images": ["<file name>", ...],
"medical_task", "body_system", "question_type"}`` (five options for MM, ten for the Text subset, which has no
images and reads too).

* ``id`` is the id, ``label`` the answer's letter, ``options`` the choices in letter order.
* The question text repeats the options after "Answer Choices:"; that tail is cut from the bare question
  (``meta.extra["question"]``) so the prompt lists the options once.
* ``images`` are file names relative to ``images/`` beside the file, or beside its parent (the release keeps
  ``MM/`` and ``images/`` side by side), else the file's folder.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from medtune.data.formats.choices import letter_of, mcq_sample
from medtune.data.formats.records import (
    convert_records,
    iter_records,
    require,
    split_from_name,
    text_value,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Metadata, Sample

MAPPED_KEYS = {"id", "question", "options", "label", "images"}
_CHOICES_TAIL = re.compile(r"\s*Answer Choices:.*\Z", re.DOTALL)


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    convert = partial(medxpertqa_sample, split=split or split_from_name(path) or _split_of_dev(path))
    return convert_records(path, iter_records(path), convert, tally=tally, strict=strict)


def _split_of_dev(path) -> str | None:
    return "validation" if Path(path).stem == "dev" else None


def sniff(record: dict) -> bool:
    return {"id", "question", "options", "label"} <= set(record) and isinstance(record.get("options"), dict)


def medxpertqa_sample(record: Any, where: int | str, *, split: str | None) -> Sample:
    qid, question, options, label = require(record, "id", "question", "options", "label")
    if not isinstance(options, dict) or not options:
        raise ValueError("field 'options' must be an object of letter -> option text")
    letters = sorted(options)
    choices = [text_value(options[letter], f"options.{letter}").strip() for letter in letters]
    if letters != [chr(ord("A") + i) for i in range(len(letters))]:
        raise ValueError(f"options must be lettered A, B, ... without gaps, got {letters}")
    images = record.get("images") or []
    if not isinstance(images, list):
        raise ValueError("field 'images' must be a list of file names")
    meta = Metadata(source="medxpertqa", task="vqa", split=split,
                    extra={k: v for k, v in record.items() if k not in MAPPED_KEYS})
    bare = _CHOICES_TAIL.sub("", text_value(question, "question"))
    return mcq_sample(text_value(qid, "id"), bare, choices, letter_of(text_value(label, "label"), choices),
                      [ImageRef(text_value(i, "images")) for i in images], meta)


def image_root(path: str | os.PathLike) -> Path:
    path = Path(path)
    for folder in (path.parent / "images", path.parent.parent / "images"):
        if folder.is_dir():
            return folder
    return path.parent
