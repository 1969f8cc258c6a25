"""Circular evaluation for multiple-choice tasks (MMBench's CircularEval): every question is asked once per
rotation of its options, and counts as right only when every rotation is answered right.

A question with k options becomes k questions: rotation 0 is the original (same id), rotation r moves each
option r places back (the first r options go to the end), so the right answer's letter moves too; its id is
``<id>@circular<r>``. The ground truth moves with its option: the right letter is recomputed from the
original one (not looked up by text, since two options may share a text), so every family scores each rotation
as it would any question. :func:`circular_rows` then folds the per-rotation figures of each family into one
``circular_accuracy`` row over the original questions (n = questions, not rotations). A question of which only
some rotations were scored (a ``--limit`` that cut it) is judged on those rotations.
"""
from __future__ import annotations

import copy
import string

from medtune.data.schema import ANSWER_LABEL, SOURCE_CELLS, Message, Part, Sample
from medtune.eval import strict
from medtune.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, estimate

SEPARATOR = "@circular"
METRIC = "circular_accuracy"


def rotations(sample: Sample) -> list[Sample]:
    """``sample`` and its option rotations (non-mcq samples are returned alone)."""
    choices = sample.meta.choices or []
    if sample.meta.answer_type != "mcq" or len(choices) < 2:
        return [sample]
    out = [sample]
    right = _right_index(sample)
    for shift in range(1, len(choices)):
        rotated = copy.deepcopy(sample)
        rotated.id = f"{sample.id}{SEPARATOR}{shift}"
        rotated.meta.choices = choices[shift:] + choices[:shift]
        if right is not None:
            rotated.meta.extra[ANSWER_LABEL] = string.ascii_uppercase[(right - shift) % len(choices)]
        rotated.meta.extra.pop(SOURCE_CELLS, None)  # the file's cells describe the unrotated question
        rotated.messages = [_without_option_lines(m, choices) for m in rotated.messages]
        out.append(rotated)
    return out


def _right_index(sample: Sample) -> int | None:
    """The right option's position: from the benchmark's letter where there is one, else the truth's text."""
    label = sample.meta.extra.get(ANSWER_LABEL)
    if label:
        return string.ascii_uppercase.index(label)
    expected = strict.truth_letter(sample.meta.answer or "", sample.meta.choices)
    return None if expected is None else string.ascii_uppercase.index(expected)


def _without_option_lines(message: Message, choices: list[str]) -> Message:
    """The user turn's option lines (in the original order) would contradict the rotation: use the bare question."""
    if message.role != "user":
        return message
    parts = []
    for part in message.content:
        if part.type == "text":
            lines = [line for line in part.text.split("\n")
                     if not any(line == f"{chr(65 + i)}: {c}" for i, c in enumerate(choices))]
            part = Part.of_text("\n".join(lines))
        parts.append(part)
    return Message(message.role, tuple(parts))


def base_id(item_id: str) -> str:
    return item_id.split(SEPARATOR, 1)[0]


def circular_rows(task: str, items: list, scores: dict[str, dict], *, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = DEFAULT_SEED) -> list:
    """One ``circular_accuracy`` row per family that scored mcq items with an ``accuracy``."""
    from medtune.eval.metrics import Row

    rows = []
    for family, per_item in scores.items():
        groups: dict[str, list[float]] = {}
        for item in items:
            value = per_item.get(item.id, {}).get("accuracy")
            if item.answer_type == "mcq" and value is not None:
                groups.setdefault(base_id(item.id), []).append(value)
        if groups:
            hits = [float(all(v == 1.0 for v in values)) for values in groups.values()]
            rows.append(Row(task, family, "mcq", METRIC, estimate(hits, resamples=resamples, seed=seed)))
    return rows
