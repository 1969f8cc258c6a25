"""Predictions files: written as they are produced, resumed by question id, sharded and merged safely.

A medtune predictions file is JSON Lines, one record per answered question::

    {"id": "11", "prediction": "yes", "prompt": "Is there ...?", "settings": {...}, "task": "vqa-rad", ...}

* :class:`PredictionWriter` appends and flushes one line per answer, so a killed run loses at most the
  answer being written. Opening an existing file resumes it: the ids already there are skipped by the
  caller (:meth:`PredictionWriter.answered`), and a half-written last line (the kill landed mid-write) is cut
  off first so the next record starts on a line of its own.
* Shards: question ``i`` (in task order) belongs to shard ``i % num_shards`` ("modulo", the default: every
  shard gets a similar mix of answer types and lengths, so shards finish together) or to the ``i``-th of
  ``num_shards`` contiguous blocks ("contiguous": each shard's output is a slice of the task order); chosen,
  resumed and checked by :mod:`medtune.data.shards`, as tokenize-images' shards are.
* :func:`merge_predictions` requires every expected id exactly once over all shard files and raises
  :class:`MergeError` naming the missing, duplicated and unexpected ids otherwise. (The Med-MoE scripts pair
  answers with questions by position, so a lost or doubled answer silently shifts every later score.)
* A generation run (``medtune eval run``) uses :func:`medtune.distributed.shard_from_env` (``torchrun`` or
  ``--num-shards/--shard-index``), :func:`shard_path`, :func:`pending` and :class:`PredictionWriter`, then
  :func:`merge_predictions` over the shard files.
* :func:`read_predictions` reads medtune's files and the LLaVA-Med / Med-MoE answer files (JSON lines with
  ``question_id`` and ``text``), keyed by question id as a string.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

from medtune.data.jsonl import Tally, atomic_open, iter_parsed
from medtune.data.shards import Coverage, coverage, first_few, shard_rows

T = TypeVar("T")


class MergeError(ValueError):
    """Shard files do not hold every expected id exactly once; the message names the offending ids."""

    def __init__(self, found: Coverage):
        self.missing, self.duplicated, self.unexpected = found.missing, found.duplicated, found.unexpected
        super().__init__("cannot merge predictions: " + found.describe("ids"))


def prediction_record(question_id: str, prediction: str, *, prompt: str, settings: dict, **extra: Any) -> dict:
    """One line of a medtune predictions file (``extra``: task, answer_type, model, backend, shard ...)."""
    return {"id": str(question_id), "prediction": prediction, "prompt": prompt, "settings": settings, **extra}


def parse_record(obj: Any) -> tuple[str, str]:
    """``(question id, answer text)`` from a medtune record or a LLaVA-Med / Med-MoE answer record."""
    if not isinstance(obj, dict):
        raise ValueError(f"a prediction must be a JSON object, got {type(obj).__name__}")
    if "id" in obj and "prediction" in obj:
        question_id, text = obj["id"], obj["prediction"]
    elif "question_id" in obj and "text" in obj:
        question_id, text = obj["question_id"], obj["text"]
    else:
        raise ValueError("a prediction needs 'id' and 'prediction' (medtune) or 'question_id' and 'text' "
                         f"(LLaVA-Med / Med-MoE answer file); got keys {sorted(obj)}")
    if isinstance(question_id, bool) or not isinstance(question_id, (str, int)) or str(question_id) == "":
        raise ValueError(f"question id must be a non-empty string or an integer, got {question_id!r}")
    if not isinstance(text, str):
        raise ValueError(f"the answer text must be a string, got {type(text).__name__}")
    return str(question_id), text


def iter_predictions(path: str | os.PathLike, *, tally: Tally | None = None,
                     strict: bool = False) -> Iterable[tuple[str, str, dict]]:
    """Yield ``(id, text, record)`` in file order; bad lines are counted (or raised when ``strict``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    return iter_parsed(path, lambda obj: (*parse_record(obj), obj), strict=strict, tally=tally)


def read_predictions(path: str | os.PathLike, *, tally: Tally | None = None, strict: bool = False) -> dict[str, str]:
    """``{question id: answer text}``; an id answered twice in one file is an error naming the id."""
    out: dict[str, str] = {}
    duplicated = []
    for question_id, text, _ in iter_predictions(path, tally=tally, strict=strict):
        if question_id in out:
            duplicated.append(question_id)
        out[question_id] = text
    if duplicated:
        raise ValueError(f"{path}: {len(duplicated)} question ids answered more than once: {first_few(duplicated)}")
    return out


class PredictionWriter:
    """Append predictions one line at a time, flushed, resuming an existing file.

    ``with PredictionWriter(path) as writer: ... if qid not in writer.answered: writer.write(record)``
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = True):
        self.path = Path(path)
        self.resume = resume
        self.answered: set[str] = set()
        self.dropped_partial_line = False
        self._handle = None

    def __enter__(self) -> "PredictionWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.resume:
            raise FileExistsError(f"{self.path} exists; resume it or choose another output")
        if self.path.exists():
            self.dropped_partial_line = _cut_partial_last_line(self.path)
            self.answered = set(read_predictions(self.path, strict=True))
        self._handle = open(self.path, "a", encoding="utf-8")
        return self

    def write(self, record: dict) -> None:
        question_id, _ = parse_record(record)
        if question_id in self.answered:
            raise ValueError(f"{self.path}: question {question_id!r} is already answered in this file")
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()  # an interrupted run keeps every answer written so far
        self.answered.add(question_id)

    def __exit__(self, *exc) -> None:
        self._handle.close()


def _cut_partial_last_line(path: Path) -> bool:
    """Truncate a last line that has no newline (a write cut short); True when something was cut."""
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data or data.endswith(b"\n"):
            return False
        handle.truncate(data.rfind(b"\n") + 1)
        return True


def shard_path(out_dir: str | os.PathLike, num_shards: int, shard_index: int) -> Path:
    """Where a run writes its predictions: ``predictions.jsonl``, or one file per shard when sharded."""
    if num_shards == 1:
        return Path(out_dir) / "predictions.jsonl"
    return Path(out_dir) / f"predictions.shard{shard_index:03d}-of-{num_shards:03d}.jsonl"


def pending(items: Sequence[T], answered: set[str], num_shards: int = 1, shard_index: int = 0,
            mode: str = "modulo", *, key=lambda item: item.id) -> list[T]:
    """This shard's items whose id is not answered yet, in task order (what a resumed run still asks)."""
    return [item for item in shard_rows(items, num_shards, shard_index, mode) if str(key(item)) not in answered]


def merge_predictions(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                      expected_ids: Sequence[str] | None = None) -> int:
    """Merge shard files into ``out_path`` (atomically), in ``expected_ids`` order when given.

    Every expected id must appear exactly once over all shards; otherwise :class:`MergeError` is raised
    and nothing is written. Returns the number of records written.
    """
    records: dict[str, dict] = {}
    found: list[str] = []
    for path in shard_paths:
        for question_id, _, record in iter_predictions(path, strict=True):
            records[question_id] = record
            found.append(question_id)
    order = [str(i) for i in expected_ids] if expected_ids is not None else list(records)
    check = coverage(order, found)
    if not check.complete:
        raise MergeError(check)
    with atomic_open(out_path) as handle:
        for question_id in order:
            handle.write(json.dumps(records[question_id], ensure_ascii=False) + "\n")
    return len(order)
