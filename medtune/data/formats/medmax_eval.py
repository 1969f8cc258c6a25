"""MedMax's evaluation release (``mint-medmax/medmax_eval_data``): the questions MedMax scores its twelve VQA tasks
on, one table for all of them, images in ``images.tar.gz``. Read only.

Layout, from MedMax's evaluation script (Hritikbansal/medmax ``evaluation/vqa.py`` at 20b7055, which filters the
table by ``task_name`` and ``question_type`` and reads ``prompt``, ``answer`` and ``image_path``): rows
``{"task_name": "vqa_rad" | "slake" | "pathvqa" | "quilt_vqa" | "pmc_vqa" | "omnimed_vqa" | "path_mmu" |
"probmed", "question_type": "closed" | "open" | "mcq", "prompt", "answer", "image_path"}``, ``image_path``
relative to the folder the images were unpacked into. Read as JSON, JSON Lines or CSV.

* ``task_name`` / ``question_type`` options keep one task (the others are left out on purpose and counted as
  "another MedMax task"), as MedMax's script does.
* The prompt is MedMax's text and is sent **verbatim** (``meta.extra["prompt_verbatim"]``): the options of an mcq
  question are already in it, and MedMax's numbers were made with exactly that text. ``answer`` is lowercase
  yes/no for closed questions and the option letter for mcq ones; the cell as written (unstripped) is also kept
  as ``meta.extra["source_cells"]["answer"]``, which the ``medmax`` metric family compares with, as MedMax does.
* mcq options are read back from the prompt's lines that start with a letter (``A:``, ``A.``, ``(A)``); when
  none do, the choices are the letters A-D themselves (scoring compares letters, so nothing depends on the text).
* The id is the row's ``id`` / ``question_id`` when the table has one, else ``<task_name>-<question_type>-<row>``
  (the row's position in the file, so the same file always gives the same ids; a Parquet row's number counts from
  1, as a JSON Lines line does).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from medtune.data.formats import parquet
from medtune.data.formats.choices import letter_of
from medtune.data.formats.pmc_vqa import raw_records as table_records
from medtune.data.formats.records import (
    Skip,
    convert_records,
    record_id,
    require,
    text_value,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import SOURCE_CELLS, ImageRef, Metadata, Sample, qa_sample

MAPPED_KEYS = {"task_name", "question_type", "prompt", "answer", "image_path", "id", "question_id"}
TASKS = (("vqa_rad", "closed"), ("slake", "closed"), ("pathvqa", "closed"), ("quilt_vqa", "closed"),
         ("vqa_rad", "open"), ("slake", "open"), ("pathvqa", "open"), ("quilt_vqa", "open"),
         ("pmc_vqa", "mcq"), ("omnimed_vqa", "mcq"), ("path_mmu", "mcq"), ("probmed", "closed"))
_OPTION_LINE = re.compile(r"^\s*\(?([A-H])[:.)]\s*(.+?)\s*$", re.MULTILINE)
raw_records = table_records
READS_PARQUET = True


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, task_name: str | None = None,
         question_type: str | None = None) -> Iterator[Sample]:
    convert = partial(medmax_eval_sample, path=path, task_name=task_name, question_type=question_type)
    return convert_records(path, parquet.records_or(path, raw_records), convert, tally=tally, strict=strict)


def sniff(record: dict) -> bool:
    return {"task_name", "question_type", "prompt", "answer"} <= set(record)


def medmax_eval_sample(record: Any, where: int | str, *, path, task_name: str | None,
                       question_type: str | None) -> Sample:
    name, kind, prompt, answer = require(record, "task_name", "question_type", "prompt", "answer")
    if (task_name and name != task_name) or (question_type and kind != question_type):
        raise Skip("another MedMax task")
    if kind not in ("closed", "open", "mcq"):
        raise ValueError(f"question_type must be closed, open or mcq, got {kind!r}")
    raw_answer = text_value(answer, "answer")
    prompt, answer = text_value(prompt, "prompt"), raw_answer.strip()
    image = record.get("image_path")
    meta = Metadata(source=f"medmax-eval:{name}", task="vqa", split="test", answer_type=kind,
                    extra={"task_name": name, "prompt_verbatim": True, SOURCE_CELLS: {"answer": raw_answer},
                           **{k: v for k, v in record.items() if k not in MAPPED_KEYS}})
    if kind == "mcq":
        found = dict(_OPTION_LINE.findall(prompt))
        letters = sorted(found)
        choices = [found[letter] for letter in letters] if letters[:2] == ["A", "B"] else list("ABCD")
        meta.choices = choices
        meta.extra["answer_label"] = letter_of(answer, choices)
        answer = choices["ABCDEFGH".index(meta.extra["answer_label"])]
    sample_id = record_id(record, path, where, "id", "question_id")
    if "id" not in record and "question_id" not in record:
        sample_id = f"{name}-{kind}-{str(where).strip('[]')}"
    return qa_sample(sample_id, prompt, answer, images=[ImageRef(text_value(image, "image_path"))] if image else [],
                     meta=meta)


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
