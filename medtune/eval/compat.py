"""Compatibility metrics: the numbers the LLaVA-Med and Med-MoE evaluation scripts print, to the last digit.

Reimplemented from the behaviour of ``run_eval.py`` and ``eval_metrics/`` in microsoft/LLaVA-Med and
jiangsongtao/Med-MoE at the commits each :class:`Flavour` names; no code is taken from them. Their quirks are
kept on purpose, because published tables were produced with them:

* Both strings are lowercased. A CLOSED item is a hit when the ground-truth string is a raw substring of the
  prediction, so "no" is a hit inside "normal" and "not" (the ``strict`` family does not do this).
* OPEN items go through the VQA-style word normalisation (:func:`normalize_words`): punctuation removed or
  turned into spaces depending on the spaces around it, periods not followed by a digit removed (only the
  first 32: their ``re.sub`` receives ``re.UNICODE``, whose value 32 lands in the ``count`` slot), number
  words to digits, articles dropped, apostrophe-less contractions mapped to their apostrophe form.
* Recall counts shared words with the *prediction's* multiplicity: ``tp / (tp + fn)`` with
  ``tp = sum(pred_count[w] for shared w)`` and ``fn = sum(gt_count[w] for gt-only w)``; precision is
  ``tp / (tp + fp)``; all three are 0 when either side is empty or nothing is shared.
* "Exact match" is the number of *distinct* ground-truth words found in the prediction divided by the
  prediction's word count (so a long, correct answer scores low).
* BLEU-1/2/3 are NLTK ``sentence_bleu`` with weights (1,0,0,0), (0,1,0,0), (0,0,1,0) on the whitespace
  split of the lowercased *raw* strings (Med-MoE: smoothing method1).
* Every figure is a macro mean over items, times 100, printed by ``tabulate`` with its default ``"g"``
  float format (6 significant digits): :func:`printed` gives that string.

The flavours (``FLAVOURS``) differ in details, each recorded as data on its :class:`Flavour`:

``med-moe`` (default)
    Med-MoE ``run_eval.py``: the description above; answer types ``open``/``OPEN`` and ``close``/``CLOSED``;
    closed F1, precision and recall are reported too.
``llava-med``
    LLaVA-Med v1.0.0 ``llava/eval/run_eval.py`` (the release tag, which is PR #35 "fix closed accuracy
    calculation"): both strings are normalised *before* everything (so open metrics see a twice-normalised
    string, and the closed substring test runs on normalised strings); BLEU without smoothing, plus the
    default 4-gram ``bleu``; a CLOSED item is a hit when the prediction contains "yes" or "no" *and* the
    ground truth, and a miss otherwise, so every closed question is in the denominator. (A named closed
    answer such as "mri" therefore needs a "yes"/"no" somewhere in the prediction to count.) The script
    prints ``num_open`` and ``num_close`` swapped: the first is the closed count.
``llava-med-init``
    the same script at LLaVA-Med's initial release (ad758b6), before PR #35: a closed prediction that contains
    "yes" or "no" but not the truth is left out of the yes/no accuracy (reported as ``None`` here, so the
    item is counted as excluded, never silently), which inflates the figure. Only for reproducing numbers
    made with that version.

Items are matched to ground truth by question id (their scripts pair by position and, in Med-MoE, silently
truncate to the shorter file). Answer types come from the canonical sample: their scripts compare the raw
string (Med-MoE: ``open``/``OPEN``/``close``/``CLOSED``; LLaVA-Med: ``OPEN``/``CLOSED``) and skip anything else,
so a file spelling one ``closed`` or ``CLOSED `` is scored here and skipped there; the bundled and published
test files use the recognised spellings. ``mcq`` items are not scored by this family.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

HEADLINE = {"open": "recall", "closed": "accuracy"}


def substring_hit(pred: str, gt: str) -> float:
    """Med-MoE: the truth anywhere in the prediction."""
    return float(gt in pred)


def _mentions_yes_no(pred: str) -> bool:
    return "yes" in pred or "no" in pred  # substrings, as in their script: "normal", "cannot" mention "no"


def yes_no_hit(pred: str, gt: str) -> float:
    """LLaVA-Med v1.0.0: a hit needs "yes" or "no" and the truth in the prediction; anything else is a miss."""
    return float(_mentions_yes_no(pred) and gt in pred)


def yes_no_hit_dropping_wrong(pred: str, gt: str) -> float | None:
    """LLaVA-Med initial release: like :func:`yes_no_hit`, except that a prediction mentioning "yes" or "no"
    without the truth is dropped (``None``): their script appended nothing for it."""
    if not _mentions_yes_no(pred):
        return 0.0
    return 1.0 if gt in pred else None


@dataclass(frozen=True)
class Reference:
    """The script a flavour reproduces, at the commit whose printout the tests compare against."""

    repository: str   # GitHub owner/name
    script: str       # path inside the repository
    commit: str       # full hash of the commit that was run
    release: str      # tag or branch the commit belongs to, in words
    note: str = ""    # what a reader of that script's printout must know

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v}

    def describe(self) -> str:
        return f"{self.repository} {self.script} @ {self.commit[:7]} ({self.release})"


@dataclass(frozen=True)
class Flavour:
    """How one reference script scores, and the table it prints: ``(answer type, metric, label)`` in order."""

    name: str
    reference: Reference
    closed_hit: Callable[[str, str], float | None]
    normalise_first: bool      # LLaVA-Med normalises both strings before every metric
    smoothed_bleu: bool        # Med-MoE passes NLTK's smoothing method1
    four_gram_bleu: bool       # LLaVA-Med also prints the default-weights "bleu_score"
    closed_word_scores: bool   # Med-MoE also prints closed F1, precision and recall
    open_accuracy: bool        # LLaVA-Med's "open accuracy" against a candidate answer list
    labels: tuple[tuple[str, str, str], ...]


_LLAVA_MED_LABELS = (
    ("open", "exact_match", "exact match score"), ("open", "f1", "f1 score"), ("open", "precision", "precision"),
    ("open", "recall", "recall"), ("open", "bleu", "bleu_score"), ("open", "bleu1", "bleu_score_1"),
    ("open", "bleu2", "bleu_score_2"), ("open", "bleu3", "bleu_score_3"),
    ("open", "open_accuracy", "open accuracy"), ("closed", "accuracy", "yes/no accuracy"))
_LLAVA_MED = dict(normalise_first=True, smoothed_bleu=False, four_gram_bleu=True, closed_word_scores=False,
                  open_accuracy=True, labels=_LLAVA_MED_LABELS)
_LLAVA_MED_SCRIPT = dict(repository="microsoft/LLaVA-Med", script="llava/eval/run_eval.py")

FLAVOURS: dict[str, Flavour] = {flavour.name: flavour for flavour in (
    Flavour("med-moe", Reference("jiangsongtao/Med-MoE", "run_eval.py", "148cbd6dc26b1c583ccf8fa780d3e14529fdc940",
                                 "main as of 2024-10-08",
                                 note="run_eval.py unchanged since 4521f33; its eval_metrics/ equals LLaVA-Med's"),
            substring_hit, normalise_first=False, smoothed_bleu=True, four_gram_bleu=False, closed_word_scores=True,
            open_accuracy=False, labels=(
                ("open", "exact_match", "Exact Match Score"), ("open", "f1", "F1 Score"),
                ("open", "precision", "Precision"), ("open", "recall", "Recall"),
                ("open", "bleu1", "BLEU Score (Weight 1)"), ("open", "bleu2", "BLEU Score (Weight 2)"),
                ("open", "bleu3", "BLEU Score (Weight 3)"), ("closed", "accuracy", "yes/no accuracy"),
                ("closed", "f1", "Closed F1 Score"), ("closed", "precision", "Closed Precision"),
                ("closed", "recall", "Closed Recall"))),
    Flavour("llava-med", Reference(**_LLAVA_MED_SCRIPT, commit="b9a98a736d2ef05bcf5ff345be6403fb3a664eaf",
                                   release="v1.0.0, PR #35",
                                   note="prints num_open and num_close swapped: num_open is the closed count"),
            yes_no_hit, **_LLAVA_MED),
    Flavour("llava-med-init", Reference(**_LLAVA_MED_SCRIPT, commit="ad758b687d4e79628dbfdb149dc545641ed29014",
                                        release="initial release",
                                        note="leaves closed answers with a wrong yes/no out of the yes/no accuracy"),
            yes_no_hit_dropping_wrong, **_LLAVA_MED),
)}


def get_flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise ValueError(f"unknown compatibility flavour {name!r} (expected one of {', '.join(FLAVOURS)})")
    return FLAVOURS[name]


# Characters that the VQA normalisation removes (when they touch a space) or turns into a space.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32  # see module docstring: re.UNICODE passed as count
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# The VQA challenge's contraction table (word without apostrophes -> apostrophe form), as used by the
# LLaVA-Med glossary. Entries with capital letters are left out: words are lowercased before the lookup,
# so those entries can never apply. One entry maps the other way ("somebody'd" -> "somebodyd"), kept.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't
mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


@functools.lru_cache(maxsize=1 << 16)  # pure; candidate lists are normalised once per item otherwise
def normalize_words(text: str) -> str:
    """The LLaVA-Med / VQA word normalisation, quirks included (see the module docstring)."""
    # The space test looks at the original string for every character; a digit-comma-digit anywhere in
    # it makes every punctuation character vanish instead of becoming a space.
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for char in _PUNCTUATION:
        touches_space = f"{char} " in text or f" {char}" in text
        out = out.replace(char, "" if touches_space or remove_all else " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_LIMIT)
    words = [_NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def word_counts(text: str) -> Counter:
    """Their ``split_sentence(text, 1)``: lowercased whitespace words with their counts."""
    return Counter(text.lower().split())


def f1_precision_recall(prediction: str, truth: str) -> tuple[float, float, float]:
    """Their ``calculate_f1score`` on normalised words: shared words counted with the prediction's counts."""
    pred_words = word_counts(normalize_words(prediction))
    truth_words = word_counts(normalize_words(truth))
    if not pred_words or not truth_words:
        return 0.0, 0.0, 0.0
    true_pos = sum(n for word, n in pred_words.items() if word in truth_words)
    false_pos = sum(n for word, n in pred_words.items() if word not in truth_words)
    false_neg = sum(n for word, n in truth_words.items() if word not in pred_words)
    if true_pos == 0:
        return 0.0, 0.0, 0.0
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / (true_pos + false_neg)
    return 2 * precision * recall / (precision + recall), precision, recall


