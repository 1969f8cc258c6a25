"""MedMax's VQA evaluation rules as a metric family (``--metrics medmax``) and its generation protocol.

MedMax (Bansal et al., 2024; github.com/Hritikbansal/medmax, ``evaluation/vqa.py`` and ``eval_utils.py`` at
commit ``20b7055``) scores its twelve VQA tasks by answer type. The rules are written again here, not copied:

``closed``  one generated token; lowercased, the answer is right when the truth is "yes" and the text holds
            "yes" but not "no" (or the mirror for "no"). Substrings, as in MedMax: "not" and "normal" hold
            "no". A truth other than exactly "yes" or "no" can never be right; such questions are counted in
            the table.
``mcq``     one generated token; right when the text, upper-cased and stripped, *is* the truth as written
            ("(A)" and "A." are wrong, and so is everything when the file's truth is "a" or " B").

The truth is the file's ``answer`` cell exactly as written (``meta.extra["source_cells"]``, kept by the
``medmax-eval`` reader; for other files the answer, or an mcq question's letter), as MedMax compares it: no
stripping, no change of case. ``truth="normalised"`` (``eval score --medmax-truth normalised``) strips and
lower-cases a closed truth and takes an mcq question's letter however the file writes it, for files other than
MedMax's own (VQA-RAD writes "Yes"); it is an option, not the rule, and the report says which was used.
``open``    up to 60 tokens; the lowercased answer is sent to an LLM judge that ends its reply with a
            "Correctness: 1" or "Correctness: 0" line, read by substring (the prompt is medtune's wording).

Where medtune departs from MedMax's script, and why:

* A judge reply with neither line is *unparsed*. MedMax skips the sample, so it leaves the denominator and
  no log shows it. Here it is counted ("unparsed verdicts" in the table and the ``unparsed_verdicts`` row)
  and the primary open ``accuracy`` counts it as wrong, so the denominator is every open question asked and
  a flaky judge cannot raise the score. ``medmax_reported_accuracy`` leaves it out, which is the number
  MedMax's script would print.
* Without a judge, open questions are ``not_judged``: counted, their accuracy ``None`` (excluded, and shown
  as excluded in every row they would enter), never scored 0 in silence.
* The judge is called at temperature 0 with a reply budget (MedMax sends neither, so the API defaults
  apply there).
* Figures are percentages; the table adds MedMax's standard error, ``std(ddof=1) / sqrt(n)``, also × 100.

The "one token" budget is tokenizer-dependent: MedMax generates with Chameleon's tokenizer, where a
yes/no answer or an option letter is (we assume; not checked here) one token. For another tokenizer,
:func:`answer_token_budget` gives the fewest tokens that hold every full answer the rule accepts ("yes",
"no", "Yes", "No" for closed; the question's option letters for mcq), each written bare or after a space,
whichever is shorter. A budget beyond the longest answer would only let a right mcq answer turn wrong
("A" then "."), one below it would cut answers off. For an HTTP endpoint the tokenizer is unknown, so its
``max_tokens`` is MedMax's literal 1, counted in whatever tokenizer the server uses. Open answers keep 60
tokens under any tokenizer: that is a length cap, not a format rule.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field, replace

from medtune.eval import strict

FAMILY = "medmax"
REFERENCE = "Hritikbansal/medmax evaluation/vqa.py at 20b7055"
HEADLINE = {"closed": "accuracy", "mcq": "accuracy", "open": "accuracy"}
ACCURACY, REPORTED, UNPARSED, NOT_JUDGED = "accuracy", "medmax_reported_accuracy", "unparsed_verdicts", "not_judged"
ANSWER_TYPES = ("closed", "mcq", "open")
TRUTH_RULES = ("verbatim", "normalised")

# MedMax decodes greedily; the literal budgets are what its script passes as max_gen_len.
SETTINGS = {
    "open": {"max_new_tokens": 60, "temperature": 0.0, "top_p": 1.0},
    "closed": {"max_new_tokens": 1, "temperature": 0.0, "top_p": 1.0},
    "mcq": {"max_new_tokens": 1, "temperature": 0.0, "top_p": 1.0},
}
CLOSED_ANSWERS = ("yes", "no", "Yes", "No")  # the rule lowercases, so either case is a full answer
DEFAULT_OPTION_COUNT = 4  # MedMax's mcq tasks ask for A-D

JUDGE_PROMPT = """You are checking an answer to a question about a medical image.
Question: {question}
Ground-truth answer: {answer}
Answer to check: {prediction}
The verdict is 1 if the answer to check agrees with the ground truth or answers the question well enough, and 0 otherwise.
End your reply with one line that reads "Correctness: 1" or "Correctness: 0"."""
JUDGE_MAX_TOKENS = 128  # room for a sentence of reasoning before the verdict line


def closed_correct(prediction: str, truth: str) -> float:
    """MedMax's closed rule: the truth ("yes" or "no", exactly) in the answer and the other word not (substrings)."""
    said = prediction.lower()
    other = {"yes": "no", "no": "yes"}.get(truth)
    return float(other is not None and truth in said and other not in said)


