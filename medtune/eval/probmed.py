"""ProbMed's scoring as a metric family (``--metrics probmed``; the ``probmed`` task is always scored with it):
yes/no probes counted in adversarial pairs, per question category and overall.

ProbMed (Yan et al., 2024, "Worse than Random? An Embarrassingly Simple Probing Evaluation of Large Multimodal
Models in Medical VQA") asks, about each image, an original question whose answer is "yes" and an adversarial
twin about a hallucinated attribute whose answer is "no", and counts the original only when its twin is answered
right too. The rules below are those of its scorer, eric-ai-lab/ProbMed ``eval/calculate_score.py`` at cb06421
(the code the paper's README points to), written again here, not copied:

Per question (``accuracy``, every question on its own): the answer, stripped, is right for a "yes" truth when it
holds "Yes" (capitalised, anywhere) or is "yes" / "yes." in any case, and the mirror for "no" (so "Yes, no" is
right for both, as in ProbMed). On a ProbMed file the truth is its ``gt_ans`` as written
(``meta.extra["source_cells"]``) and, as in the script, any truth but "yes" is judged by the "no" rule; on
other files the truth is stripped and lower-cased and one other than yes/no is never right.

Paired, by the category in ``qa_type`` (rows grouped ``category``):

``modality``, ``body_part``  the image's two questions of the category form one pair; an image with another
                             number of them is left out (ProbMed: "one of questions unanswered").
``entity``, ``grounding``    pairs ``<category>_gt_<k>`` + the twin with the same last ``_<k>`` part; the image is
                             one unit, right when every one of its pairs is answered right on both sides. A twin
                             without its original is left out. ``entity_hallu`` alone (an image without findings,
                             asked only about a hallucinated one) is a unit of one question.
``abnormality``              one question, no twin: plain accuracy, in the same table.

A unit is what ProbMed counts right or wrong: a pair (modality, organ), an image's pairs together (findings,
positions) or a question (abnormality). Two weightings of the units, both reported:

``paired_accuracy`` (the figure to compare with the paper, and a headline)  the script's: per ``image_type``,
    each category's accuracy over its units, weighted by the type's ``num``, which for modality, organ and
    abnormality is its units but for entity and grounding is *every image of the type*, those without such a
    question included; the categories are then weighted by their summed ``num`` into the overall figure. So
    ``paired_accuracy`` is a weighted mean over units; ``n`` is units and the interval a bootstrap of the
    weighted mean. The ProbMed table (results.md, results.json ``probmed_table``) prints the script's
    ``acc`` / ``acc w. hallu`` / ``num`` per category and overall.
``paired_accuracy_pooled`` (the strict alternative)  every unit counts once, whatever its image type.

``accuracy_without_adversarial`` / ``..._pooled`` are the same units judged on their original questions alone
(ProbMed's "acc w. hallu"; a lone ``entity_hallu`` on its one question; abnormality has no twin, so it is left
out there and overall), the figure the paired one is compared with.

Where medtune departs from the script, and why:

* Units are found by image ``id`` and category wherever their questions are in the file; the script takes an
  image's questions from consecutive rows of one ``image_type``, so a file in another order would split units.
* Questions left out of a unit (an incomplete pair, a ``--limit`` that cut one off, a record without ``id`` or
  ``qa_type``) are counted as the row's ``excluded``, not dropped unseen.
* An image type with no unit of a category adds nothing to that category (the script stops there with a
  division by zero).
* Without the adversarial twin, a modality or organ pair is judged on its original question; the script reads
  whichever of the two comes first in the file (the original, in ProbMed's release).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from medtune.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, Estimate, estimate, weighted_estimate

log = logging.getLogger(__name__)

FAMILY = "probmed"
REFERENCE = "eric-ai-lab/ProbMed eval/calculate_score.py at cb06421"
HEADLINE = {"closed": "accuracy"}
PAIRED, WITHOUT_ADVERSARIAL = "paired_accuracy", "accuracy_without_adversarial"
POOLED = "_pooled"        # suffix of the strict alternative: every unit weighted alike
SET_METRICS = (PAIRED,)   # figures over units of questions, headlines beside the per-question one
PAIRED_CATEGORIES = ("modality", "body_part", "entity", "grounding")   # those with a "without adversarial" figure
EVERY_IMAGE = ("entity", "grounding")   # categories the script weights by every image of the type
CATEGORIES = ("modality", "body_part", "abnormality", "entity", "grounding")   # ProbMed's table order
LONE_ENTITY = "entity_hallu"


def probe_correct(prediction: str, truth: str) -> float:
    """ProbMed's yes/no rule (see the module docstring); a truth other than yes/no is never right."""
    expected = truth.strip().lower()
    return _binary(prediction, expected) if expected in ("yes", "no") else 0.0


