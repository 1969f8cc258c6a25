"""Rewards for RL post-training that are the evaluation's own metrics, so what is optimised is what is reported.

* ``strict``: the strict metric family (:func:`medtune.eval.strict.score_item`): for a closed yes/no question the
  yes/no read from the answer, for a multiple-choice question the letter picked, for other closed answers the
  normalised text, for open questions exact match after normalisation; 1.0 when right, else 0.0.
* ``format``: 1.0 when the completion is ``<think>...</think><answer>...</answer>`` (the layout MedVLM-R1 and
  Med-R1 reward), else 0.0. Where a completion has an ``<answer>`` block, ``strict`` scores its content.

A reward is a function ``(completion, truth, answer_type, choices) -> float``.
"""
from __future__ import annotations

import re
from typing import Callable

from medtune.eval.strict import score_item

_LAYOUT = re.compile(r"^\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_text(completion: str) -> str:
    """The content of the completion's ``<answer>`` block where it has one, else the whole completion."""
    found = _ANSWER.search(completion)
    return found.group(1).strip() if found else completion


def strict_reward(completion: str, truth: str, answer_type: str | None, choices: list[str] | None = None) -> float:
    kind = answer_type if answer_type in ("closed", "open", "mcq") else "open"
    scores = score_item(answer_text(completion), truth, kind, choices)
    return float(scores.get("accuracy", scores.get("exact", 0.0)))


def format_reward(completion: str, truth: str, answer_type: str | None, choices: list[str] | None = None) -> float:
    return 1.0 if _LAYOUT.match(completion) else 0.0


REWARDS: dict[str, Callable[..., float]] = {"strict": strict_reward, "format": format_reward}
