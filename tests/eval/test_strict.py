"""Strict metrics: yes/no needs exactly one of the two words, exact match, token F1, option extraction."""
import pytest

from medtune.eval import compat, strict


@pytest.mark.parametrize("text, expected", [
    ("The Left Lung.", "left lung"),
    ("2.5 cm", "2.5 cm"),
    ("two lesions", "2 lesions"),
    ("x-ray, PA", "x ray pa"),
])
def test_normalize(text, expected):
    assert strict.normalize(text) == expected


def test_normal_is_a_closed_hit_in_compat_mode_and_a_miss_in_strict_mode():
    assert compat.score_item("Normal", "no", "closed")["accuracy"] == 1.0
    assert strict.score_item("Normal", "no", "closed") == {"accuracy": 0.0, "unparsed": 1.0}


@pytest.mark.parametrize("prediction, truth, accuracy, unparsed", [
    ("No, there is no effusion.", "no", 1.0, 0.0),   # one of the two words, said twice
    ("Yes.", "yes", 1.0, 0.0),
    ("yes", "No", 0.0, 0.0),
    ("yes and no", "no", 0.0, 1.0),                   # both words: no answer
    ("nothing abnormal", "no", 0.0, 1.0),             # "no" only inside other words
])
def test_yes_no(prediction, truth, accuracy, unparsed):
    assert strict.score_item(prediction, truth, "closed") == {"accuracy": accuracy, "unparsed": unparsed}


def test_other_closed_items_need_an_exact_normalised_match():
    assert strict.score_item("Left.", "left", "closed")["accuracy"] == 1.0
    assert strict.score_item("left side", "left", "closed")["accuracy"] == 0.0


def test_open_exact_recall_and_f1():
    assert strict.score_item("The liver", "liver", "open") == {"exact": 1.0, "recall": 1.0, "f1": 1.0}
    scores = strict.score_item("left lower lobe", "left lobe", "open")
    assert scores["exact"] == 0.0 and scores["recall"] == 1.0
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))
    # Multiplicity on both sides: one shared "lung" (compat would count the prediction's two).
    assert strict.token_recall_f1("lung lung", "lung base") == (0.5, 0.5)


CHOICES = ["pneumonia", "effusion", "mass", "pleural effusion"]


@pytest.mark.parametrize("prediction, letter", [
    ("The answer is (B).", "B"),
    ("B", "B"),
    ("b) effusion", "B"),
    ("(c)", "C"),
    ("Option C: mass", "C"),
    ("Answer: d.", "D"),
    ("The answer is a pleural effusion", "D"),   # "a" is an article here; the option text decides
    ("I think it is effusion", "B"),
    ("pleural effusion", "D"),                   # "effusion" inside the longer option is not a second pick
    ("pleural effusion, not pneumonia", None),   # two options named
    ("no idea", None),
    ("F", None),                                 # not one of four options
])
def test_extract_choice(prediction, letter):
    assert strict.extract_choice(prediction, CHOICES) == letter


def test_mcq_truth_given_as_text_or_letter():
    assert strict.score_item("(D)", "pleural effusion", "mcq", CHOICES) == {"accuracy": 1.0, "unparsed": 0.0}
    assert strict.score_item("The answer is B.", "B", "mcq", CHOICES) == {"accuracy": 1.0, "unparsed": 0.0}
    assert strict.score_item("maybe", "B", "mcq", CHOICES) == {"accuracy": 0.0, "unparsed": 1.0}
    with pytest.raises(ValueError, match="neither a letter nor one of the options"):
        strict.score_item("A", "cardiomegaly", "mcq", CHOICES)
