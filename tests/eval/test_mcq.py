"""Multiple-choice scoring: VLMEvalKit's routes (exact counts on crafted answers), the letter-only rule, the judge
route, and circular evaluation (a question counts only when every rotation is right)."""
import json

import pytest
from judge_helpers import fake_endpoint

from medtune.data.formats.choices import mcq_sample
from medtune.data.jsonl import write_samples
from medtune.data.schema import ImageRef, Metadata
from medtune.eval import mcq
from medtune.eval.circular import circular_rows, rotations
from medtune.eval.judge import Judge
from medtune.eval.metrics import Item, score_items
from medtune.eval.score import score_predictions
from medtune.eval.tasks import get_task

CHOICES = ["pleural effusion", "pneumothorax", "cardiomegaly", "normal"]
ANSWERS = {  # prediction -> (route, right?) with truth B (pneumothorax)
    "B": ("letter", True), "(B)": ("letter", True), "B.": ("letter", True), "Answer: B": ("letter", True),
    "I would say C here": ("letter", False),
    "A lesion is visible": ("letter", False),          # VLMEvalKit's quirk: the article reads as option A
    "It shows a pneumothorax": ("text", True),
    "cardiomegaly, clearly": ("text", False),
    "pneumothorax or cardiomegaly": ("miss", False),   # two options' texts: no route decides
    "b": ("miss", False),                              # lower case is no option letter
    "Cannot determine the answer": ("refused", False),  # VLMEvalKit's refusal: Z, never an option
    "": ("miss", False),
}


def _items():
    return [Item(id=str(i), question="What is seen?", answer="pneumothorax", answer_type="mcq", prediction=p,
                 choices=CHOICES) for i, p in enumerate(ANSWERS)]


def test_vlmevalkit_routes_are_counted_exactly():
    items = _items()
    scores = mcq.score_items(items)
    for item, (route, right) in zip(items, ANSWERS.values()):
        assert scores[item.id][f"route_{route}"] == 1.0, item.prediction
        assert scores[item.id]["accuracy"] == float(right), item.prediction
    assert mcq.route_counts(items, scores) == {"letter": 6, "refused": 1, "text": 2, "judge": 0, "miss": 3}


def test_letter_only_accepts_bare_letters_only():
    scores = mcq.score_letter_only(_items())
    right = [p for item, p in zip(_items(), ANSWERS) if scores[item.id]["accuracy"] == 1.0]
    assert right == ["B", "(B)", "B.", "Answer: B"]


def test_judge_route_only_with_a_judge_and_its_reply_read_as_a_letter():
    items = _items()
    missed = [i for i in items if ANSWERS[i.prediction][0] == "miss"]
    seen = []
    judge = Judge("http://judge/v1", "m", transport=fake_endpoint(["B", "Z", "The answer is C"], seen))
    scores = mcq.score_items(items, judge)
    assert len(seen) == len(missed) == 3  # only undecided answers go to the judge (a refusal is decided)
    assert "B. pneumothorax" in seen[0]["messages"][0]["content"]
    assert mcq.route_counts(items, scores) == {"letter": 6, "refused": 1, "text": 2, "judge": 3, "miss": 0}
    assert [scores[i.id]["accuracy"] for i in missed] == [1.0, 0.0, 0.0]


def test_families_are_registered_for_scoring():
    scores = score_items(_items(), ("vlmevalkit", "letter"))
    assert sum(s["accuracy"] for s in scores["vlmevalkit"].values()) == 5
    assert sum(s["accuracy"] for s in scores["letter"].values()) == 4


def _mcq_file(tmp_path, n=2):
    samples = [mcq_sample(f"q{i}", "Which finding?", list(CHOICES), "B", [ImageRef("x.png")],
                          Metadata(source="test")) for i in range(n)]
    path = tmp_path / "mcq.jsonl"
    write_samples(path, samples)
    return path


