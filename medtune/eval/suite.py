"""Benchmark suites: a named list of tasks run one after another into one report (``medtune eval suite NAME``).

``medmax-12``  MedMax's twelve VQA tasks (VQA-RAD, SLAKE, PathVQA, Quilt-VQA closed and open; PMC-VQA,
               OmniMedVQA, PathMMU multiple choice; ProbMed closed) from MedMax's own evaluation release (one
               file: ``--data medmax_eval_data.jsonl --image-root <unpacked images>``), with MedMax's generation
               protocol and its metric family (:mod:`medtune.eval.medmax`). Open tasks need a judge to be scored
               (``--judge-endpoint``); without one their rows say "not judged" (n 0, excluded counted).
``gmai``       what GMAI-VL reports through VLMEvalKit: GMAI-MMBench (VAL), OmniMedVQA, MMMU Health & Medicine
               (validation), with the ``vlmevalkit`` multiple-choice family; each task's file is given as
               ``--data TASK=PATH``.

Each task runs into ``OUT/<task>/`` exactly as ``medtune eval run`` would (same predictions file, resume and
report), so a suite can be resumed and any task rescored alone. The suite report (``suite.json`` and
``suite.md`` in ``OUT``) has one row per task, its score (the suite family's headline for the task's answer type)
with n and 95% interval, and the macro average over tasks. The macro average's interval is a stratified
bootstrap: each resample draws every task's items with replacement within that task and averages the task means,
so a small task widens it as much as it should and no more.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medtune.data.jsonl import atomic_open, write_json
from medtune.eval.metrics import HEADLINE
from medtune.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, Estimate, estimate
from medtune.eval.tasks import Task, get_task

SUITE_JSON, SUITE_MARKDOWN = "suite.json", "suite.md"


@dataclass(frozen=True)
class SuiteTask:
    """One row of a suite: its name, the built-in task it runs and the reader options that select it."""

    name: str
    task: str
    answer_type: str
    reader_options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[SuiteTask, ...]
    family: str
    protocol: str = "medtune"
    one_file: bool = False
    """All tasks read the same ``--data`` file (MedMax's release), selected by their reader options."""


def _medmax_tasks() -> tuple[SuiteTask, ...]:
    from medtune.data.formats.medmax_eval import TASKS
    return tuple(SuiteTask(f"{name}-{kind}", "medmax-eval", kind,
                           (("task_name", name), ("question_type", kind))) for name, kind in TASKS)


SUITES: dict[str, Suite] = {suite.name: suite for suite in (
    Suite("medmax-12", "MedMax's 12 VQA tasks from its evaluation release, MedMax protocol and rules",
          _medmax_tasks(), family="medmax", protocol="medmax", one_file=True),
    Suite("gmai", "GMAI-VL's VLMEvalKit benchmarks: GMAI-MMBench VAL, OmniMedVQA, MMMU medical validation",
          (SuiteTask("gmai-mmbench", "gmai-mmbench", "mcq"), SuiteTask("omnimedvqa", "omnimedvqa", "mcq"),
           SuiteTask("mmmu-medical", "mmmu-medical", "mcq")), family="vlmevalkit"),
)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r} (known: {', '.join(SUITES)})")
    return SUITES[name]


@dataclass
class SuiteRow:
    task: str
    answer_type: str
    metric: str
    estimate: Estimate
    excluded: int = 0
    values: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"task": self.task, "answer_type": self.answer_type, "metric": self.metric,
                **self.estimate.to_dict(), **({"excluded": self.excluded} if self.excluded else {})}


def suite_tasks(suite: Suite, data: dict[str, Path], image_roots: dict[str, Path] | None = None, *,
                circular: bool = False) -> list[Task]:
    """The suite's tasks with their data; ``data``/``image_roots`` map a task name (or ``*``: every task) to a
    path. A task without data is an error naming every such task, before anything runs."""
    image_roots = image_roots or {}
    missing = [t.name for t in suite.tasks if t.name not in data and "*" not in data]
    if missing:
        how = "--data PATH (MedMax's release file)" if suite.one_file else "--data TASK=PATH for each"
        raise FileNotFoundError(f"suite {suite.name!r} needs data for {', '.join(missing)}: pass {how}")
    tasks = []
    for spec in suite.tasks:
        task = get_task(spec.task, data=data.get(spec.name, data.get("*")),
                        image_root=image_roots.get(spec.name, image_roots.get("*")), protocol=suite.protocol,
                        circular=circular, **dict(spec.reader_options))
        tasks.append(replace(task, name=spec.name))
    return tasks


