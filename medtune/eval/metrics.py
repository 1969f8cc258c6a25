"""Scoring predictions against ground truth: items, metric families, and the rows of a report.

The pipeline is three small steps, each usable alone:

1. :func:`match_items` pairs ground-truth samples with predictions **by question id** (never by position)
   and says which ids are missing or unexpected; a missing prediction is an error unless the caller allows
   it, in which case it is scored as an empty answer (wrong), never left out of the denominator.
2. :func:`score_items` computes per-item figures for each family: ``compat`` (LLaVA-Med / Med-MoE
   compatibility, :mod:`medtune.eval.compat`), ``strict`` (:mod:`medtune.eval.strict`), ``judge``
   (an LLM judge for open answers, :mod:`medtune.eval.judge`, only when a judge is given) and ``medmax``
   (MedMax's rules, :mod:`medtune.eval.medmax`; its open answers go to the judge when there is one),
   ``vlmevalkit`` and ``letter`` (multiple choice as VLMEvalKit matches it, and letter-only;
   :mod:`medtune.eval.mcq`), ``probmed`` (ProbMed's yes/no rule; its paired accuracy is added by
   :func:`medtune.eval.probmed.paired_figures`, since it needs the questions' pairing, not just their answers).
3. :func:`aggregate` turns per-item figures into :class:`Row` s: every metric per answer type with n and a
   95% bootstrap interval; an ``all`` accuracy row across answer types (strict and judge: each item right
   or wrong on its type's headline); headline metrics again per organ and per modality where present.

A per-item figure of ``None`` means the item is left out of that metric: the reference script would leave
it out (the ``llava-med-init`` flavour's yes/no quirk, MedMax's unparsed judge verdicts) or nothing could
score it (``medmax`` open answers without a judge); such items are counted in ``Row.excluded`` so nothing
vanishes unseen.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from medtune.data.schema import ANSWER_LABEL, SOURCE_CELLS, Sample
from medtune.eval import compat, mcq, medmax, probmed, strict
from medtune.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, Estimate, estimate

FAMILIES = ("compat", "strict", "judge", "medmax", "vlmevalkit", "letter", "probmed")
DEFAULT_FAMILIES = ("compat", "strict")
HEADLINE = {"compat": compat.HEADLINE, "strict": strict.HEADLINE, "judge": {"open": "accuracy"},
            "medmax": medmax.HEADLINE, "vlmevalkit": mcq.HEADLINE, "letter": mcq.HEADLINE,
            "probmed": probmed.HEADLINE}
# Headline figures over sets of questions rather than one question (ProbMed's paired accuracy), by family.
SET_HEADLINES = {"probmed": probmed.SET_METRICS}
BREAKDOWNS = ("organ", "modality")


class MissingPredictions(ValueError):
    """Ground-truth questions without a prediction; the message names them."""


@dataclass
class Item:
    """One question with its ground truth and the prediction being scored."""

    id: str
    question: str
    answer: str
    answer_type: str
    prediction: str
    choices: list[str] | None = None
    organ: str | None = None
    modality: str | None = None
    missing: bool = False
    answer_label: str | None = None              # mcq: the right option's letter, as the benchmark defines it
    source_cells: dict[str, str] | None = None   # the benchmark file's answer (and option) cells as written

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v is not False}


@dataclass
class Row:
    """One reported figure: a family's metric on a group of items."""

    task: str
    family: str
    answer_type: str           # open | closed | mcq | all
    metric: str
    estimate: Estimate
    group_by: str = "all"      # all | organ | modality
    group: str = "all"
    excluded: int = 0          # items the reference script leaves out of this metric

    @property
    def key(self) -> tuple:
        return (self.task, self.family, self.answer_type, self.group_by, self.group, self.metric)

    def to_dict(self) -> dict:
        out = {"task": self.task, "family": self.family, "answer_type": self.answer_type,
               "group_by": self.group_by, "group": self.group, "metric": self.metric, **self.estimate.to_dict()}
        if self.excluded:
            out["excluded"] = self.excluded
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Row":
        return cls(data["task"], data["family"], data["answer_type"], data["metric"], Estimate.from_dict(data),
                   data.get("group_by", "all"), data.get("group", "all"), data.get("excluded", 0))


