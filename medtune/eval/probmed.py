"""ProbMed's scoring as a metric family (``--metrics probmed``; the ``probmed`` task is always scored with it):
yes/no probes counted in adversarial pairs, per question category and overall.

ProbMed (Yan et al., 2024, "Worse than Random? An Embarrassingly Simple Probing Evaluation of Large Multimodal
Models in Medical VQA") asks, about each image, an original question whose answer is "yes" and an adversarial
twin about a hallucinated attribute whose answer is "no", and counts the original only when its twin is answered
right too. The rules below are those of its scorer, eric-ai-lab/ProbMed ``eval/calculate_score.py`` at cb06421
(the code the paper's README points to), written again here, not copied:

Per question (``accuracy``, every question on its own): the answer, stripped, is right for a "yes" truth when it
holds "Yes" (capitalised, anywhere) or is "yes" / "yes." in any case, and the mirror for "no" (so "Yes, no" is
right for both, as in ProbMed).

Paired (``paired_accuracy``), by the category in ``qa_type`` (rows grouped ``category``):

``modality``, ``body_part``  the image's two questions of the category form one pair; an image with another
                             number of them is left out (ProbMed: "one of questions unanswered").
``entity``, ``grounding``    pairs ``<category>_gt_<k>`` + the twin with the same last ``_<k>`` part; the image is
                             one unit, right when every one of its pairs is answered right on both sides. A twin
                             without its original is left out. ``entity_hallu`` alone (an image without findings,
                             asked only about a hallucinated one) is a unit of one question.
``abnormality``              one question, no twin: plain accuracy, in the same table.

A unit is what ProbMed counts, so ``n`` is units: a pair (modality, organ), an image's pairs together (findings,
positions) or a question (abnormality). The overall ``paired_accuracy`` pools every unit of every category, as
ProbMed's overall figure weights each category by its count. ``accuracy_without_adversarial`` is the same units
judged on their original questions alone (ProbMed's "acc w. hallu"; a lone ``entity_hallu`` on its one question;
abnormality has no twin, so it is left out there and overall), the figure the paired one is compared with. Intervals: the usual bootstrap, over units.

Where medtune departs from the script, and why:

* Units are found by image ``id`` and category wherever their questions are in the file; the script takes an
  image's questions from consecutive rows of one ``image_type``, so a file in another order would split units.
* Questions left out of a unit (an incomplete pair, a ``--limit`` that cut one off, a record without ``id`` or
  ``qa_type``) are counted as the row's ``excluded``, not dropped unseen.
* The overall figure pools units. The script weights each ``image_type``'s entity and grounding accuracy by the
  number of that type's images, counting those with no such question, which shifts its overall figure a little
  towards types with many images; pooling counts each unit once.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from medtune.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, Estimate, estimate

log = logging.getLogger(__name__)

FAMILY = "probmed"
REFERENCE = "eric-ai-lab/ProbMed eval/calculate_score.py at cb06421"
HEADLINE = {"closed": "accuracy"}
PAIRED, WITHOUT_ADVERSARIAL = "paired_accuracy", "accuracy_without_adversarial"
SET_METRICS = (PAIRED,)   # figures over units of questions, headlines beside the per-question one
CATEGORIES = ("modality", "body_part", "abnormality", "entity", "grounding")   # ProbMed's table order
LONE_ENTITY = "entity_hallu"


def probe_correct(prediction: str, truth: str) -> float:
    """ProbMed's yes/no rule (see the module docstring); a truth other than yes/no is never right."""
    said, expected = prediction.strip(), truth.strip().lower()
    if expected not in ("yes", "no"):
        return 0.0
    return float(expected.capitalize() in said or said.lower() in (expected, expected + "."))


def score_items(items: list) -> dict[str, dict]:
    """``{item id: {"accuracy": 0/1}}`` for closed items; other answer types are not ProbMed's."""
    return {item.id: ({"accuracy": probe_correct(item.prediction, item.answer)} if item.answer_type == "closed"
                      else {}) for item in items}


@dataclass(frozen=True)
class Probe:
    """Where a question sits in ProbMed's design: its image, category, pair key and side."""

    image: str
    category: str
    key: str          # matches an original with its twin inside an image and category
    original: bool    # the "yes" question (not the hallucinated twin)