def exact_match(prediction: str, truth: str) -> float:
    """Their ``calculate_exactmatch``: distinct truth words present in the prediction / prediction length."""
    pred_words = word_counts(normalize_words(prediction))
    truth_words = word_counts(normalize_words(truth))
    total = sum(pred_words.values())
    if total == 0:
        return 0.0
    return sum(1 for word in truth_words if word in pred_words) / total


def exact_match_note(flavour: str) -> str:
    """One line for beside the table: its "exact match" and the strict family's "exact" give different numbers
    for the same answers, and a reader should not have to open this file to learn why."""
    label = next(label for _, metric, label in get_flavour(flavour).labels if metric == "exact_match")
    return (f"{label!r} is not strict's 'exact': it gives every open answer partial credit (distinct truth words "
            "found in the answer / the answer's word count, so 'lung' scores 1 against 'left lung'), while strict "
            "counts an answer only when it equals the truth after normalisation")


_BLEU_WEIGHTS = {"bleu1": (1, 0, 0, 0), "bleu2": (0, 1, 0, 0), "bleu3": (0, 0, 1, 0)}


def bleu_scores(prediction: str, truth: str, *, smoothing: bool = True, with_default: bool = False) -> dict:
    """Sentence BLEU-1/2/3 on whitespace-split strings (NLTK; method1 smoothing unless ``smoothing=False``)."""
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing_function = SmoothingFunction().method1 if smoothing else None
    weights = dict(_BLEU_WEIGHTS, bleu=(0.25, 0.25, 0.25, 0.25)) if with_default else _BLEU_WEIGHTS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns on every zero n-gram count; their scripts silence it too
        return {name: float(sentence_bleu([truth.split()], prediction.split(), weights=w,
                                          smoothing_function=smoothing_function))
                for name, w in weights.items()}