def item_from_sample(sample: Sample, prediction: str | None) -> Item:
    meta = sample.meta
    if meta.answer is None or meta.answer_type is None:
        raise ValueError(f"sample {sample.id!r} has no ground-truth answer or answer_type in its metadata")
    return Item(id=sample.id, question=sample.question, answer=meta.answer, answer_type=meta.answer_type,
                prediction=prediction or "", choices=meta.choices, organ=meta.organ, modality=meta.modality,
                missing=prediction is None, answer_label=meta.extra.get(ANSWER_LABEL),
                source_cells=meta.extra.get(SOURCE_CELLS))


def match_items(samples: Iterable[Sample], predictions: Mapping[str, str], *,
                allow_missing: bool = False) -> tuple[list[Item], list[str]]:
    """Items in ground-truth order, and the prediction ids that match no question (reported, not scored)."""
    samples = list(samples)
    counts = Counter(s.id for s in samples)
    repeated = [question_id for question_id, n in counts.items() if n > 1]
    if repeated:
        raise ValueError(f"ground truth repeats question ids, so predictions cannot be matched: {_some(repeated)}")
    missing = [s.id for s in samples if s.id not in predictions]
    if missing and not allow_missing:
        raise MissingPredictions(f"{len(missing)} of {len(samples)} questions have no prediction "
                                 f"(ids: {_some(missing)}); pass --allow-missing to score them as wrong")
    known = {s.id for s in samples}
    unexpected = [pid for pid in predictions if pid not in known]
    return [item_from_sample(s, predictions.get(s.id)) for s in samples], unexpected


