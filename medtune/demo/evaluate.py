"""The demo's evaluation step: answer a task's questions with the trained model, then score answers by id.

Answers come from :func:`medtune.eval.run.run_task` (the code behind ``medtune eval run``): greedy, batched per
answer type, each answer appended and flushed as it is produced, and an existing predictions file resumed, so
re-running the demo (or continuing after Ctrl-C) asks only the questions still missing. Scoring is done here
rather than by ``run_task`` because the model and both baselines go through the same :func:`score`, with the
demo's compatibility flavour, so their figures are comparable line by line. The answering shows the demo's
own display (medtune.train.progress: a bar on a terminal, plain lines in a log), advanced batch by batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medtune.data.schema import Sample
from medtune.eval import metrics
from medtune.eval.tasks import Task

FAMILIES = ("compat", "strict")


class LazyLocalBackend:
    """A :class:`~medtune.eval.backends.LocalBackend` that loads the model only when a question is asked, so
    a re-run whose answers are all on disk does not load it at all."""

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int, device: str, display=None):
        self.model_dir, self.batch_size, self.device = str(model_dir), batch_size, device
        self.name = f"local:{self.model_dir}"
        self.display = display   # advanced by the questions answered
        self._backend = None

    def answer(self, requests):
        if self._backend is None:
            from medtune.eval.backends import LocalBackend

            self._backend = LocalBackend(self.model_dir, batch_size=self.batch_size, device=self.device)
        answers = self._backend.answer(requests)
        if self.display is not None:
            self.display.update(len(answers))
        return answers


def answer_questions(task: Task, backend: LazyLocalBackend, out_dir: str | os.PathLike, *, limit: int | None):
    """Answer the task's (first ``limit``) questions not yet in ``out_dir`` with ``backend`` (shared between
    calls: the model loads once); (RunResult, {id: answer})."""
    from medtune.errors import UserError
    from medtune.eval.predictions import read_predictions, shard_path
    from medtune.eval.run import run_task
    from medtune.train.progress import progress_bar

    questions = len(task.samples()[:limit] if limit else task.samples())
    existing = shard_path(out_dir, 1, 0)
    answered = len(read_predictions(existing)) if existing.is_file() else 0
    answered = min(answered, questions)   # for the display only: run_task decides what is still asked
    with progress_bar(questions, initial=answered, desc=task.name, unit="questions",
                      enabled=answered < questions) as display:
        backend.display = display
        try:
            result = run_task(task, backend, out_dir, batch_size=backend.batch_size, limit=limit, score=False,
                              progress=False)
        finally:
            backend.display = None
    if result.predictions_path is None:
        raise UserError(f"{result.skipped.n_skipped} test questions could not be answered "
                        f"({'; '.join(result.skipped.details())}); nothing was scored")
    return result, read_predictions(result.predictions_path)


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
