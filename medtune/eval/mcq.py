"""Multiple-choice scoring as VLMEvalKit does it (``vlmevalkit`` family), and a strict letter-only rule (``letter``).

``vlmevalkit`` reproduces the exact-matching evaluation of open-compass/VLMEvalKit at commit 18fc37a
(``vlmeval/utils/matching_util.py`` ``can_infer``, ``vlmeval/dataset/utils/multiple_choice.py``
``extract_answer_from_item`` and the ``evaluate`` of its MCQ datasets), written again here, not copied. It
equals VLMEvalKit's verdict on every crafted answer of ``tests/eval/reference_cases.py``.

What VLMEvalKit sees is not the file's text but pandas' reading of it, and medtune reads it the same way
(:func:`as_vlmevalkit_reads`): the benchmark TSV goes through ``pandas.read_csv`` (a cell ``None``, ``NA``,
``N/A``, ``null``, ``nan`` or empty is missing, so that option does not exist; a column of numbers becomes int,
or float where it has a gap or a decimal, so "1" may read "1.0"; a column of True/False becomes bool), and the
answers go into an .xlsx file and back (``to_excel`` with XlsxWriter, ``read_excel``): an answer ``None``,
``N/A`` or empty reads back as the text ``nan``, one starting with ``=`` as a formula's value. The options are
read from the file's own cells where the reader kept them (``meta.extra["source_cells"]``: a VLMEvalKit TSV),
else from ``meta.choices``.

Each answer then takes the first route that decides, and the route is recorded:

``letter``   the characters ``.()[],:;!*#{}`` become spaces, the answer is split on whitespace, and exactly one
             of the question's option letters appears as a word: "A", "(A)", "A.", "Answer: A", "Answer:A",
             "**B**". (VLMEvalKit's quirk is kept: "A lesion" names option A.) Skipped for an answer that
             holds VLMEvalKit's API-failure text ("Failed to obtain answer via API"), which goes to ``text``.
``refused``  the answer holds one of VLMEvalKit's refusals ("Cannot determine the answer", ...), or no option
             letter but a standalone ``Z``: VLMEvalKit's "none of them", a miss, whatever else it says.
``text``     exactly one option's text, lowercased, is a substring of the lowercased answer.
``judge``    else, only when a judge endpoint is given, an LLM is shown the question, the options and the answer
             and asked for one letter (or Z: none of them); its reply is read by the routes above.
``miss``     else the answer counts as wrong.

The truth is the benchmark's letter (``meta.extra["answer_label"]``, or the file's ``answer`` cell as pandas
reads it), never an option's text: two options may share a text.

Where medtune departs from VLMEvalKit, and why: a judge that names no option after its tries is a miss here;
VLMEvalKit then picks a random option, which adds noise to a published number. VLMEvalKit reads the option
route differently when the environment variable ``VERBOSE`` is set (an "A" among more than three words then
decides nothing); medtune follows the default, unset. The pandas reading covers the questions being scored, so
a column's type is inferred over those rows (VLMEvalKit infers it over the whole file: the same unless a run
is limited or rows were skipped as malformed).

``letter`` (the family) counts an answer right only when, stripped, it is nothing but the right letter in one of
the forms ``A``, ``(A)``, ``A.``, ``A)``, ``Answer: A`` or ``Answer:A`` (capital letters only): the rule for a
model that was asked to answer with the letter and should be held to it.

Per-item figures: ``accuracy`` and one 0/1 indicator per route (``route_letter`` ...), so the report's rows give
each route's share and n, and :func:`route_counts` gives the plain counts.
"""
from __future__ import annotations

import csv
import io
import re
import string
from dataclasses import dataclass, replace

from medtune.eval import strict

FAMILY, LETTER_FAMILY = "vlmevalkit", "letter"
HEADLINE = {"mcq": "accuracy"}
ROUTES = ("letter", "refused", "text", "judge", "miss")
REFERENCE = "open-compass/VLMEvalKit vlmeval/utils/matching_util.py can_infer at 18fc37a"
NONE_OF_THEM = "Z"
API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_LETTER_ONLY = re.compile(r"^(?:Answer:\s*)?(?:\(([A-Z])\)|([A-Z])[.)]?)$")

JUDGE_PROMPT = """You match an answer to a multiple-choice question with one of its options.
Question: {question}
Answer: {prediction}
Reply with the single capital letter of the option the answer means, or Z if it means none of them."""
JUDGE_MAX_TOKENS = 8


@dataclass(frozen=True)
class Seen:
    """A question as VLMEvalKit's evaluation sees it: its options by letter, the answer and the truth."""

    options: dict[str, str]
    prediction: str
    truth: str


def letters_for(choices: list[str] | None) -> str:
    return string.ascii_uppercase[:len(choices) if choices else 4]


def option_route(answer: str, letters) -> str | None:
    """VLMEvalKit's option route: the one option letter standing as a word in ``answer``, ``"Z"`` when the
    answer refuses or names Z and no option, else None (the text route decides)."""
    if API_FAILURE in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return NONE_OF_THEM
    words = answer.translate(_SEPARATORS).split()
    found = [letter for letter in letters if letter in words]
    if len(found) == 1:
        return found[0]
    return NONE_OF_THEM if not found and NONE_OF_THEM in words else None