def _binary(prediction: str, truth: str) -> float:
    """The script's ``get_score_binary``: the "yes" rule for a truth of exactly "yes", else the "no" rule."""
    said = prediction.strip()
    expected = "yes" if truth == "yes" else "no"
    return float(expected.capitalize() in said or said.lower() in (expected, expected + "."))


def score_items(items: list) -> dict[str, dict]:
    """``{item id: {"accuracy": 0/1}}`` for closed items; other answer types are not ProbMed's."""
    def correct(item) -> float:
        cells = item.source_cells or {}
        return _binary(item.prediction, cells["gt_ans"]) if "gt_ans" in cells else probe_correct(item.prediction,
                                                                                                 item.answer)
    return {item.id: ({"accuracy": correct(item)} if item.answer_type == "closed" else {}) for item in items}


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
    image: str = ""
    script_only: bool = False   # an incomplete modality / organ pair the script still counts (see units)


def units(probes: dict[str, Probe], last_images: frozenset[str] = frozenset()) -> tuple[list[Unit], dict[str, int]]:
    """The scorable units, in first-seen order, and per category the questions that are in none.

    ``last_images``: the last image of each image type in file order. The script drops an image's modality or
    organ questions unless there are two, but checks that only when the next image starts, so the last image
    of a type keeps them however many there are: such a group is a ``script_only`` unit (left out of the
    pooled figures; its questions are still counted in the rows' ``excluded``), judged as the script judges it
    (all right; its first question for the figure without the adversarial twin)."""
    groups: dict[tuple[str, str], list[tuple[str, Probe]]] = defaultdict(list)
    for item_id, probe in probes.items():
        groups[(probe.image, probe.category)].append((item_id, probe))
    out, left_out = [], defaultdict(int)
    for (_, category), members in groups.items():
        image = members[0][1].image
        if category == "abnormality":
            out.extend(Unit(category, [(item_id,)], [item_id], image) for item_id, _ in members)
            continue
        pairs = _pairs(category, members)
        used = {item_id for pair in pairs for item_id in pair}
        left_out[category] += len(members) - len(used)
        if not pairs and category in ("modality", "body_part") and image in last_images:
            out.append(Unit(category, [tuple(i for i, _ in members)], [members[0][0]], image, script_only=True))
        elif pairs:
            originals = [i for i, p in members if i in used and (p.original or p.key == LONE_ENTITY)]
            out.append(Unit(category, pairs, originals, image))
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


@dataclass(frozen=True)
class Scored:
    """A unit with its verdicts and the weight the script gives it (its type's ``num`` over its units)."""

    unit: Unit
    paired: float
    original: float
    weight: float


@dataclass
class ProbmedTable:
    """The script's printout: per category ``acc``, ``acc w. hallu`` and ``num``, then overall."""

    lines: list[dict]

    def to_dict(self) -> dict:
        return {"reference": REFERENCE, "lines": self.lines}

    def render(self) -> str:
        def cell(value) -> str:
            return "" if value is None else f"{value:.2f}"
        rows = [f"{line['group']:<12} {cell(line['acc']):>8} {cell(line.get('acc_w_hallu')):>14} {line['num']:>6}"
                for line in self.lines]
        return "\n".join([f"ProbMed's figures ({REFERENCE}): units weighted as its script weights them",
                          f"{'category':<12} {'acc':>8} {'acc w. hallu':>14} {'num':>6}", *rows])


