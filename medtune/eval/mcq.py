"""Multiple-choice scoring as VLMEvalKit does it (``vlmevalkit`` family), and a strict letter-only rule (``letter``).

``vlmevalkit`` reimplements, from its behaviour, the answer matching of open-compass/VLMEvalKit
(``vlmeval/utils/matching_util.py`` ``can_infer`` and ``vlmeval/dataset/utils/multiple_choice.py``
``extract_answer_from_item`` at commit 18fc37a), which GMAI-VL's and MMBench-style numbers come from. Each
answer takes the first route that names exactly one option, and the route is recorded:

``letter``  the characters ``.()[],:;!*#{}`` become spaces, the answer is split on whitespace, and exactly one of
            the option letters appears as a whole word: "A", "(A)", "A.", "Answer: A", "I pick B here".
            (VLMEvalKit's quirk is kept: "A lesion" names option A.)
``text``    else exactly one option's text, lowercased, is a substring of the lowercased answer.
``judge``   else, only when a judge endpoint is given, an LLM is shown the question, the options and the answer
            and asked for one letter (or Z: none of them); its reply goes through the ``letter`` route.
``miss``    else the answer counts as wrong.

Where medtune departs from VLMEvalKit, and why: a judge that names no option after its tries is a miss here;
VLMEvalKit then picks a random option, which adds noise to a published number. A refusal ("Cannot determine
the answer") is a miss in both (VLMEvalKit maps it to Z, which no question has as its answer).

``letter`` (the family) counts an answer right only when, stripped, it is nothing but the right letter in one of
the forms ``A``, ``(A)``, ``A.``, ``A)``, ``Answer: A`` (capital letters only): the rule for a model that was
asked to answer with the letter and should be held to it.

Per-item figures: ``accuracy`` and one 0/1 indicator per route (``route_letter`` ...), so the report's rows give
each route's share and n, and :func:`route_counts` gives the plain counts.
"""
from __future__ import annotations

import re
import string
from dataclasses import replace

from medtune.eval import strict

FAMILY, LETTER_FAMILY = "vlmevalkit", "letter"
HEADLINE = {"mcq": "accuracy"}
ROUTES = ("letter", "text", "judge", "miss")
REFERENCE = "open-compass/VLMEvalKit vlmeval/utils/matching_util.py can_infer at 18fc37a"
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_LETTER_ONLY = re.compile(r"^(?:Answer:\s*)?(?:\(([A-Z])\)|([A-Z])[.)]?)$")

JUDGE_PROMPT = """You match an answer to a multiple-choice question with one of its options.
Question: {question}
Answer: {prediction}
Reply with the single capital letter of the option the answer means, or Z if it means none of them."""
JUDGE_MAX_TOKENS = 8


def letters_for(choices: list[str] | None) -> str:
    return string.ascii_uppercase[:len(choices) if choices else 4]


def letter_route(answer: str, letters: str) -> str | None:
    """The one option letter standing as a word in ``answer`` (VLMEvalKit's option route), else None."""
    if any(refusal in answer for refusal in _REFUSALS):
        return None
    words = answer.translate(_SEPARATORS).split()
    found = [letter for letter in letters if letter in words]
    return found[0] if len(found) == 1 else None


def text_route(answer: str, choices: list[str]) -> str | None:
    """The one option whose lowercased text is inside the lowercased answer, else None."""
    said = answer.lower()
    found = [string.ascii_uppercase[i] for i, choice in enumerate(choices) if str(choice).lower() in said]
    return found[0] if len(found) == 1 else None


def letter_only(answer: str, letters: str) -> str | None:
    """The letter when the whole answer is one of the bare letter forms, else None."""
    match = _LETTER_ONLY.match(answer.strip())
    letter = match and (match.group(1) or match.group(2))
    return letter if letter and letter in letters else None


def options_text(question: str, choices: list[str]) -> str:
    return question.strip() + "".join(f"\n{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(choices))


def score_items(items: list, judge=None) -> dict[str, dict]:
    """``{item id: {"accuracy", "route_letter", "route_text", "route_judge", "route_miss"}}`` for mcq items."""
    picks: dict[str, tuple[str | None, str]] = {}
    undecided = []
    for item in items:
        if item.answer_type != "mcq":
            continue
        letters = letters_for(item.choices)
        picked = letter_route(item.prediction, letters)
        if picked is not None:
            picks[item.id] = (picked, "letter")
            continue
        picked = text_route(item.prediction, item.choices or [])
        if picked is not None:
            picks[item.id] = (picked, "text")
        else:
            undecided.append(item)
            picks[item.id] = (None, "miss")
    if judge is not None and undecided:
        for item_id, picked in _judged(judge, undecided).items():
            if picked is not None:
                picks[item_id] = (picked, "judge")
    return {item.id: _figures(item, *picks[item.id]) if item.id in picks else {} for item in items}


def _judged(judge, items: list) -> dict[str, str | None]:
    """Ask the judge which option each answer means; its reply is read by the letter route."""
    by_id = {item.id: item for item in items}
    asked = [replace(item, question=options_text(item.question, item.choices or []), answer_type="mcq")
             for item in items]
    rules = judge.variant(prompt=JUDGE_PROMPT, parse=lambda reply: reply, max_tokens=JUDGE_MAX_TOKENS,
                          family=FAMILY, answer_types=("mcq",))
    return {item_id: letter_route(str(reply or ""), letters_for(by_id[item_id].choices))
            for item_id, reply in rules.verdicts(asked).items()}


def _figures(item, picked: str | None, route: str) -> dict:
    expected = _truth(item)
    return {"accuracy": float(picked is not None and picked == expected),
            **{f"route_{name}": float(name == route) for name in ROUTES}}


def _truth(item) -> str:
    expected = strict.truth_letter(item.answer, item.choices)
    if expected is None:
        raise ValueError(f"multiple-choice ground truth {item.answer!r} is neither a letter nor one of the options")
    return expected


def score_letter_only(items: list) -> dict[str, dict]:
    """``{item id: {"accuracy"}}``: right only for a bare letter answer naming the right option."""
    return {item.id: {"accuracy": float(letter_only(item.prediction, letters_for(item.choices)) == _truth(item))}
            if item.answer_type == "mcq" else {} for item in items}


def route_counts(items: list, scores: dict[str, dict]) -> dict[str, int]:
    """How many mcq answers each route decided (every mcq item is in exactly one)."""
    counts = dict.fromkeys(ROUTES, 0)
    for item in items:
        figures = scores.get(item.id, {})
        for name in ROUTES:
            counts[name] += int(figures.get(f"route_{name}", 0.0) == 1.0)
    return counts
