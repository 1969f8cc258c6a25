"""Strict metrics: what a careful reader would count as a correct answer.

The compatibility family (``compat``) reproduces published numbers, bugs included; this family removes the
known ones:

* A closed yes/no item is correct only when the answer contains exactly one of the words "yes" / "no" and it
  is the right one. "normal" is not "no", and "yes and no" is not an answer.
* Other closed items and open items are correct on exact match after a plain normalisation (lowercase,
  punctuation to spaces except decimal points, number words to digits, articles dropped). Open items also
  report token recall and SQuAD-style token F1 on the same words, with multiplicity.
* Multiple choice: the chosen letter is extracted from "The answer is (B).", "B", "b) ...", "Option B: ..."
  or, failing a letter, from the one option whose text the answer contains; an answer naming no option (or
  two) is wrong and counted as unparsed.
"""
from __future__ import annotations

import re
import string
from collections import Counter

HEADLINE = {"open": "exact", "closed": "accuracy", "mcq": "accuracy"}

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Every ASCII punctuation character becomes a space, except a period between digits ("2.5 cm").
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces (decimal points kept), number words to digits, articles dropped."""
    text = _DECIMAL_POINT.sub("\0", text.lower())
    text = _PUNCT.sub(" ", text).replace("\0", ".")
    words = (_NUMBER_WORDS.get(word, word) for word in text.split())
    return " ".join(word for word in words if word not in _ARTICLES)


def yes_no_answer(prediction: str) -> str | None:
    """"yes" or "no" when the answer contains exactly one of the two words, else None."""
    found = {word for word in normalize(prediction).split() if word in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


def token_recall_f1(prediction: str, truth: str) -> tuple[float, float]:
    """Token recall (shared words / truth words) and F1, counting words with multiplicity."""
    pred_words, truth_words = Counter(normalize(prediction).split()), Counter(normalize(truth).split())
    shared = sum((pred_words & truth_words).values())
    if shared == 0:
        return 0.0, 0.0
    recall = shared / sum(truth_words.values())
    precision = shared / sum(pred_words.values())
    return recall, 2 * precision * recall / (precision + recall)


# Tried in order. A lower-case letter after "answer is" counts only when bracketed or closed by ")", "." or
# ":" or the end, so "the answer is a pleural effusion" is read by option text, not as option A.
_LETTER_PATTERNS = [re.compile(p) for p in (
    r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?:(?i:option)\s*)?[(\[]([A-Za-z])[)\]]",  # "The answer is (B)."
    r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?:(?i:option)\s*)?([A-Z])\b",             # "Answer: B"
    r"(?i:answer)\s*(?:(?i:is)|:)?\s*([a-z])(?:[).:]|\s*$)",                     # "answer: b."
    r"(?i:option)\s*[(\[]?([A-Za-z])[)\]]?(?![A-Za-z])",                          # "Option B: ..."
    r"^\s*[(\[]?([A-Za-z])[)\].:](?:\s|$)",                                        # "b) ...", "B. ..."
    r"^\s*([A-Za-z])\s*$",                                                          # "B"
    r"^\s*[(\[]([A-Za-z])[)\]]",                                                    # "(B)glued"
)]


def extract_choice(prediction: str, choices: list[str] | None) -> str | None:
    """The option letter an answer picks (upper case), or None when it names no single option."""
    letters = string.ascii_uppercase[:len(choices)] if choices else "ABCDE"
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(prediction)
        if match and match.group(1).upper() in letters:
            return match.group(1).upper()
    return _choice_by_text(prediction, choices or [])


def _choice_by_text(prediction: str, choices: list[str]) -> str | None:
    """The option whose normalised text the answer contains; the longest wins when one contains another."""
    answer = f" {normalize(prediction)} "
    found = [(len(text), i) for i, text in enumerate(normalize(c) for c in choices) if text and f" {text} " in answer]
    if not found:
        return None
    found.sort(reverse=True)
    longest = [i for length, i in found if length == found[0][0]]
    if len(longest) > 1:
        return None
    # A shorter option found only inside the longest one is not a second pick ("effusion" in "no effusion").
    others = [i for _, i in found[1:] if normalize(choices[i]) not in normalize(choices[longest[0]])]
    return None if others else string.ascii_uppercase[longest[0]]


def truth_letter(truth: str, choices: list[str] | None) -> str | None:
    """The ground truth as a letter: given as a letter ("B", "(B)") or as the option text."""
    text = truth.strip().strip("().").strip()
    if len(text) == 1 and text.isalpha():
        return text.upper()
    for i, choice in enumerate(choices or []):
        if normalize(choice) == normalize(truth):
            return string.ascii_uppercase[i]
    return None


def right_letter(truth: str, choices: list[str] | None, label: str | None = None) -> str:
    """A multiple-choice question's right letter: the benchmark's ``label`` when it gives one (two options may
    share a text), else the truth read as a letter or an option's text; an error when it is neither."""
    expected = label or truth_letter(truth, choices)
    if expected is None:
        raise ValueError(f"multiple-choice ground truth {truth!r} is neither a letter nor one of the options")
    return expected


def score_item(prediction: str, truth: str, answer_type: str, choices: list[str] | None = None,
               label: str | None = None) -> dict:
    """Per-item figures in [0, 1]; ``unparsed`` is 1 when a yes/no or multiple-choice answer picked nothing.
    ``label``: a multiple-choice question's right letter as its benchmark gives it (two options may share a
    text, so the letter, not the text, says which one is right)."""
    if answer_type == "mcq":
        picked = extract_choice(prediction, choices)
        expected = right_letter(truth, choices, label)
        return {"accuracy": float(picked == expected), "unparsed": float(picked is None)}
    if answer_type == "closed":
        expected = normalize(truth)
        if expected in ("yes", "no"):
            said = yes_no_answer(prediction)
            return {"accuracy": float(said == expected), "unparsed": float(said is None)}
        return {"accuracy": float(normalize(prediction) == expected), "unparsed": 0.0}
    if answer_type == "open":
        recall, f1 = token_recall_f1(prediction, truth)
        return {"exact": float(normalize(prediction) == normalize(truth)), "recall": recall, "f1": f1}
    return {}
