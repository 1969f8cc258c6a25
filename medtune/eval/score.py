"""Score a predictions file against a task's ground truth and write the report: the model-free path.

``medtune eval score`` calls :func:`score_predictions`; the generation path (``medtune eval run``) calls it too
once its predictions file is complete, so a run and a rescoring of its file give the same report.
Ground truth is a task (:func:`medtune.eval.tasks.get_task`) or any file a format reader understands.

The predictions of a limited run (``eval run --limit N``) record N in every line; such a file is scored on the
task's first N questions, the ones that run was asked, and the output says "scored N of M questions". A
question among those N without a prediction is still missing (refused, or wrong with ``allow_missing``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from medtune import __version__
from medtune.data.jsonl import Tally
from medtune.eval import circular, mcq, medmax, metrics, probmed, report
from medtune.eval.predictions import read_predictions
from medtune.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED
from medtune.eval.tasks import Task

log = logging.getLogger(__name__)

LIMIT_FIELD = "limit"  # in each prediction of a limited run (eval run --limit N): N


@dataclass
class ScoreResult:
    rows: list[metrics.Row]
    items: list[metrics.Item]
    scores: dict[str, dict]
    compat_table: metrics.CompatTable | None
    unexpected: list[str]
    tallies: dict[str, Tally] = field(default_factory=dict)  # ground_truth / predictions: read and skipped
    paths: dict[str, Path] = field(default_factory=dict)
    medmax_table: medmax.MedmaxTable | None = None
    mcq_routes: dict[str, int] | None = None   # vlmevalkit family: answers per matching route
    probmed_table: probmed.ProbmedTable | None = None   # probmed family: the script's figures

    def headline(self) -> list[metrics.Row]:
        return [r for r in self.rows if r.group_by == "all" and metrics.is_headline(r)]


def score_predictions(task: Task, predictions_path: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
                      families=metrics.DEFAULT_FAMILIES, compat_flavour: str = "med-moe",
                      candidates: list[str] | None = None, judge=None,
                      allow_missing: bool = False, strict: bool = False, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED, medmax_truth: str = "verbatim") -> ScoreResult:
    """Match predictions to ``task``'s questions by id, score every family, and write the report if asked.

    ``candidates``: LLaVA-Med's answer vocabulary (see :func:`read_candidates`), for its "open accuracy".
    ``medmax_truth``: ``verbatim`` (MedMax's rule) or ``normalised`` (see :mod:`medtune.eval.medmax`).
    A ``judge`` adds the ``judge`` family unless ``medmax`` is asked for, which judges open answers by its own
    rules; name both families to have both verdicts. A task's own families (``Task.scoring_families``, e.g.
    ``probmed`` for ProbMed) are always added.
    """
    families = tuple(families)
    families += tuple(f for f in getattr(task, "scoring_families", ()) if f not in families)
    if judge is not None and "judge" not in families and "medmax" not in families:
        families += ("judge",)
    gt_tally, pred_tally = Tally(), Tally()
    samples = task.samples(tally=gt_tally, strict=strict)
    task_questions, limit = len(samples), recorded_limit(predictions_path)
    if limit is not None and limit < task_questions:
        samples = samples[:limit]
        log.info("scored %d of %d questions (the run was limited to %d)", limit, task_questions, limit)
    predictions = read_predictions(predictions_path, tally=pred_tally, strict=strict)
    items, unexpected = metrics.match_items(samples, predictions, allow_missing=allow_missing)
    if unexpected:
        log.warning("%d predictions match no question of %s (first: %s); they are not scored",
                    len(unexpected), task.name, ", ".join(unexpected[:5]))
    scores = metrics.score_items(items, families, compat_flavour=compat_flavour, candidates=candidates, judge=judge,
                                 medmax_truth=medmax_truth)
    rows = metrics.aggregate(task.name, items, scores, resamples=resamples, seed=seed)
    if getattr(task, "circular", False):
        rows += circular.circular_rows(task.name, items, scores, resamples=resamples, seed=seed)
    probmed_table = None
    if probmed.FAMILY in scores:
        figures, probmed_table = probmed.paired_figures(samples, items, scores[probmed.FAMILY], resamples=resamples,
                                                        seed=seed)
        rows += [metrics.Row(task.name, probmed.FAMILY, "closed", f.metric, f.estimate, f.group_by, f.group, f.excluded)
                 for f in figures]
    routes = mcq.route_counts(items, scores[mcq.FAMILY]) if mcq.FAMILY in scores else None
    table = metrics.compat_table(items, scores["compat"], compat_flavour) if "compat" in scores else None
    medmax_table = medmax.table(items, scores["medmax"], medmax_truth) if "medmax" in scores else None
    result = ScoreResult(rows, items, scores, table, unexpected, {"ground_truth": gt_tally, "predictions": pred_tally},
                         medmax_table=medmax_table, mcq_routes=routes, probmed_table=probmed_table)
    if out_dir is not None:
        info = {"medtune_version": __version__, "task": task.describe(), "predictions": str(predictions_path),
                "families": list(families), "compat_flavour": compat_flavour,
                "references": references(families),
                "counts": {"questions": len(items), "task_questions": task_questions, "limit": limit,
                           "missing": [i.id for i in items if i.missing],
                           "unexpected": unexpected, "ground_truth": gt_tally.to_dict(),
                           "predictions": pred_tally.to_dict()}}
        result.paths = report.write_report(out_dir, rows=rows, items=items, scores=scores, info=info,
                                           compat_table=table, medmax_table=medmax_table, mcq_routes=routes,
                                           probmed_table=probmed_table,
                                           judge_records=getattr(judge, "records", None),
                                           resamples=resamples, seed=seed)
    return result


def references(families) -> dict[str, str]:
    """The reference script and commit each reference-rule family reproduces, for results.json."""
    named = {"medmax": medmax.REFERENCE, mcq.FAMILY: mcq.REFERENCE, probmed.FAMILY: probmed.REFERENCE}
    return {family: named[family] for family in families if family in named}


def recorded_limit(predictions_path: str | os.PathLike) -> int | None:
    """The limit a predictions file was answered under: the largest one its lines record (a run resumed with a
    larger limit extends the file), or None when any line has none (an unlimited run answered it)."""
    from medtune.eval.predictions import iter_predictions

    limits = [record.get(LIMIT_FIELD) for _, _, record in iter_predictions(predictions_path, tally=Tally())]
    if not limits or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in limits):
        return None
    return max(limits)


def read_candidates(path: str | os.PathLike) -> list[str]:
    """A LLaVA-Med candidate file (``{"0": [answers...]}``) or a JSON list of answers."""
    import json

    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    answers = data.get("0") if isinstance(data, dict) else data
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{path}: expected a JSON list of answers or LLaVA-Med's {{\"0\": [...]}} candidate file")
    return [str(a) for a in answers]