def test_rotations_move_the_right_letter_and_keep_the_truth(tmp_path):
    task = get_task("mcq", data=_mcq_file(tmp_path, 1), circular=True)
    samples = task.samples()
    assert [s.id for s in samples] == ["q0", "q0@circular1", "q0@circular2", "q0@circular3"]
    assert samples[1].meta.choices == CHOICES[1:] + CHOICES[:1] and samples[1].meta.answer == "pneumothorax"
    assert "A. pneumothorax" in task.prompt(samples[1]) and "A: pleural" not in samples[1].question
    assert len(rotations(samples[0])) == 4


def test_circular_counts_a_question_only_when_every_rotation_is_right(tmp_path):
    task = get_task("mcq", data=_mcq_file(tmp_path), circular=True)
    letters = {s.id: "ABCD"[s.meta.choices.index("pneumothorax")] for s in task.samples()}
    answers = dict(letters)
    answers["q1@circular2"] = "A" if letters["q1@circular2"] != "A" else "B"  # one rotation of q1 wrong
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in answers.items()))
    result = score_predictions(task, path, families=("vlmevalkit", "letter"), out_dir=tmp_path / "report")
    circular = {r.family: r for r in result.rows if r.metric == "circular_accuracy"}
    assert circular["vlmevalkit"].estimate.n == 2 and circular["vlmevalkit"].estimate.value == 50.0
    per_rotation = next(r for r in result.rows if r.family == "vlmevalkit" and r.metric == "accuracy"
                        and r.answer_type == "mcq" and r.group_by == "all")
    assert per_rotation.estimate.n == 8 and per_rotation.estimate.value == pytest.approx(87.5)
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert report["mcq_routes"] == {"letter": 8, "refused": 0, "text": 0, "judge": 0, "miss": 0}
    assert "by matching route" in (tmp_path / "report" / "results.md").read_text()


def test_circular_rows_fold_by_base_id():
    items = [Item(id=i, question="", answer="x", answer_type="mcq", prediction="", choices=["x", "y"])
             for i in ("a", "a@circular1", "b", "b@circular1")]
    scores = {"letter": {"a": {"accuracy": 1.0}, "a@circular1": {"accuracy": 1.0},
                         "b": {"accuracy": 1.0}, "b@circular1": {"accuracy": 0.0}}}
    (row,) = circular_rows("t", items, scores)
    assert (row.estimate.n, row.estimate.value) == (2, 50.0)


DUPLICATES = ["pneumothorax", "cardiomegaly", "normal", "normal"]


def _duplicate_items(truth_letter: str) -> list[Item]:
    sample = mcq_sample("q", "Which finding?", list(DUPLICATES), truth_letter, [ImageRef("x.png")],
                        Metadata(source="test"))
    return [Item(id=said, question="Which finding?", answer=sample.meta.answer, answer_type="mcq", prediction=said,
                 choices=DUPLICATES, answer_label=sample.meta.extra["answer_label"]) for said in ("C", "D")]


@pytest.mark.parametrize("truth", ["C", "D"])
def test_two_options_with_one_text_are_scored_by_the_benchmark_letter(truth):
    """The truth is the letter the benchmark gives, not the first option with the truth's text."""
    items = _duplicate_items(truth)
    scores = score_items(items, ("strict", "vlmevalkit", "letter", "medmax"))
    for family, per_item in scores.items():
        assert {i: figures["accuracy"] for i, figures in per_item.items()} == \
            {"C": float(truth == "C"), "D": float(truth == "D")}, family


def test_rotations_keep_the_right_letter_of_a_repeated_option_text():
    sample = mcq_sample("q", "Which finding?", list(DUPLICATES), "D", [ImageRef("x.png")], Metadata(source="t"))
    for rotated in rotations(sample):
        label = rotated.meta.extra["answer_label"]
        shift = int(rotated.id.split("@circular")[1]) if "@circular" in rotated.id else 0
        assert "ABCD".index(label) == (3 - shift) % 4, rotated.id   # option D moves back with each rotation


def test_a_file_that_kept_only_its_answer_cell_is_scored_on_the_items_options():
    """MedMax's release keeps its answer cell as written but no option cells: the options come from the item."""
    item = Item(id="m", question="Which?", answer="pneumothorax", answer_type="mcq", prediction="It is B",
                choices=CHOICES, answer_label="B", source_cells={"answer": "B"})
    assert mcq.score_items([item])["m"]["accuracy"] == 1.0
