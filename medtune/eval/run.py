"""Answer a task's questions with a generation backend, write the predictions as they come, then score them.

``medtune eval run`` calls :func:`run_from_args`; Python code calls :func:`run_task` with any backend
(:class:`medtune.eval.backends.LocalBackend`, :class:`~medtune.eval.backends.HTTPBackend`, or anything with
``name`` and ``answer(requests) -> list[str]``). The task side builds :class:`~medtune.eval.backends.Request`
objects and never learns which backend answers them.

    medtune eval run --task vqa-rad --model CHECKPOINT --out runs/vqa-rad          # or --endpoint URL
    torchrun --nproc_per_node 8 --no-python medtune eval run --task vqa-rad --model CHECKPOINT --out runs/vqa-rad

Design choices:

* Predictions are keyed by question id and appended, flushed, one line per answer
  (:class:`~medtune.eval.predictions.PredictionWriter`), each with the exact prompt text and the settings it
  was generated with. Running again into the same folder resumes: ids already in the file are not asked again.
  A resumed file whose recorded prompts or settings differ from this run's is refused (:class:`ResumeMismatch`)
  rather than mixed into one report.
* Questions are sent in batches of ``batch_size``. Pending questions are grouped by generation settings first
  (closed and open answers get different token budgets), so a local batch is one ``generate`` call instead of
  being split wherever the answer type changes. With an HTTP backend the batch size is the number of requests
  in flight. Greedy answers do not depend on batch composition (the Generator pads on the left), so the same
  questions give the same answers at any batch size, shard count or backend.
* Sharding: shard ``i`` of ``N`` (``--num-shards/--shard-index``, or ``torchrun``'s ``RANK``/``WORLD_SIZE``)
  answers its part of the task (``predictions.shard``) into its own file. Every shard, when it finishes, checks
  whether all shard files hold all their questions; the one that finds them complete (the last to finish)
  merges them into ``predictions.jsonl`` (every id exactly once, or a loud error) and scores. No process waits
  for another, so shards need no shared communication backend and may run on different machines sharing a
  folder; ``medtune eval merge SHARDS --task T --out predictions.jsonl`` does the same by hand. Two shards that
  finish at the same moment both merge and score; every file is written atomically, and with the same content.
* ``limit`` takes the first N questions in task order (before sharding); the report says so. The scoring task
  is limited the same way, so the report covers exactly the questions asked. Every prediction records the
  limit it was asked under, so ``medtune eval score`` on the file scores those N questions too (and says so)
  rather than counting the rest as missing. (``merge`` knows no limit.)
* A question whose image cannot be loaded is skipped and counted (raised at once when ``strict``); the run then
  writes no report, because a score that silently leaves questions out is not comparable. Fix the images and
  run again (answered questions are kept), or score the partial file with ``medtune eval score --allow-missing``.
* Scoring is :func:`medtune.eval.score.score_predictions`, the code ``medtune eval score`` runs, so a run's
  report equals a later rescoring of its ``predictions.jsonl`` (tested on the whole VQA-RAD test split).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from medtune.data.jsonl import RecordError, Tally
from medtune.data.schema import ImageRef, Sample
from medtune.data.shards import shard_rows
from medtune.eval import predictions as preds
from medtune.eval.backends import Backend, Request, Settings
from medtune.eval.metrics import DEFAULT_FAMILIES
from medtune.eval.score import LIMIT_FIELD, score_predictions
from medtune.eval.tasks import Task
from medtune.progress import progress_bar

ENDPOINT_KEY_ENV = "MEDTUNE_ENDPOINT_API_KEY"  # the endpoint's API key (else OPENAI_API_KEY), never an option
IMAGE_CACHE_SIZE = 16  # VQA benchmarks ask several questions about one image, usually one after another


class ResumeMismatch(ValueError):
    """The predictions being resumed were made with other prompts or settings than this run would use."""


@dataclass
class LimitedTask(Task):
    """A task restricted to its first ``limit`` questions (``None``: all of them)."""

    limit: int | None = None

    @classmethod
    def of(cls, task: Task, limit: int | None) -> Task:
        if limit is None:
            return task
        if limit < 1:
            raise ValueError(f"limit must be a positive number of questions, got {limit}")
        return cls(**{f.name: getattr(task, f.name) for f in fields(task)}, limit=limit)

    def samples(self, *, tally: Tally | None = None, strict: bool = False) -> list[Sample]:
        return super().samples(tally=tally, strict=strict)[:self.limit]

    def describe(self) -> dict:
        return {**super().describe(), "limit": self.limit}


@dataclass
class RunResult:
    """What one process did: its shard, how many questions it answered, and the score when it wrote one."""

    task: str
    shard_path: Path
    num_shards: int
    shard_index: int
    shard_questions: int            # questions in this shard
    already_answered: int           # of those, answered before this run (resume)
    answered: int                   # answered by this run
    seconds: float
    limit: int | None = None                       # only the task's first N questions
    skipped: Tally = field(default_factory=Tally)  # questions skipped (image errors), with reasons
    predictions_path: Path | None = None           # the complete (merged) predictions file, once there is one
    score: object | None = None                    # medtune.eval.score.ScoreResult, once scored
    extra_files: list = field(default_factory=list)  # what the backend added to the report (MoE expert usage)

    @property
    def questions_per_second(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def run_task(task: Task, backend: Backend, out_dir: str | os.PathLike, *, num_shards: int = 1, shard_index: int = 0,
             shard_mode: str = "modulo", batch_size: int = 8, limit: int | None = None, resume: bool = True,
             families: Sequence[str] = DEFAULT_FAMILIES, strict: bool = False, progress: bool = True,
             score: bool = True) -> RunResult:
    """Answer this shard's pending questions of ``task`` through ``backend`` and write them to ``out_dir``.

    When every shard is complete (always, for one shard) the predictions are merged into
    ``out_dir/predictions.jsonl`` and, with ``score``, scored into ``results.json/.md/.png`` there.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    task = LimitedTask.of(task, limit)
    samples = task.samples(strict=strict)
    path = preds.shard_path(out_dir, num_shards, shard_index)
    mine = shard_rows(samples, num_shards, shard_index, shard_mode)
    started = time.perf_counter()
    with preds.PredictionWriter(path, resume=resume) as writer:
        if writer.answered:
            _check_same_questions(path, task, mine)
        todo = preds.pending(samples, writer.answered, num_shards, shard_index, shard_mode)
        result = RunResult(task.name, path, num_shards, shard_index, len(mine), len(mine) - len(todo), 0, 0.0,
                           limit)
        bar = _progress_bar(len(mine), result.already_answered, f"{task.name} shard {shard_index + 1}/{num_shards}"
                            if num_shards > 1 else task.name, enabled=progress)
        with bar:
            for requests in _request_batches(task, todo, batch_size, result.skipped, strict=strict):
                answers = backend.answer([request for request, _ in requests])
                for (request, sample), answer in zip(requests, answers, strict=True):
                    writer.write(_record(task, sample, request, answer, backend, num_shards, shard_index,
                                         limit=limit))
                result.answered += len(requests)
                bar.update(len(requests))
    result.seconds = time.perf_counter() - started
    suffix = f".shard{shard_index}" if num_shards > 1 else ""
    result.extra_files = list(getattr(backend, "write_report", lambda out_dir, suffix: [])(out_dir, suffix=suffix))
    if result.skipped.n_skipped == 0:
        result.predictions_path = _merged_if_complete(out_dir, samples, num_shards, shard_mode)
    if score and result.predictions_path is not None:
        result.score = score_predictions(task, result.predictions_path, out_dir=out_dir, families=tuple(families))
    return result


