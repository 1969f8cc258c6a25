"""ProbMed's paired accuracy: a crafted file where per-question and paired accuracy differ by a known amount, per
category and overall, with n counting ProbMed's units and incomplete pairs counted as excluded."""
import json

import pytest

from medtune.eval import probmed
from medtune.eval.metrics import is_headline
from medtune.eval.score import score_predictions
from medtune.eval.tasks import get_task

# (image id, qa_type, truth, prediction): layout of eric-ai-lab/ProbMed's probmed.json (see medtune.eval.probmed).
PROBES = [
    ("1", "modality_gt", "yes", "Yes"), ("1", "modality_hallu", "no", "No."),          # pair right
    ("1", "body_part_gt", "yes", "yes"), ("1", "body_part_hallu", "no", "Yes"),        # twin wrong
    ("1", "abnormality", "yes", "Yes, there is."),                                      # right
    ("1", "entity_gt_1", "yes", "Yes"), ("1", "entity_hallu_1", "no", "No"),           # pair right ...
    ("1", "entity_gt_2", "yes", "Yes"), ("1", "entity_hallu_2", "no", "yes"),          # ... this one not: unit wrong
    ("1", "grounding_gt_1", "yes", "Yes"), ("1", "grounding_hallu_1", "no", "No"),     # right
    ("2", "modality_gt", "yes", "No"), ("2", "modality_hallu", "no", "No"),            # original wrong
    ("2", "body_part_gt", "yes", "Yes"), ("2", "body_part_hallu", "no", "No"),         # right
    ("2", "abnormality", "no", "Yes"),                                                  # wrong
    ("2", "entity_hallu", "no", "no"),                                                  # a lone question, right
    ("3", "modality_gt", "yes", "Yes"),                                                 # its twin is missing
]


@pytest.fixture
def scored(tmp_path):
    data = tmp_path / "probmed.json"
    data.write_text(json.dumps([{"id": image, "image": f"{image}.png", "image_type": "x-ray_chest",
                                 "question": f"{qa_type}?", "gt_ans": truth, "qa_type": qa_type}
                                for image, qa_type, truth, _ in PROBES]))
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": f"{image}-{qa_type}", "prediction": said}) + "\n"
                                   for image, qa_type, _, said in PROBES))
    task = get_task("probmed", data=data)
    return score_predictions(task, predictions, families=("strict",), out_dir=tmp_path / "report", resamples=200)


def _rows(result, metric):
    return {r.group: r for r in result.rows if r.family == "probmed" and r.metric == metric}


def test_pooled_paired_accuracy_is_below_plain_accuracy_by_the_pairs_the_twins_break(scored):
    plain = _rows(scored, "accuracy")["all"].estimate
    assert (plain.n, plain.value) == (18, pytest.approx(100 * 14 / 18))   # 4 questions wrong
    paired = _rows(scored, probmed.PAIRED + probmed.POOLED)   # every unit weighted alike
    assert paired["all"].estimate.n == 9 and paired["all"].estimate.value == pytest.approx(100 * 5 / 9)
    assert paired["all"].excluded == 1 and paired["all"].group_by == "all"
    by_category = {group: (row.estimate.n, row.estimate.value) for group, row in paired.items() if group != "all"}
    assert by_category == {"modality": (2, 50.0), "body_part": (2, 50.0), "abnormality": (2, 50.0),
                           "entity": (2, 50.0), "grounding": (1, 100.0)}
    assert paired["modality"].excluded == 1   # image 3's original without its twin
    without = _rows(scored, probmed.WITHOUT_ADVERSARIAL + probmed.POOLED)
    assert {g: r.estimate.value for g, r in without.items()} == {
        "modality": 50.0, "body_part": 100.0, "entity": 100.0, "grounding": 100.0, "all": pytest.approx(600 / 7)}
    for row in paired.values():
        assert row.estimate.low <= row.estimate.value <= row.estimate.high


def test_probmed_task_reports_paired_accuracy_as_a_headline(scored, tmp_path):
    assert "probmed" in json.loads((tmp_path / "report" / "results.json").read_text())["families"]
    headline = {(r.family, r.metric) for r in scored.headline()}
    assert ("probmed", probmed.PAIRED) in headline and ("probmed", "accuracy") in headline
    assert not any(is_headline(r) for r in scored.rows if r.metric == probmed.WITHOUT_ADVERSARIAL)
    assert "| probmed | closed | category: entity | paired_accuracy | 2 |" in \
        (tmp_path / "report" / "results.md").read_text()


def test_probmed_yes_no_rule():
    assert probmed.probe_correct("Yes. No.", "yes") == 1.0 == probmed.probe_correct("Yes. No.", "no")  # substrings
    assert probmed.probe_correct("Yes, no doubt", "no") == 0.0   # "No" is matched capitalised
    assert probmed.probe_correct("yes.", "yes") == 1.0 and probmed.probe_correct("yes indeed", "yes") == 0.0
    assert probmed.probe_correct("maybe", "no") == 0.0 and probmed.probe_correct("Yes", "left") == 0.0