def run_suite(suite: Suite, tasks: Sequence[Task], out_dir: str | os.PathLike,
              run_one: Callable[[Task, Path], Any], *, resamples: int = DEFAULT_RESAMPLES,
              seed: int = DEFAULT_SEED) -> list[SuiteRow]:
    """Run each task with ``run_one(task, folder)`` (which returns a ScoreResult, or an object with ``.score``)
    and write the suite report; returns its rows (tasks, then the macro average)."""
    out = Path(out_dir)
    rows = []
    for task, spec in zip(tasks, suite.tasks):
        result = run_one(task, out / task.name)
        score = getattr(result, "score", result)
        if score is None:
            raise RuntimeError(f"suite {suite.name}: task {task.name} wrote no report (see its output above)")
        rows.append(task_row(task.name, spec.answer_type, suite.family, score, resamples=resamples, seed=seed))
    rows.append(macro_row(rows, resamples=resamples, seed=seed))
    write_suite_report(out, suite, rows, tasks, resamples=resamples, seed=seed)
    return rows


def task_row(name: str, answer_type: str, family: str, score, *, resamples: int, seed: int) -> SuiteRow:
    """The suite family's headline on the task's answer type, from a ScoreResult's per-item figures."""
    metric = HEADLINE[family][answer_type]
    per_item = score.scores.get(family, {})
    values = [per_item.get(i.id, {}).get(metric) for i in score.items if i.answer_type == answer_type]
    present = [v for v in values if v is not None]
    return SuiteRow(name, answer_type, metric, estimate(present, resamples=resamples, seed=seed),
                    excluded=len(values) - len(present), values=present)


def macro_row(rows: list[SuiteRow], *, resamples: int, seed: int) -> SuiteRow:
    """The mean of the task scores (tasks with no scored item are left out), with a stratified bootstrap."""
    scored = [r for r in rows if r.values]
    if not scored:
        return SuiteRow("macro average", "all", "accuracy", Estimate(math.nan, 0, math.nan, math.nan))
    value = sum(r.estimate.value for r in scored) / len(scored)
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for row in scored:
        data = np.asarray(row.values, dtype=np.float64)
        means += data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    means = means / len(scored) * 100
    low, high = np.percentile(means, [2.5, 97.5])
    return SuiteRow("macro average", "all", "accuracy", Estimate(value, len(scored), float(low), float(high)),
                    excluded=len(rows) - len(scored))


def write_suite_report(out: Path, suite: Suite, rows: list[SuiteRow], tasks: Sequence[Task], *,
                       resamples: int, seed: int) -> dict[str, Path]:
    paths = {"json": out / SUITE_JSON, "markdown": out / SUITE_MARKDOWN}
    write_json(paths["json"], {"suite": suite.name, "family": suite.family, "protocol": suite.protocol,
                               "bootstrap": {"method": "percentile (stratified by task for the macro average)",
                                             "resamples": resamples, "seed": seed, "level": 0.95},
                               "tasks": [t.describe() for t in tasks], "rows": [r.to_dict() for r in rows]})
    with atomic_open(paths["markdown"]) as handle:
        handle.write(markdown(suite, rows))
    return paths


def markdown(suite: Suite, rows: list[SuiteRow]) -> str:
    lines = [f"# medtune eval suite: {suite.name}", "", (f"{suite.description}; family `{suite.family}`. "
                                                          "The macro average is the mean of the task scores "
                                                          "(n: tasks)."), "",
             "| task | answer type | metric | n | score | 95% CI |", "| --- | --- | --- | ---: | ---: | --- |"]
    for row in rows:
        e = row.estimate
        n = f"{e.n}" + (f" ({row.excluded} excluded)" if row.excluded else "")
        value = "n/a" if math.isnan(e.value) else f"{e.value:.2f}"
        interval = "" if math.isnan(e.low) else f"[{e.low:.2f}, {e.high:.2f}]"
        lines.append(f"| {row.task} | {row.answer_type} | {row.metric} | {n} | {value} | {interval} |")
    return "\n".join(lines) + "\n"