def _check_same_questions(path: Path, task: Task, samples: Sequence[Sample]) -> None:
    """Refuse to resume a file whose answers were asked differently (prompt style, token budget ...):
    mixing them would make one report out of two experiments."""
    by_id = {sample.id: sample for sample in samples}
    for question_id, _, record in preds.iter_predictions(path, strict=True):
        sample = by_id.get(question_id)
        if sample is None or "prompt" not in record:
            continue
        now = {"prompt": task.prompt(sample), "settings": _settings(task, sample).to_dict()}
        for key, value in now.items():
            if record.get(key) != value:
                raise ResumeMismatch(f"{path}: question {question_id!r} was answered with {key} "
                                     f"{record.get(key)!r}, this run would use {value!r}; write to another "
                                     "folder (--out) or remove the file to start again")


def _record(task: Task, sample: Sample, request: Request, answer: str, backend: Backend,
            num_shards: int, shard_index: int, *, limit: int | None = None) -> dict:
    extra = {"task": task.name, "answer_type": sample.meta.answer_type, "backend": backend.name,
             "images": [image.to_dict() for image in sample.images]}
    if num_shards > 1:
        extra["shard"] = f"{shard_index}/{num_shards}"
    if limit is not None:   # what `eval score` reads to score the questions this run was asked, not the task's all
        extra[LIMIT_FIELD] = limit
    return preds.prediction_record(sample.id, answer, prompt=task.prompt(sample),
                                   settings=request.settings.to_dict(), **extra)


def _settings(task: Task, sample: Sample) -> Settings:
    values = task.settings_for(sample)
    values["stop"] = tuple(values.get("stop", ()))
    return Settings(**values)