def probe_of(extra: dict, truth: str | None) -> Probe | None:
    """A question's probe from the reader's ``meta.extra`` (``id`` of the image, ``qa_type``) and its answer; None
    without them. A modality or organ question is the original unless ``qa_type`` says ``hallu`` or its truth is
    "no" (ProbMed's originals are the "yes" questions)."""
    image, qa_type = extra.get("id"), extra.get("qa_type")
    if image in (None, "") or not isinstance(qa_type, str) or not qa_type:
        return None
    parts = qa_type.split("_")
    if qa_type == "abnormality":
        return Probe(str(image), "abnormality", qa_type, True)
    for category in ("modality", "body_part"):
        if category in qa_type:
            return Probe(str(image), category, category,
                         "hallu" not in parts and str(truth).strip().lower() != "no")
    category = "entity" if "entity" in qa_type else "grounding"
    if qa_type == LONE_ENTITY:
        return Probe(str(image), category, LONE_ENTITY, False)
    return Probe(str(image), category, parts[-1], "gt" in parts)


@dataclass
class Unit:
    """What ProbMed counts right or wrong: ``pairs`` of item ids (a lone question is a pair of one)."""

    category: str
    pairs: list[tuple[str, ...]]
    originals: list[str]


def units(probes: dict[str, Probe]) -> tuple[list[Unit], dict[str, int]]:
    """The scorable units, in first-seen order, and per category the questions that are in none."""
    groups: dict[tuple[str, str], list[tuple[str, Probe]]] = defaultdict(list)
    for item_id, probe in probes.items():
        groups[(probe.image, probe.category)].append((item_id, probe))
    out, left_out = [], defaultdict(int)
    for (_, category), members in groups.items():
        if category == "abnormality":
            out.extend(Unit(category, [(item_id,)], [item_id]) for item_id, _ in members)
            continue
        pairs = _pairs(category, members)
        used = {item_id for pair in pairs for item_id in pair}
        left_out[category] += len(members) - len(used)
        if pairs:
            originals = [i for i, p in members if i in used and (p.original or p.key == LONE_ENTITY)]
            out.append(Unit(category, pairs, originals))
    return out, dict(left_out)


def _pairs(category: str, members: list[tuple[str, Probe]]) -> list[tuple[str, ...]]:
    if category in ("modality", "body_part"):
        return [tuple(item_id for item_id, _ in members)] if len(members) == 2 else []
    by_key: dict[str, dict[bool, str]] = defaultdict(dict)
    pairs = []
    for item_id, probe in members:
        if probe.key == LONE_ENTITY:
            pairs.append((item_id,))
        else:
            by_key[probe.key].setdefault(probe.original, item_id)
    pairs += [(sides[True], sides[False]) for sides in by_key.values() if len(sides) == 2]
    return pairs


@dataclass(frozen=True)
class Figure:
    """One paired figure: a report row of the ``probmed`` family for closed questions."""

    metric: str
    group_by: str     # category | all
    group: str
    estimate: Estimate
    excluded: int = 0


def paired_figures(samples: list, items: list, per_item: dict[str, dict], *, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED) -> list[Figure]:
    """The paired figures (per category, then overall) from the questions' probes and the family's per-item
    figures; none (and a warning) when no question carries ProbMed's fields."""
    scored = {item.id for item in items if "accuracy" in per_item.get(item.id, {})}
    probes = {s.id: probe for s in samples if s.id in scored and (probe := probe_of(s.meta.extra, s.meta.answer))}
    if not probes:
        log.warning("no question carries ProbMed's id and qa_type, so there is no paired accuracy")
        return []
    found, left_out = units(probes)
    left_out["without id or qa_type"] = len(scored) - len(probes)

    def right(item_ids) -> float:
        return float(all(per_item[i]["accuracy"] == 1.0 for i in item_ids))

    def figure(metric, group, values, excluded, group_by="category") -> Figure:
        return Figure(metric, group_by, group, estimate(values, resamples=resamples, seed=seed), excluded)

    def both_sides(unit: Unit) -> float:
        return right(i for pair in unit.pairs for i in pair)

    out = []
    for category in CATEGORIES:
        members = [u for u in found if u.category == category]
        if not members and not left_out.get(category):
            continue
        out.append(figure(PAIRED, category, [both_sides(u) for u in members], left_out.get(category, 0)))
        if category != "abnormality":
            out.append(figure(WITHOUT_ADVERSARIAL, category, [right(u.originals) for u in members], 0))
    out.append(figure(PAIRED, "all", [both_sides(u) for u in found], sum(left_out.values()), group_by="all"))
    out.append(figure(WITHOUT_ADVERSARIAL, "all", [right(u.originals) for u in found if u.category != "abnormality"],
                      0, group_by="all"))
    return out
