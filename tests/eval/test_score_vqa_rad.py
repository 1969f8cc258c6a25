"""Scoring a LLaVA-Med / Med-MoE answer file against the bundled VQA-RAD test ground truth.

The expected strings are what the reference scripts print on this exact answer file: their evaluation
functions (Med-MoE ``run_eval.py`` at ca17bdb, LLaVA-Med v1.0.0 ``llava/eval/run_eval.py`` at b9a98a7, and at ad758b6
for ``llava-med-init``, with ``eval_metrics/``) were run outside this repository with nltk 3.10.4, with ground truth and answers in
question-id order, and their tables formatted as ``tabulate`` does (``"g"``).
"""
import json
import random

import pytest

from medtune.eval.score import score_predictions
from medtune.eval.tasks import get_task
from medtune.paths import bundled_data

MED_MOE_PRINTED = {
    "Exact Match Score": "13.8731", "F1 Score": "15.7605", "Precision": "14.0088", "Recall": "21.629",
    "BLEU Score (Weight 1)": "10.7444", "BLEU Score (Weight 2)": "6.31991", "BLEU Score (Weight 3)": "4.89406",
    "yes/no accuracy": "43.3824", "Closed F1 Score": "21.344", "Closed Precision": "18.6384",
    "Closed Recall": "30.5147",
}
LLAVA_MED_PRINTED = {
    "exact match score": "13.8731", "f1 score": "15.7605", "precision": "14.0088", "recall": "21.629",
    "bleu_score": "3.66048", "bleu_score_1": "13.7902", "bleu_score_2": "8.36581", "bleu_score_3": "5.1257",
    "yes/no accuracy": "38.6029",
}
# Answers that exercise the normalisation: punctuation next to spaces or not, numbers, contractions,
# "normal"/"not" containing "no", digit-comma-digit, more than 32 periods, an empty answer.
EXTRAS = ["There is no evidence of it.", "Normal.", "yes, there is.", "No", "The left lung; two lesions.",
          "It's a CT scan (axial).", "dont know - maybe the liver?", "1,000 cells", "a.b.c " * 12, "",
          "x-ray, PA view", "There are three nodules / masses", "None", "not sure", "YES!", "the answer: yes"]


def write_answer_file(path, shuffle=False):
    """A LLaVA-Med answer file for every VQA-RAD test question (seeded, so the file is always the same)."""
    records = json.loads(bundled_data("vqa_rad", "testset.json").read_text())
    rng = random.Random(1)
    lines = []
    for record in records:
        answer = str(record["answer"])
        text = rng.choice([answer, answer.upper() + ".", "The answer is " + answer,
                           answer + " and " + rng.choice(EXTRAS)] + EXTRAS)
        lines.append(json.dumps({"question_id": record["qid"], "prompt": record["question"], "text": text,
                                 "answer_id": "x", "model_id": "m", "metadata": {}}))
    if shuffle:  # matching is by id: order must not matter
        random.Random(7).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("flavour, expected", [("med-moe", MED_MOE_PRINTED), ("llava-med", LLAVA_MED_PRINTED)])
def test_compat_table_matches_the_reference_scripts(tmp_path, flavour, expected):
    answers = write_answer_file(tmp_path / "answers.jsonl", shuffle=True)
    result = score_predictions(get_task("vqa-rad"), answers, compat_flavour=flavour)
    printed = {line["label"]: line["printed"] for line in result.compat_table.to_dict()["lines"]}
    assert printed == expected


def test_llava_med_init_flavour_reports_the_items_it_excludes(tmp_path):
    answers = write_answer_file(tmp_path / "answers.jsonl")
    result = score_predictions(get_task("vqa-rad"), answers, compat_flavour="llava-med-init")
    row = next(r for r in result.rows if r.family == "compat" and r.answer_type == "closed"
               and r.metric == "accuracy" and r.group_by == "all")
    # 51.2195 = hits / counted; counted + excluded is every closed question of the split.
    assert row.estimate.n + row.excluded == 272
    assert row.excluded > 0
    assert f"{row.estimate.value:g}" == "51.2195"


def test_llava_med_open_accuracy_with_a_candidate_file_matches_the_reference(tmp_path):
    answers = write_answer_file(tmp_path / "answers.jsonl")
    records = [json.loads(bundled_data("vqa_rad", name).read_text()) for name in ("trainset.json", "testset.json")]
    candidates = sorted({str(r["answer"]) for split in records for r in split})  # 557 answers
    result = score_predictions(get_task("vqa-rad"), answers, compat_flavour="llava-med", candidates=candidates)
    printed = {line["label"]: line["printed"] for line in result.compat_table.to_dict()["lines"]}
    assert printed["open accuracy"] == "11.7318"
    assert printed["recall"] == LLAVA_MED_PRINTED["recall"]
