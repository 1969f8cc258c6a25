"""ProbMed (Yan et al., 2024): ``probmed.json`` of the rippleripple/ProbMed release. Read only.

Layout, from the benchmark's scorer (eric-ai-lab/ProbMed, ``eval/calculate_score.py``): a JSON list of yes/no
questions ``{"id" (the image's id: several questions share it), "image", "image_type" ("<modality>_<organ>",
e.g. ``x-ray_chest``), "question", "gt_ans" ("yes" | "no"), "qa_type"}``; ``qa_type`` names the probe
(``modality``, ``body_part``, ``abnormality``, ``entity``, ``grounding``, with ``gt`` / ``hallu`` for the
original question and its adversarial twin).

* Every question is ``closed``; ``gt_ans`` is the answer (stripped, lower-cased; as written in
  ``meta.extra["source_cells"]``, which the ``probmed`` family reads as ProbMed's script does). The question id is ``<id>-<qa_type>`` because ``id``
  alone repeats; should that still repeat within a file, later ones get ``#2``, ``#3`` (counted in a note).
* ``image_type`` is split at its first underscore into ``meta.modality`` and ``meta.organ``; ``id`` (the image),
  ``qa_type`` and ``image_type`` stay in ``meta.extra`` so ProbMed's paired scoring can be rebuilt from a report.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from medtune.data.formats.records import (
    convert_records,
    iter_records,
    require,
    split_from_name,
    text_value,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import SOURCE_CELLS, ImageRef, Metadata, Sample, qa_sample

MAPPED_KEYS = {"image", "question", "gt_ans"}


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    seen: dict[str, int] = {}
    convert = partial(probmed_sample, seen=seen, split=split or split_from_name(path) or "test")
    yield from convert_records(path, iter_records(path), convert, tally=tally, strict=strict)
    repeated = sum(n - 1 for n in seen.values())
    if repeated:
        tally.notes.append(f"{repeated} repeated ProbMed question ids given a #n suffix ({path})")


def sniff(record: dict) -> bool:
    return {"image", "question", "gt_ans", "qa_type"} <= set(record)


def probmed_sample(record: Any, where: int | str, *, seen: dict[str, int], split: str) -> Sample:
    image, question, answer, qa_type = require(record, "image", "question", "gt_ans", "qa_type")
    base = f"{text_value(record.get('id', where), 'id')}-{text_value(qa_type, 'qa_type')}"
    seen[base] = seen.get(base, 0) + 1
    sample_id = base if seen[base] == 1 else f"{base}#{seen[base]}"
    modality, _, organ = str(record.get("image_type") or "").partition("_")
    meta = Metadata(source="probmed", task="vqa", split=split, answer_type="closed",
                    modality=modality or None, organ=organ or None,
                    extra={**{k: v for k, v in record.items() if k not in MAPPED_KEYS},
                           SOURCE_CELLS: {"gt_ans": text_value(answer, "gt_ans")}})
    return qa_sample(sample_id, text_value(question, "question"), text_value(answer, "gt_ans").strip().lower(),
                     images=[ImageRef(text_value(image, "image"))], meta=meta)


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