def paired_figures(samples: list, items: list, per_item: dict[str, dict], *, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED) -> tuple[list[Figure], ProbmedTable | None]:
    """The paired figures (per category, then overall; the script's weighting and the pooled one) from the
    questions' probes and the family's per-item figures, and the script's table; none (and a warning) when no
    question carries ProbMed's fields."""
    scored = {item.id for item in items if "accuracy" in per_item.get(item.id, {})}
    probes = {s.id: probe for s in samples if s.id in scored and (probe := probe_of(s.meta.extra, s.meta.answer))}
    if not probes:
        log.warning("no question carries ProbMed's id and qa_type, so there is no paired accuracy")
        return [], None
    image_type = {s.id: str(s.meta.extra.get("image_type") or "") for s in samples if s.id in probes}
    last_image = {image_type[item_id]: probe.image for item_id, probe in probes.items()}
    found, left_out = units(probes, frozenset(last_image.values()))
    left_out["without id or qa_type"] = len(scored) - len(probes)
    units_scored = _weighted(found, probes, image_type, per_item)

    def figure(metric, group, chosen, excluded, original=False, group_by="category") -> list[Figure]:
        def values(members):
            return [u.original if original else u.paired for u in members]
        pooled = [u for u in chosen if not u.unit.script_only]
        return [Figure(metric, group_by, group, weighted_estimate(values(chosen), [u.weight for u in chosen],
                                                                  resamples=resamples, seed=seed), excluded),
                Figure(metric + POOLED, group_by, group, estimate(values(pooled), resamples=resamples, seed=seed),
                       excluded)]

    out = []
    for category in CATEGORIES:
        members = [u for u in units_scored if u.unit.category == category]
        if not members and not left_out.get(category):
            continue
        out += figure(PAIRED, category, members, left_out.get(category, 0))
        if category in PAIRED_CATEGORIES:
            out += figure(WITHOUT_ADVERSARIAL, category, members, 0, original=True)
    out += figure(PAIRED, "all", units_scored, sum(left_out.values()), group_by="all")
    out += figure(WITHOUT_ADVERSARIAL, "all", [u for u in units_scored if u.unit.category in PAIRED_CATEGORIES], 0,
                  original=True, group_by="all")
    return out, script_table(units_scored)


def _weighted(found: list[Unit], probes: dict[str, Probe], image_type: dict[str, str],
              per_item: dict[str, dict]) -> list[Scored]:
    """Each unit's verdicts and script weight: ``num`` of its (image type, category) over that pair's units,
    where ``num`` is the units, or for entity and grounding every image of the type."""
    def right(item_ids) -> float:
        return float(all(per_item[i]["accuracy"] == 1.0 for i in item_ids))

    type_of_image = {probe.image: image_type[item_id] for item_id, probe in probes.items()}
    images = defaultdict(set)
    for image, kind in type_of_image.items():
        images[kind].add(image)
    counts = defaultdict(int)
    for unit in found:
        counts[(type_of_image[unit.image], unit.category)] += 1
    out = []
    for unit in found:
        key = (type_of_image[unit.image], unit.category)
        num = len(images[key[0]]) if unit.category in EVERY_IMAGE else counts[key]
        out.append(Scored(unit, right(i for pair in unit.pairs for i in pair), right(unit.originals),
                          num / counts[key]))
    return out


def script_table(scored: list[Scored]) -> ProbmedTable:
    """The script's per-category and overall figures: weighted means of the units' verdicts, × 100."""
    lines = []
    for category in CATEGORIES:
        members = [u for u in scored if u.unit.category == category]
        if members:
            lines.append(_line(category, members, category in PAIRED_CATEGORIES))
    overall = _line("all", scored, False)
    paired = [u for u in scored if u.unit.category in PAIRED_CATEGORIES]
    if paired:
        overall["acc_w_hallu"] = _line("", paired, True)["acc_w_hallu"]   # the script's "acc w.o. adv pair"
    return ProbmedTable(lines + [overall])


def _line(group: str, members: list[Scored], with_hallu: bool) -> dict:
    total = sum(u.weight for u in members)
    line = {"group": group, "acc": 100 * sum(u.weight * u.paired for u in members) / total,
            "num": round(total)}
    if with_hallu:
        line["acc_w_hallu"] = 100 * sum(u.weight * u.original for u in members) / total
    return line