def mcq_correct(prediction: str, truth: str) -> float:
    """MedMax's mcq rule: the upper-cased, stripped answer equals the truth."""
    return float(prediction.upper().strip() == truth)


def truth_of(item, rule: str = "verbatim") -> str:
    """What MedMax's script compares an answer with (see the module docstring for the two rules)."""
    if rule not in TRUTH_RULES:
        raise ValueError(f"unknown MedMax truth rule {rule!r} (expected one of {', '.join(TRUTH_RULES)})")
    if rule == "verbatim" and item.source_cells and "answer" in item.source_cells:
        return item.source_cells["answer"]
    if item.answer_type == "mcq":
        return strict.right_letter(item.answer, item.choices, item.answer_label)
    return item.answer if rule == "verbatim" else item.answer.strip().lower()


def parse_correctness(reply: str) -> float | None:
    """A "Correctness: 1" line is 1.0 (checked first, as MedMax does), "Correctness: 0" is 0.0, else None."""
    if "Correctness: 1" in reply:
        return 1.0
    if "Correctness: 0" in reply:
        return 0.0
    return None


def medmax_judge(judge):
    """``judge``'s endpoint with MedMax's judging rules (its records list is shared)."""
    return judge.variant(prompt=JUDGE_PROMPT, parse=parse_correctness, max_tokens=JUDGE_MAX_TOKENS,
                         family=FAMILY, answer_types=("open",))


def score_items(items: list, judge=None, truth: str = "verbatim") -> dict[str, dict]:
    """``{item id: {metric: value}}`` (see the module docstring); ``judge`` is a
    :class:`medtune.eval.judge.Judge`, given MedMax's rules here; without one, open items are not judged;
    ``truth``: one of :data:`TRUTH_RULES`."""
    out: dict[str, dict] = {}
    for item in items:
        if item.answer_type == "closed":
            out[item.id] = {ACCURACY: closed_correct(item.prediction, truth_of(item, truth))}
        elif item.answer_type == "mcq":
            out[item.id] = {ACCURACY: mcq_correct(item.prediction, truth_of(item, truth))}
        elif item.answer_type == "open" and judge is None:
            out[item.id] = {ACCURACY: None, REPORTED: None, NOT_JUDGED: 1.0}
    if judge is not None:
        # MedMax lowercases the answer before the judge sees it
        open_items = [_lowercased(item) for item in items if item.answer_type == "open"]
        for item_id, verdict in medmax_judge(judge).verdicts(open_items).items():
            out[item_id] = {ACCURACY: verdict or 0.0, REPORTED: verdict, UNPARSED: float(verdict is None)}
    return {item.id: out.get(item.id, {}) for item in items}


def _lowercased(item):
    return replace(item, prediction=item.prediction.lower())


def candidate_answers(answer_type: str, choices: list[str] | None = None) -> tuple[str, ...]:
    """Every full answer MedMax's rule accepts for a closed or mcq question."""
    if answer_type == "closed":
        return CLOSED_ANSWERS
    if answer_type == "mcq":
        return tuple(string.ascii_uppercase[:len(choices) if choices else DEFAULT_OPTION_COUNT])
    raise ValueError(f"only closed and mcq answers have a one-token budget, not {answer_type!r}")


def answer_token_budget(tokenizer, answer_type: str, choices: list[str] | None = None) -> int:
    """The "one generated token" of MedMax under ``tokenizer``: the most tokens any accepted answer needs,
    each answer counted bare or after a space, whichever is fewer (chat templates differ on the space)."""
    def tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return max(min(tokens(answer), tokens(" " + answer)) for answer in candidate_answers(answer_type, choices))


