"""The demo's evaluation step: answer a task's questions with a local model, then score answers by id.

This is a thin composition of the evaluation package, kept here because the demo needs exactly one path
through it: questions from a :class:`medtune.eval.tasks.Task`, answers from
:class:`medtune.eval.backends.LocalBackend` (greedy, batched), written one line at a time with
:class:`medtune.eval.predictions.PredictionWriter`, and scored with :mod:`medtune.eval.metrics`. The model
and the baselines go through the same :func:`score`, so their figures are comparable line by line.

Design choices:

* Predictions are appended and flushed as they are made, and an existing file is resumed: re-running the
  demo (or continuing after Ctrl-C) answers only the questions still missing.
* Questions are batched per answer type, because closed and open questions have different generation
  budgets and one ``generate`` call takes one setting.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from medtune.data.schema import Sample
from medtune.eval import metrics
from medtune.eval.tasks import Task

FAMILIES = ("compat", "strict")


@dataclass
class AnswerRun:
    """What :func:`answer_questions` did: answers by question id, and how many were already on disk."""

    predictions: dict[str, str]
    reused: int
    generated: int


def answer_questions(task: Task, samples: Sequence[Sample], model_dir: str | os.PathLike,
                     predictions_path: str | os.PathLike, *, batch_size: int = 16,
                     device: str = "cpu") -> AnswerRun:
    """Answer every sample not yet in ``predictions_path`` with the model in ``model_dir``."""
    from tqdm.auto import tqdm

    from medtune.eval.predictions import PredictionWriter, read_predictions

    with PredictionWriter(predictions_path, resume=True) as writer:
        already = set(writer.answered)
        pending = [s for s in samples if s.id not in already]
        if pending:
            from medtune.eval.backends import LocalBackend

            backend = LocalBackend(str(model_dir), batch_size=batch_size, device=device)
            with tqdm(total=len(pending), desc="answering", unit="question", dynamic_ncols=True) as bar:
                for batch in _batches(pending, batch_size):
                    _answer_batch(task, batch, backend, writer, model=str(model_dir))
                    bar.update(len(batch))
    answers = read_predictions(predictions_path)
    wanted = {s.id for s in samples}
    return AnswerRun({k: v for k, v in answers.items() if k in wanted}, reused=len(wanted & already),
                     generated=len(pending))


def _batches(samples: Sequence[Sample], size: int) -> Iterable[list[Sample]]:
    by_type: dict[str, list[Sample]] = {}
    for sample in samples:
        by_type.setdefault(sample.meta.answer_type, []).append(sample)
    for group in by_type.values():
        for start in range(0, len(group), size):
            yield group[start:start + size]


def _answer_batch(task: Task, batch: list[Sample], backend, writer, *, model: str) -> None:
    from medtune.eval.backends import Request, Settings
    from medtune.eval.predictions import prediction_record

    requests = [Request(s.id, _with_pixels(task, s), Settings(**task.settings_for(s))) for s in batch]
    for sample, request, text in zip(batch, requests, backend.answer(requests)):
        writer.write(prediction_record(sample.id, text, prompt=task.prompt(sample),
                                       settings=request.settings.to_dict(), task=task.name,
                                       answer_type=sample.meta.answer_type, model=model, backend="local"))


def _with_pixels(task: Task, sample: Sample) -> list[dict]:
    """The task's messages with each image reference replaced by the loaded RGB image."""
    from medtune.data.images import load_image

    messages = task.messages(sample)
    for message in messages:
        for part in message["content"]:
            if part.get("type") == "image":
                part["image"] = load_image(part["image"], task.image_root)
    return messages


@dataclass
class Scored:
    """One system's scores on the task: per-item figures and the aggregated rows."""

    name: str
    items: list[metrics.Item]
    scores: dict[str, dict]
    rows: list[metrics.Row]


def score(task_name: str, name: str, samples: Sequence[Sample], predictions: dict[str, str], *,
          compat_flavour: str, resamples: int = 1000, seed: int = 0) -> Scored:
    """Score ``predictions`` (every question must have one) with both metric families and bootstrap CIs."""
    items, _ = metrics.match_items(samples, predictions)
    scores = metrics.score_items(items, FAMILIES, compat_flavour=compat_flavour)
    rows = metrics.aggregate(task_name, items, scores, resamples=resamples, seed=seed)
    return Scored(name, items, scores, rows)


def write_answers(path: str | os.PathLike, predictions: dict[str, str], samples: Sequence[Sample],
                  system: str) -> Path:
    """A baseline's answers as a predictions file, so `medtune eval score` can rescore them."""
    import json

    from medtune.data.jsonl import atomic_open
    from medtune.eval.predictions import prediction_record

    with atomic_open(path) as handle:
        for sample in samples:
            record = prediction_record(sample.id, predictions[sample.id], prompt=sample.question, settings={},
                                       answer_type=sample.meta.answer_type, model=system, backend="baseline")
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)