def closest_candidate(prediction: str, candidates: list[str]) -> str:
    """LLaVA-Med's "open accuracy" pick: the normalised candidate answer sharing the largest fraction of its
    distinct words with the prediction's distinct words (the first one on a tie)."""
    pred_words = word_counts(normalize_words(prediction))
    best, best_score = "", -1.0
    for candidate in candidates:
        candidate = normalize_words(str(candidate))
        candidate_words = word_counts(candidate)
        shared = sum(1 for word in pred_words if word in candidate_words)
        score = shared / len(candidate_words) if candidate_words else 0.0
        if score > best_score:
            best, best_score = candidate, score
    return best


def score_item(prediction: str, truth: str, answer_type: str, flavour: str = "med-moe",
               candidates: list[str] | None = None) -> dict[str, float | None]:
    """Per-item figures (fractions in [0, 1]); the family's aggregates are their means times 100.

    ``candidates`` (LLaVA-Med flavours only: the answer vocabulary of their ``--candidate`` file) adds
    ``open_accuracy``: 1 when the candidate closest to the prediction equals the normalised truth.
    Returns ``{}`` for answer types this family does not score (``mcq``).
    """
    spec = get_flavour(flavour)
    pred, gt = prediction.lower(), truth.lower()
    if spec.normalise_first:
        pred, gt = normalize_words(pred), normalize_words(gt)
    if answer_type == "open":
        f1, precision, recall = f1_precision_recall(pred, gt)
        scores = {"recall": recall, "precision": precision, "f1": f1, "exact_match": exact_match(pred, gt)}
        scores.update(bleu_scores(pred, gt, smoothing=spec.smoothed_bleu, with_default=spec.four_gram_bleu))
        if candidates and spec.open_accuracy:
            scores["open_accuracy"] = float(closest_candidate(pred, candidates) == normalize_words(gt))
        return scores
    if answer_type == "closed":
        scores = {"accuracy": spec.closed_hit(pred, gt)}
        if spec.closed_word_scores:
            f1, precision, recall = f1_precision_recall(pred, gt)
            scores.update(f1=f1, precision=precision, recall=recall)
        return scores
    return {}


def printed(value: float) -> str:
    """A figure as their scripts print it: ``tabulate``'s default ``"g"`` format of the percentage."""
    return format(value, "g")


def macro_mean_percent(values: list[float]) -> float:
    """``sum(values) / len(values) * 100`` in that order, as their scripts compute it (float order matters)."""
    return sum(values) / len(values) * 100 if values else 0.0