def _request_batches(task: Task, samples: Sequence[Sample], batch_size: int, skipped: Tally, *,
                     strict: bool) -> Iterator[list[tuple[Request, Sample]]]:
    """Batches of (request, sample), same settings within a batch; images are loaded batch by batch."""
    by_settings: dict[Settings, list[Sample]] = {}
    for sample in samples:
        by_settings.setdefault(_settings(task, sample), []).append(sample)
    images = _ImageCache(task.image_root or task.data_path.parent)
    for settings, group in by_settings.items():
        for start in range(0, len(group), batch_size):
            batch = []
            for sample in group[start:start + batch_size]:
                request = _request(task, sample, settings, images, skipped, strict=strict)
                if request is not None:
                    batch.append((request, sample))
            if batch:
                yield batch


def _request(task: Task, sample: Sample, settings: Settings, images: "_ImageCache", skipped: Tally, *,
             strict: bool) -> Request | None:
    """The request for one question: the task's messages with each image reference loaded as a PIL image."""
    from medtune.data.images import ImageError

    messages = []
    try:
        for message in task.messages(sample):
            content = message["content"]
            if isinstance(content, list):
                content = [{"type": "image", "image": images.load(part["image"])} if part["type"] == "image"
                           else part for part in content]
            messages.append({"role": message["role"], "content": content})
    except ImageError as error:
        bad = RecordError(task.data_path, sample.id, f"image {error}")
        if strict:
            raise bad from None
        skipped.skip_error(bad, "image cannot be loaded")
        return None
    # what a backend may group its report by (modality, organ ...); never the answer
    meta = {key: value for key, value in {**sample.meta.extra, **sample.meta.to_dict()}.items()
            if key not in ("answer", "choices", "extra") and isinstance(value, (str, int, float))}
    return Request(str(sample.id), messages, settings, meta=meta)


class _ImageCache:
    """load_image with a small cache of the most recently used images."""

    def __init__(self, root: Path, size: int = IMAGE_CACHE_SIZE):
        self.root, self.size = root, size
        self.images: dict[ImageRef, object] = {}

    def load(self, ref: ImageRef):
        from medtune.data.images import load_image

        if ref in self.images:
            self.images[ref] = self.images.pop(ref)  # most recently used goes last
        else:
            self.images[ref] = load_image(ref, self.root)
            if len(self.images) > self.size:
                del self.images[next(iter(self.images))]
        return self.images[ref]


def _progress_bar(total: int, done: int, label: str, *, enabled: bool):
    # questions/s and the ETA count only this run's answers: `initial` marks the resumed ones as done; off a
    # terminal (a log, CI) the display is plain lines, as training's is. The unit is the summary's word.
    return progress_bar(total, desc=label, unit="questions", initial=done, enabled=enabled)


def _complete(path: Path, ids: Iterable[str]) -> bool:
    """Whether a shard file answers every one of ``ids`` (a line still being written does not count)."""
    if not path.is_file():
        return False
    answered = {qid for qid, _, _ in preds.iter_predictions(path, tally=Tally())}
    return all(str(i) in answered for i in ids)


def _merged_if_complete(out_dir, samples: list[Sample], num_shards: int, shard_mode: str) -> Path | None:
    """``predictions.jsonl`` once every shard is complete (merged here for more than one shard), else None."""
    out = Path(out_dir)
    paths = [preds.shard_path(out, num_shards, i) for i in range(num_shards)]
    for index, path in enumerate(paths):
        if not _complete(path, (s.id for s in shard_rows(samples, num_shards, index, shard_mode))):
            return None
    if num_shards == 1:
        return paths[0]
    merged = out / "predictions.jsonl"
    preds.merge_predictions(paths, merged, [s.id for s in samples])
    return merged


def summary(result: RunResult, out_dir) -> str:
    """The line a run ends with."""
    where = f"shard {result.shard_index + 1}/{result.num_shards}: " if result.num_shards > 1 else ""
    line = (f"{result.task}: {where}{result.shard_questions} questions, {result.already_answered} answered before, "
            f"{result.answered} answered now in {result.seconds:.1f} s ({result.questions_per_second:.2f} questions/s)")
    if result.skipped.n_skipped:
        line += f", {result.skipped.n_skipped} skipped"
    if result.score is not None:
        headline = ", ".join(f"{r.family} {r.answer_type} {r.metric} {r.estimate.value:.2f}"
                             for r in result.score.headline())
        return f"{line}\n{headline}\nreport in {out_dir}"
    if result.predictions_path is None and result.num_shards > 1 and not result.skipped.n_skipped:
        check = f" --task {result.task}" if result.limit is None else ""  # merge knows no limit
        line += ("\nother shards are still running: the last shard to finish merges and scores "
                 f"(or later: medtune eval merge {out_dir}/predictions.shard*.jsonl{check} "
                 f"--out {out_dir}/predictions.jsonl)")
    return line
