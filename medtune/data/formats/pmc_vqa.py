"""PMC-VQA style multiple choice (Zhang et al., 2023): CSV (``train.csv``, ``test_clean.csv``), a JSON list or
JSON Lines with ``Figure_path, Question, Choice A .. Choice D, Answer, Answer_label``. Read only.

* Choices arrive as ``"A:Diffuse uptake pattern"``; the letter prefix is removed, so ``meta.choices`` is the
  list of option texts in letter order.
* The correct letter comes from ``Answer_label``, else from ``Answer`` when that is a single letter, else from
  the choice whose text equals ``Answer``. ``meta.answer`` (and the assistant turn) is **the option text** of
  that letter; the letter itself is ``meta.extra["answer_label"]``, so a scorer can accept either. When the
  file's ``Answer`` text differs from the option text it is kept as ``meta.extra["answer_text"]``.
* The user turn is the question followed by one line per option (``"A: ..."``), because a model needs the
  options to answer; the bare question is ``meta.extra["question"]``. ``answer_type`` is ``mcq``.
* id: ``index`` / ``qid`` / ``id`` column when present, else ``<file stem>-<row>``. Split from a ``split``
  column or the file name. Images are relative to ``images/`` beside the file when it exists.
"""
from __future__ import annotations

import csv
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from medtune.data.formats.records import (
    convert_records, existing_subfolder, iter_records, record_id, require, split_from_name, text_value,
)
from medtune.data.files import readable_text_file
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Metadata, Sample, qa_sample

LETTERS = "ABCDEF"
MAPPED_KEYS = {"Figure_path", "Question", "Answer", "Answer_label", "split", "index", "qid", "id",
               *(f"Choice {letter}" for letter in LETTERS)}


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    records = raw_records(path)
    convert = partial(pmc_vqa_sample, path=path, forced_split=split, file_split=split_from_name(path))
    return convert_records(path, records, convert, tally=tally, strict=strict)


def raw_records(path: str | os.PathLike) -> Iterator[tuple[int | str, Any]]:
    """CSV/TSV rows (by suffix), else the records of a JSON list or JSON Lines file."""
    return iter_csv(path) if Path(path).suffix.lower() in (".csv", ".tsv") else iter_records(path)


def sniff(record: dict) -> bool:
    return {"Figure_path", "Question", "Choice A"} <= set(record)


def iter_csv(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Rows as dicts with their line number (streamed; quoted fields may span lines)."""
    readable_text_file(path)
    delimiter = "\t" if Path(path).suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, row


def pmc_vqa_sample(record: Any, where: int | str, *, path, forced_split: str | None,
                   file_split: str | None) -> Sample:
    image, question = require(record, "Figure_path", "Question")
    question = text_value(question, "Question").strip()
    choices = _choices(record)
    letter = _answer_letter(record, choices)
    option = choices[LETTERS.index(letter)]
    extra = {k: v for k, v in record.items() if k not in MAPPED_KEYS and k is not None}
    extra.update(question=question, answer_label=letter)
    answer_text = str(record.get("Answer") or "").strip()
    if answer_text and answer_text not in (letter, option):
        extra["answer_text"] = answer_text
    prompt = question + "".join(f"\n{LETTERS[i]}: {choice}" for i, choice in enumerate(choices))
    meta = Metadata(source="pmc-vqa", task="vqa", split=forced_split or record.get("split") or file_split,
                    answer_type="mcq", choices=choices, extra=extra)
    sample_id = record_id(record, path, where, "index", "qid", "id")
    return qa_sample(sample_id, prompt, option, images=[ImageRef(text_value(image, "Figure_path"))], meta=meta)


def _choices(record: dict) -> list[str]:
    choices = []
    for letter in LETTERS:
        value = record.get(f"Choice {letter}")
        if value in (None, ""):
            break
        text = text_value(value, f"Choice {letter}").strip()
        # "A:Diffuse uptake" / "A. Diffuse" / "A) Diffuse": drop the letter the column already gives.
        choices.append(re.sub(rf"^{letter}\s*[:.)]\s*", "", text))
    if len(choices) < 2:
        raise ValueError("multiple-choice record needs at least 'Choice A' and 'Choice B'")
    return choices


def _answer_letter(record: dict, choices: list[str]) -> str:
    valid = LETTERS[:len(choices)]
    for key in ("Answer_label", "Answer"):
        value = str(record.get(key) or "").strip().upper().rstrip(":.)")
        if len(value) == 1 and value in valid:
            return value
    answer = str(record.get("Answer") or "").strip().lower()
    for letter, choice in zip(valid, choices):
        if answer and choice.lower() == answer:
            return letter
    raise ValueError(f"answer matches no choice: Answer_label {record.get('Answer_label')!r}, "
                     f"Answer {record.get('Answer')!r}")


def image_root(path: str | os.PathLike) -> Path:
    return existing_subfolder(path, "images")