def _some(ids: list[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def score_items(items: list[Item], families: Iterable[str] = DEFAULT_FAMILIES, *,
                compat_flavour: str = "med-moe", candidates: list[str] | None = None,
                judge=None, medmax_truth: str = "verbatim") -> dict[str, dict[str, dict]]:
    """``{family: {item id: {metric: value}}}``; ``judge`` is a :class:`medtune.eval.judge.Judge`;
    ``candidates`` is LLaVA-Med's answer vocabulary for its "open accuracy" (LLaVA-Med flavours);
    ``medmax_truth``: how the ``medmax`` family reads the truth (:data:`medtune.eval.medmax.TRUTH_RULES`)."""
    scores: dict[str, dict[str, dict]] = {}
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown metric family {family!r} (expected some of {', '.join(FAMILIES)})")
        if family == "compat":
            scores[family] = {i.id: compat.score_item(i.prediction, i.answer, i.answer_type, compat_flavour,
                                                      candidates) for i in items}
        elif family == "strict":
            scores[family] = {i.id: strict.score_item(i.prediction, i.answer, i.answer_type, i.choices, i.answer_label)
                              for i in items}
        elif family == "judge":
            if judge is None:
                raise ValueError("the judge family needs a judge endpoint (--judge-endpoint)")
            scores[family] = judge.score(items)
        elif family == "medmax":
            scores[family] = medmax.score_items(items, judge, medmax_truth)
        elif family == "vlmevalkit":
            scores[family] = mcq.score_items(items, judge)
        elif family == "letter":
            scores[family] = mcq.score_letter_only(items)
        elif family == "probmed":
            scores[family] = probmed.score_items(items)
    return scores


def aggregate(task: str, items: list[Item], scores: dict[str, dict[str, dict]], *,
              resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> list[Row]:
    """Every family's metrics per answer type, its overall accuracy across types, and headlines per
    organ/modality."""
    rows: list[Row] = []
    for family, per_item in scores.items():
        make_row = functools.partial(_row, task, family, per_item, resamples, seed)
        by_type: dict[str, list[Item]] = {}
        for item in items:
            if per_item.get(item.id):
                by_type.setdefault(item.answer_type, []).append(item)
        for answer_type, group in by_type.items():
            rows.extend(make_row(answer_type, metric, group) for metric in _metric_names(group, per_item))
        rows.extend(_headline_rows(make_row, family, by_type))
    return rows


def _metric_names(group: list[Item], per_item: dict[str, dict]) -> list[str]:
    names: dict[str, None] = {}
    for item in group:
        names.update(dict.fromkeys(per_item[item.id]))
    return list(names)


def _row(task, family, per_item, resamples, seed, answer_type, metric, group, *, metric_of=None,
         group_by="all", group_name="all") -> Row:
    """``metric`` over ``group`` (or, with ``metric_of``, each item's own metric, e.g. its type's headline)."""
    # A missing key means the metric does not apply to that item; an explicit None means the reference
    # script drops the item from this metric, which is counted as excluded.
    metric_names = [metric_of(i) if metric_of else metric for i in group]
    values = [per_item[i.id][m] for i, m in zip(group, metric_names) if m in per_item[i.id]]
    kept = [v for v in values if v is not None]
    return Row(task, family, answer_type, metric, estimate(kept, resamples=resamples, seed=seed),
               group_by, group_name, excluded=len(values) - len(kept))


def _headline_rows(make_row, family: str, by_type: dict[str, list[Item]]) -> list[Row]:
    """Overall accuracy across answer types, then each type's headline per organ and per modality."""
    headline = HEADLINE[family]
    rows = []
    # One figure across answer types only where it means one thing (an answer is right or wrong); the
    # compat headlines mix closed accuracy with open recall, so that family has none.
    scored = [i for answer_type, group in by_type.items() if answer_type in headline for i in group]
    if len(by_type) > 1 and family != "compat" and scored:
        rows.append(make_row("all", "accuracy", scored, metric_of=lambda item: headline[item.answer_type]))
    for field_name in BREAKDOWNS:
        for answer_type, group in by_type.items():
            if answer_type not in headline:
                continue
            for value in sorted({getattr(i, field_name) for i in group if getattr(i, field_name)}):
                members = [i for i in group if getattr(i, field_name) == value]
                rows.append(make_row(answer_type, headline[answer_type], members,
                                     group_by=field_name, group_name=value))
    return rows


def is_headline(row: Row) -> bool:
    """Whether a row is one of the figures people quote (closed accuracy, open recall, overall accuracy, a
    benchmark's own set figure such as ProbMed's paired accuracy)."""
    return (row.answer_type == "all" or HEADLINE.get(row.family, {}).get(row.answer_type) == row.metric
            or row.metric in SET_HEADLINES.get(row.family, ()))


def is_wrong(family: str, item: Item, item_scores: dict) -> bool:
    """Whether a family counts an item as wrong on its headline metric (partial credit counts as wrong)."""
    metric = HEADLINE[family].get(item.answer_type)
    value = item_scores.get(metric) if metric else None
    return value is not None and value < 1.0


@dataclass
class TableLine:
    """One line of the reference script's table: its label, our value, and the items behind the value."""

    label: str
    value: float
    n: int              # items averaged: the figure's denominator
    excluded: int = 0   # items of the answer type the reference script leaves out of this figure

    def to_dict(self) -> dict:
        return {"label": self.label, "value": self.value, "printed": compat.printed(self.value), "n": self.n,
                "excluded": self.excluded}


@dataclass
class CompatTable:
    """The table the reference script prints: its labels, our values, the strings it would show, and the
    script and commit it reproduces."""

    flavour: str
    lines: list[TableLine] = field(default_factory=list)

    @property
    def reference(self) -> compat.Reference:
        return compat.get_flavour(self.flavour).reference

    @property
    def exact_match_note(self) -> str:
        return compat.exact_match_note(self.flavour)

    def to_dict(self) -> dict:
        return {"flavour": self.flavour, "reference": self.reference.to_dict(),
                "lines": [line.to_dict() for line in self.lines]}

    def render(self) -> str:
        width = max(len(line.label) for line in self.lines)
        lines = [f"{line.label:<{width}}  {compat.printed(line.value):<10} n={line.n}"
                 + (f" ({line.excluded} excluded)" if line.excluded else "") for line in self.lines]
        return "\n".join([f"reproduces {self.reference.describe()}", *lines])


def compat_table(items: list[Item], compat_scores: dict[str, dict], flavour: str = "med-moe") -> CompatTable:
    """The compatibility figures in the reference script's order and labels, summed in item order."""
    table = CompatTable(flavour)
    for answer_type, metric, label in compat.get_flavour(flavour).labels:
        scored = [compat_scores[i.id] for i in items if i.answer_type == answer_type]
        if metric == "open_accuracy" and not any(metric in s for s in scored):
            continue  # only with a candidate list
        values = [s.get(metric) for s in scored]
        kept = [v for v in values if v is not None]
        table.lines.append(TableLine(label, compat.macro_mean_percent(kept), len(kept), len(values) - len(kept)))
    return table
