"""Compatibility metrics: hand-computed cases for every quirk of the LLaVA-Med / Med-MoE scripts."""
import re

import pytest

from medtune.eval import compat
from medtune.eval.metrics import Item, compat_table, score_items


@pytest.mark.parametrize("text, expected", [
    # ", " and " (" / ") " touch spaces: removed; the final period goes; "two" -> "2"; "the" dropped.
    ("The lesion, (left) is two cm.", "lesion left is 2 cm"),
    # A digit-comma-digit anywhere makes every punctuation character vanish instead of becoming a space.
    ("1,000 a-b (c)", "1000 ab c"),
    ("x-ray", "x ray"),                 # no space around "-": becomes a space
    ("left - right", "left right"),     # "- " present: removed
    ("2.5 cm.", "2.5 cm"),              # a period before a digit stays
    ("answer: yes", "answer: yes"),     # ":" is not in their punctuation list
    ("dont know", "don't know"),        # contractions gain their apostrophe
    ("none", "0"),
    ("An MRI", "mri"),
])
def test_normalize_words(text, expected):
    assert compat.normalize_words(text) == expected


def test_normalize_removes_only_the_first_32_periods():
    # Their re.sub receives re.UNICODE (== 32) in the count position.
    text = " ".join(["x."] * 33)
    assert compat.normalize_words(text) == " ".join(["x"] * 32 + ["x."])


def test_recall_counts_shared_words_with_the_prediction_counts():
    # pred left×2 lung, truth left lung base: tp = 2 + 1 = 3, fp = 0, fn = 1 ("base").
    f1, precision, recall = compat.f1_precision_recall("left left lung", "the left lung base")
    assert (precision, recall) == (1.0, 0.75)
    assert f1 == pytest.approx(2 * 0.75 / 1.75)
    # truth "lung lung", pred "lung": tp is the prediction's count (1) and no truth word is unshared.
    assert compat.f1_precision_recall("lung", "lung lung") == (1.0, 1.0, 1.0)
    assert compat.f1_precision_recall("", "lung") == (0.0, 0.0, 0.0)
    assert compat.f1_precision_recall("heart", "lung") == (0.0, 0.0, 0.0)


def test_exact_match_is_distinct_truth_words_over_prediction_length():
    assert compat.exact_match("left left lung", "left lung base") == pytest.approx(2 / 3)
    assert compat.exact_match("lung", "left lung") == 1.0
    assert compat.exact_match("", "lung") == 0.0


def test_bleu_uses_raw_split_strings_with_method1_smoothing():
    scores = compat.bleu_scores("there is a mass", "a mass")
    # 2 of 4 unigrams, 1 of 3 bigrams; no trigram matches: method1 gives epsilon 0.1 over 2 trigrams.
    assert scores["bleu1"] == pytest.approx(0.5)
    assert scores["bleu2"] == pytest.approx(1 / 3)
    assert scores["bleu3"] == pytest.approx(0.05)


def test_closed_hit_is_a_raw_substring_so_normal_counts_as_no():
    assert compat.score_item("Normal", "no", "closed")["accuracy"] == 1.0
    assert compat.score_item("Not sure", "No", "closed")["accuracy"] == 1.0
    assert compat.score_item("yes", "no", "closed")["accuracy"] == 0.0
    assert compat.score_item("(b)", "b", "mcq") == {}


def test_llava_med_v1_counts_every_closed_question():
    assert compat.score_item("no", "no", "closed", "llava-med")["accuracy"] == 1.0
    assert compat.score_item("yes", "no", "closed", "llava-med")["accuracy"] == 0.0  # PR #35: a miss, counted
    assert compat.score_item("maybe", "no", "closed", "llava-med")["accuracy"] == 0.0
    # A named closed answer counts only next to a "yes"/"no" substring ("cannot" holds "no").
    assert compat.score_item("mri", "mri", "closed", "llava-med")["accuracy"] == 0.0
    assert compat.score_item("cannot say: mri", "mri", "closed", "llava-med")["accuracy"] == 1.0
    assert compat.score_item("mri", "mri", "closed", "med-moe")["accuracy"] == 1.0
    # Normalised first: "left." becomes "left", which matches.
    assert compat.score_item("Left.", "left", "open", "llava-med")["recall"] == 1.0


def test_llava_med_init_drops_wrong_yes_no_answers_from_the_denominator():
    assert compat.score_item("no", "no", "closed", "llava-med-init")["accuracy"] == 1.0
    assert compat.score_item("yes", "no", "closed", "llava-med-init")["accuracy"] is None  # dropped by their script
    assert compat.score_item("Normal.", "yes", "closed", "llava-med-init")["accuracy"] is None
    assert compat.score_item("maybe", "no", "closed", "llava-med-init")["accuracy"] == 0.0


def test_llava_med_flavours_differ_only_on_closed_answers_with_a_wrong_yes_no():
    cases = [("yes", "no", "closed"), ("no", "no", "closed"), ("unclear", "yes", "closed"),
             ("The left lung.", "left lung", "open"), ("two, dont", "2", "open")]
    for prediction, truth, answer_type in cases:
        v1 = compat.score_item(prediction, truth, answer_type, "llava-med", ["left lung", "2"])
        init = compat.score_item(prediction, truth, answer_type, "llava-med-init", ["left lung", "2"])
        assert v1 == init or (prediction, v1["accuracy"], init["accuracy"]) == ("yes", 0.0, None)


def test_every_flavour_names_its_reference_commit():
    assert set(compat.FLAVOURS) == {"med-moe", "llava-med", "llava-med-init"}
    for flavour in compat.FLAVOURS.values():
        assert re.fullmatch(r"[0-9a-f]{40}", flavour.reference.commit)
    assert compat.FLAVOURS["llava-med"].reference.release.startswith("v1.0.0")
    with pytest.raises(ValueError, match="llava-med-init"):
        compat.score_item("yes", "yes", "closed", "llava-med-v2")


def test_table_is_macro_mean_times_100_printed_like_tabulate():
    items = [Item("1", "q", "left lung", "open", "left lung"),          # recall 1
             Item("2", "q", "the left lung base", "open", "left left lung"),  # recall 0.75
             Item("3", "q", "heart", "open", "lung"),                    # recall 0
             Item("4", "q", "no", "closed", "normal"),                   # hit
             Item("5", "q", "yes", "closed", "no")]                      # miss
    scores = score_items(items, ["compat"])["compat"]
    lines = {line.label: line for line in compat_table(items, scores).lines}
    assert lines["Recall"].value == pytest.approx(175 / 3)
    assert compat.printed(lines["Recall"].value) == "58.3333"
    assert (lines["Recall"].n, lines["yes/no accuracy"].n) == (3, 2)
    assert lines["yes/no accuracy"].value == 50.0
    assert compat.printed(lines["yes/no accuracy"].value) == "50"


def test_table_counts_what_the_initial_release_leaves_out():
    items = [Item("1", "q", "no", "closed", "no"), Item("2", "q", "no", "closed", "yes"),
             Item("3", "q", "yes", "closed", "unclear")]
    scores = score_items(items, ["compat"], compat_flavour="llava-med-init")["compat"]
    line = compat_table(items, scores, "llava-med-init").lines[-1]
    assert line.label == "yes/no accuracy"
    assert (line.value, line.n, line.excluded) == (50.0, 2, 1)
    scores = score_items(items, ["compat"], compat_flavour="llava-med")["compat"]
    line = compat_table(items, scores, "llava-med").lines[-1]
    assert (line.value, line.n, line.excluded) == (pytest.approx(100 / 3), 3, 0)