def describe_budget(tokenizer) -> dict:
    """How the closed/mcq budget was set, for the report (each prediction records its own settings)."""
    if tokenizer is None:
        return {"rule": "MedMax's literal 1 token: the model's tokenizer is unknown (an HTTP endpoint)",
                "closed": 1, "mcq": 1}
    return {"rule": "tokens of the longest accepted answer under the model's tokenizer",
            "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
            "closed": answer_token_budget(tokenizer, "closed"),
            "mcq": answer_token_budget(tokenizer, "mcq")}  # A-D; a question with more options may need more


@dataclass
class TableLine:
    """One line of the MedMax table: a figure (``value`` and MedMax's ``stderr``, in percent, over ``n``
    questions) or a count (``n`` questions, no value)."""

    label: str
    n: int
    value: float | None = None
    stderr: float | None = None
    is_count: bool = False

    def to_dict(self) -> dict:
        def finite(x):
            return None if x is None or math.isnan(x) else x
        return {"label": self.label, "kind": "count" if self.is_count else "figure", "value": finite(self.value),
                "stderr": finite(self.stderr), "n": self.n}

    def render(self) -> str:
        if self.is_count:
            return f"{self.n}"
        stderr = f" ± {self.stderr:.2f}" if self.stderr is not None else ""
        return f"{self.value:.2f}{stderr}  n={self.n}"


def count_line(label: str, n: int) -> TableLine:
    return TableLine(label, n, is_count=True)


@dataclass
class MedmaxTable:
    """Per answer type: medtune's accuracy, the MedMax-reported one, and the counts behind them."""

    lines: list[TableLine] = field(default_factory=list)
    truth: str = "verbatim"

    def line(self, label: str) -> TableLine | None:
        return next((line for line in self.lines if line.label == label), None)

    def to_dict(self) -> dict:
        return {"reference": REFERENCE, "truth": self.truth, "lines": [line.to_dict() for line in self.lines]}

    def render(self) -> str:
        width = max((len(line.label) for line in self.lines), default=0)
        return "\n".join([f"MedMax rules ({REFERENCE}; truth {self.truth}); ± is MedMax's standard error",
                          *(f"{line.label:<{width}}  {line.render()}" for line in self.lines)])


def table(items: list, scores: dict[str, dict], truth: str = "verbatim") -> MedmaxTable:
    """The MedMax figures and counts, in the order closed, mcq, open, for the answer types present."""
    out = MedmaxTable(truth=truth)
    for answer_type in ANSWER_TYPES:
        group = [item for item in items if item.answer_type == answer_type]
        if not group:
            continue
        per_item = [scores[item.id] for item in group]
        if answer_type == "closed":
            out.lines.append(_accuracy_line("closed accuracy", [s[ACCURACY] for s in per_item]))
            odd = sum(truth_of(item, truth) not in ("yes", "no") for item in group)
            if odd:
                out.lines.append(count_line("closed truths not exactly yes/no (always wrong)", odd))
        elif answer_type == "mcq":
            out.lines.append(_accuracy_line("mcq accuracy", [s[ACCURACY] for s in per_item]))
        else:
            judged = [s for s in per_item if NOT_JUDGED not in s]
            if judged:
                out.lines.append(_accuracy_line("open accuracy (unparsed verdicts count as wrong)",
                                                [s[ACCURACY] for s in judged]))
                out.lines.append(_accuracy_line("open accuracy, MedMax-reported (unparsed verdicts dropped)",
                                                [s[REPORTED] for s in judged if s[REPORTED] is not None]))
                out.lines.append(count_line("unparsed verdicts", sum(s[REPORTED] is None for s in judged)))
            if len(judged) < len(per_item):
                out.lines.append(count_line("open not judged (no judge endpoint)", len(per_item) - len(judged)))
    return out


def _accuracy_line(label: str, values: list[float]) -> TableLine:
    """Mean and MedMax's standard error (sample std, ddof=1, over sqrt(n)), both × 100."""
    n = len(values)
    if n == 0:
        return TableLine(label, 0, float("nan"), None)
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n) if n > 1 else None
    return TableLine(label, n, 100 * mean, None if stderr is None else 100 * stderr)
