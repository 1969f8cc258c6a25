"""Rewards for RL post-training that are the evaluation's own metrics, so what is optimised is what is reported.

A reward scores a batch of completions, each an :class:`~medtune.eval.metrics.Item` whose ``prediction`` is the
completion: the metric-family rewards run the family's own scoring (:func:`medtune.eval.metrics.score_items`) on
the batch and give each completion the family's headline figure for its answer type (what ``medtune eval``
reports), so the mean reward over a set of answers *is* the family's accuracy on them:

* ``strict``: the strict family (yes/no read from a closed answer, the letter picked for a multiple-choice one,
  exact match after normalisation for an open one);
* ``strict-closed``: the same on closed questions, 0 on the others (for a stage that rewards only what can be
  checked without a judge);
* ``mcq-letter``: the ``letter`` family (a multiple-choice answer must be the right option's letter alone);
* ``vlmevalkit``: multiple choice matched as VLMEvalKit matches it (options by letter, then by text);
* ``medmax``: MedMax's rules (its open answers go to the judge: without one they score 0);
* ``judge``: an LLM judge for open answers at an OpenAI-compatible endpoint (the stage's ``judge`` setting);
* ``format``: 1.0 when the completion is ``<think>...</think><answer>...</answer>`` (the layout MedVLM-R1 and
  Med-R1 reward), else 0.0.

Where a completion has an ``<answer>`` block, the metric rewards score its content. An item a family leaves out
of its metric (a judge reply that says neither CORRECT nor INCORRECT still scores 0 there; MedMax open answers
without a judge) scores 0: a reward has no "excluded".
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

from medtune.eval.metrics import HEADLINE, Item, score_items

FAMILY_OF = {"strict": "strict", "strict-closed": "strict", "mcq-letter": "letter", "vlmevalkit": "vlmevalkit",
             "medmax": "medmax", "judge": "judge"}

_LAYOUT = re.compile(r"^\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_text(completion: str) -> str:
    """The content of the completion's ``<answer>`` block where it has one, else the whole completion."""
    found = _ANSWER.search(completion)
    return found.group(1).strip() if found else completion


def rewards(name: str, items: list[Item], *, judge=None) -> list[float]:
    """One reward per item (``item.prediction``: the completion), by reward ``name`` (:data:`REWARDS`)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} (known: {', '.join(REWARDS)})")
    return REWARDS[name](items, judge=judge)


def _format_rewards(items: list[Item], *, judge=None) -> list[float]:
    return [1.0 if _LAYOUT.match(item.prediction) else 0.0 for item in items]


def _family_rewards(name: str, items: list[Item], *, judge=None) -> list[float]:
    family = FAMILY_OF[name]
    if family == "judge" and judge is None:
        raise ValueError("the judge reward needs a judge endpoint")
    answers = [dataclasses.replace(item, id=str(index), prediction=answer_text(item.prediction))
               for index, item in enumerate(items)]
    per_item = score_items(answers, [family], judge=judge)[family]
    out = []
    for item in answers:
        metric = HEADLINE[family].get(item.answer_type)
        value = (per_item.get(item.id) or {}).get(metric) if metric else None
        if name == "strict-closed" and item.answer_type != "closed":
            value = None
        out.append(float(value) if value is not None else 0.0)
    return out


REWARDS: dict[str, Callable[..., list[float]]] = {
    **{name: functools.partial(_family_rewards, name) for name in FAMILY_OF}, "format": _format_rewards}
"""Reward name -> ``function(items, *, judge) -> [reward per item]``."""
