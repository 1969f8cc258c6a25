"""Shared shape of a multiple-choice benchmark question, used by every MCQ reader (PMC-VQA keeps its own).

One rule for all of them, so a scorer never needs to know which benchmark a question came from:

* ``meta.choices`` is the list of option texts in letter order (A, B, ...); ``meta.answer`` is **the option
  text** of the right letter and ``meta.extra["answer_label"]`` the letter, as the PMC-VQA reader does.
* The user turn is the question followed by one ``"A: text"`` line per option, so a converted file is
  self-contained for training; the bare question is ``meta.extra["question"]``, which is what the evaluation
  prompt starts from (it lists the options once, in its own layout).
* ``answer_type`` is ``mcq``. A question whose answer is withheld (a test split) has ``meta.answer`` None: it
  reads, converts and is counted, and an evaluation task skips it as "no ground-truth answer".
"""
from __future__ import annotations

import string

from medtune.data.schema import ANSWER_LABEL, ImageRef, Metadata, Sample, qa_sample

LETTERS = string.ascii_uppercase


def option_lines(choices: list[str]) -> str:
    return "".join(f"\n{LETTERS[i]}: {choice}" for i, choice in enumerate(choices))


def letter_of(answer: str | None, choices: list[str]) -> str | None:
    """The right option's letter: ``answer`` given as a letter ("B", "(B)", "B.") or as an option's text."""
    if answer is None:
        return None
    text = str(answer).strip()
    bare = text.strip("().: ").upper()
    if len(bare) == 1 and bare in LETTERS[:len(choices)]:
        return bare
    for i, choice in enumerate(choices):
        if choice.strip().lower() == text.lower():
            return LETTERS[i]
    raise ValueError(f"answer {answer!r} is neither an option letter (A-{LETTERS[len(choices) - 1]}) nor an "
                     "option's text")


def mcq_sample(sample_id: str, question: str, choices: list[str], letter: str | None,
               images: list[ImageRef], meta: Metadata) -> Sample:
    """The canonical multiple-choice sample (see the module docstring); ``letter`` None: answer withheld."""
    if len(choices) < 2:
        raise ValueError(f"multiple-choice question needs at least two options, got {len(choices)}")
    if len(choices) > len(LETTERS):
        raise ValueError(f"multiple-choice question has {len(choices)} options, more than letters A-Z")
    question = question.strip()
    meta.answer_type, meta.choices = "mcq", list(choices)
    meta.extra["question"] = question
    answer = None
    if letter is not None:
        answer = choices[LETTERS.index(letter)]
        meta.extra[ANSWER_LABEL] = letter
    return qa_sample(sample_id, question + option_lines(choices), answer, images=images, meta=meta)