def text_route(answer: str, options: dict[str, str]) -> str | None:
    """The one option whose lowercased text is inside the lowercased answer, else None."""
    said = answer.lower()
    found = [letter for letter, text in options.items() if text.lower() in said]
    return found[0] if len(found) == 1 else None


def infer(answer: str, options: dict[str, str]) -> tuple[str | None, str]:
    """``(letter or "Z" or None, route)`` for an answer, by VLMEvalKit's ``can_infer`` order."""
    picked = option_route(answer, options)
    if picked == NONE_OF_THEM:
        return picked, "refused"
    if picked is not None:
        return picked, "letter"
    picked = text_route(answer, options)
    return (picked, "text") if picked is not None else (None, "miss")


def letter_only(answer: str, letters: str) -> str | None:
    """The letter when the whole answer is one of the bare letter forms, else None."""
    match = _LETTER_ONLY.match(answer.strip())
    letter = match and (match.group(1) or match.group(2))
    return letter if letter and letter in letters else None


def options_text(question: str, choices: list[str]) -> str:
    return question.strip() + "".join(f"\n{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(choices))


def as_vlmevalkit_reads(items: list) -> dict[str, Seen]:
    """Each mcq item's options, answer and truth as VLMEvalKit's evaluation has them after pandas read the
    benchmark TSV (``read_csv``) and the answers went through its .xlsx file (``to_excel`` / ``read_excel``)."""
    pd = _pandas()
    mcq = [item for item in items if item.answer_type == "mcq"]
    if not mcq:
        return {}
    cells = [_cells(item) for item in mcq]
    letters = [c for c in string.ascii_uppercase if any(c in row for row in cells)]
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerows([[*letters, "answer"], *([row.get(c, "") for c in [*letters, "answer"]] for row in cells)])
    table = pd.read_csv(io.StringIO(text.getvalue()), sep="\t")
    truths = [str(x) for x in table["answer"]]
    table = table.drop(columns="answer")
    table["prediction"] = [str(item.prediction) for item in mcq]
    book = io.BytesIO()
    table.to_excel(book, index=False, engine="xlsxwriter")
    book.seek(0)
    table = pd.read_excel(book, engine="openpyxl")
    out = {}
    for position, item in enumerate(mcq):
        row = table.iloc[position]
        options = {c: str(row[c]) for c in letters if not pd.isna(row[c])}
        out[item.id] = Seen(options, str(row["prediction"]), truths[position])
    return out


def _cells(item) -> dict[str, str]:
    """The item's options and right letter, overlaid by the cells its file wrote where the reader kept them (a
    VLMEvalKit TSV keeps every option cell and the answer; MedMax's release only the answer)."""
    cells = {string.ascii_uppercase[i]: choice for i, choice in enumerate(item.choices or [])}
    cells["answer"] = _truth(item)
    return {**cells, **(item.source_cells or {})}


def _pandas():
    try:
        import openpyxl  # noqa: F401  (read_excel's engine)
        import pandas
        import xlsxwriter  # noqa: F401  (to_excel's engine, as VLMEvalKit writes its .xlsx)
    except ImportError as err:
        raise ImportError(f"the vlmevalkit family reads answers as VLMEvalKit does, with pandas, XlsxWriter and "
                          f"openpyxl ({err.name} is missing): pip install 'medtune[eval]'") from None
    return pandas


def score_items(items: list, judge=None) -> dict[str, dict]:
    """``{item id: {"accuracy", "route_letter", "route_refused", "route_text", "route_judge", "route_miss"}}``
    for mcq items."""
    seen = as_vlmevalkit_reads(items)
    picks = {item_id: infer(view.prediction, view.options) for item_id, view in seen.items()}
    undecided = [item for item in items if item.id in picks and picks[item.id][1] == "miss"]
    if judge is not None and undecided:
        for item_id, picked in _judged(judge, undecided, seen).items():
            if picked is not None:
                picks[item_id] = (picked, "judge")
    return {item.id: _figures(seen[item.id].truth, *picks[item.id]) if item.id in picks else {} for item in items}


def _judged(judge, items: list, seen: dict[str, Seen]) -> dict[str, str | None]:
    """Ask the judge which option each answer means; its reply is read as an answer is."""
    asked = [replace(item, question=options_text(item.question, list(seen[item.id].options.values())),
                     answer_type="mcq") for item in items]
    rules = judge.variant(prompt=JUDGE_PROMPT, parse=lambda reply: reply, max_tokens=JUDGE_MAX_TOKENS,
                          family=FAMILY, answer_types=("mcq",))
    return {item_id: infer(str(reply or ""), seen[item_id].options)[0]
            for item_id, reply in rules.verdicts(asked).items()}


def _figures(truth: str, picked: str | None, route: str) -> dict:
    return {"accuracy": float(picked is not None and picked == truth),
            **{f"route_{name}": float(name == route) for name in ROUTES}}


def _truth(item) -> str:
    return strict.right_letter(item.answer, item.choices, item.answer_label)


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
