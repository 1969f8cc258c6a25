"""The reference-rule families against what the reference scorers themselves made of crafted, awkward inputs.

``reference_cases.py`` writes the inputs; ``fixtures/reference/*.json`` are the reference scorers' outputs on
them (VLMEvalKit 18fc37a, ProbMed cb06421, MedMax 20b7055; see the README there for how they were made). Every
per-question verdict and every figure must be equal.
"""
import json
from pathlib import Path

import pytest

from medtune.eval import probmed
from medtune.eval.score import score_predictions
from medtune.eval.tasks import get_task
from reference_cases import (
    PROBMED,
    VLMEVALKIT,
    medmax_predictions,
    medmax_rows,
    probmed_rows,
    vlmevalkit_predictions,
    vlmevalkit_rows,
    write_tsv,
)

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
# Rows medtune's reader refuses (an option after an empty one: its letter would move); VLMEvalKit keeps the gap.
REFUSED = {"text": {"68", "69"}}


def reference(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text(encoding="utf-8"))


def write_predictions(path: Path, answers: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prediction": p}, ensure_ascii=False) + "\n"
                            for i, p in answers.items()), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", list(VLMEVALKIT))
def test_vlmevalkit_family_equals_vlmevalkit_on_every_answer(name, tmp_path):
    data = tmp_path / f"{name}.tsv"
    write_tsv(data, vlmevalkit_rows(name))
    predictions = write_predictions(tmp_path / "predictions.jsonl", vlmevalkit_predictions(name))
    result = score_predictions(get_task("gmai-mmbench", data=data), predictions, families=("vlmevalkit",))
    expected = reference("vlmevalkit")[name]
    refused = REFUSED.get(name, set())
    ours = {item_id: figures["accuracy"] for item_id, figures in result.scores["vlmevalkit"].items()}
    assert set(ours) == set(expected) - refused
    differing = {i: (ours[i], expected[i]["hit"], VLMEVALKIT[name][int(i) - 1]) for i in ours
                 if ours[i] != expected[i]["hit"]}
    assert differing == {}
    tally = result.tallies["ground_truth"]
    assert tally.bad_records == len(refused)
    if refused:
        assert "option D follows the empty option C" in " ".join(tally.examples.values())


def test_crafted_cases_cover_what_the_issue_names():
    """The refusal with an option's text, a lone Z, the API-failure text, 'None' options and answers, duplicate
    option texts: VLMEvalKit's verdict on each is a miss where a plain reading would score it."""
    expected, cases = reference("vlmevalkit")["text"], VLMEVALKIT["text"]
    verdict = {(tuple(options), truth, said): expected[str(i + 1)]["hit"] for i, (options, truth, said) in
               enumerate(cases)}
    findings = ("pleural effusion", "pneumothorax", "cardiomegaly", "normal")
    assert verdict[findings, "B", "Cannot determine the answer, maybe pneumothorax"] == 0
    assert verdict[findings, "B", "Z pneumothorax"] == 0
    assert verdict[findings, "B", "Failed to obtain answer via API. B"] == 0
    assert verdict[("None", "pneumothorax", "normal", "cardiomegaly"), "A", "None"] == 0
    duplicates = ("pneumothorax", "cardiomegaly", "normal", "normal")
    assert (verdict[duplicates, "D", "D"], verdict[duplicates, "D", "C"], verdict[duplicates, "C", "C"]) == (1, 0, 1)


@pytest.fixture
def probmed_scored(tmp_path):
    data = tmp_path / "probmed.json"
    data.write_text(json.dumps([{k: v for k, v in row.items() if k != "response"} for row in probmed_rows()]))
    predictions = write_predictions(tmp_path / "predictions.jsonl",
                                    {f"{image}-{qa_type}": said for image, _, qa_type, _, said in PROBMED})
    return score_predictions(get_task("probmed", data=data), predictions, families=(), out_dir=tmp_path / "report",
                             resamples=100)


def test_probmed_figures_equal_the_script(probmed_scored):
    expected = reference("probmed")
    table = {line["group"]: line for line in probmed_scored.probmed_table.to_dict()["lines"]}
    for category, figures in expected["per_question_type"].items():
        assert table[category]["acc"] == pytest.approx(figures["acc"], abs=1e-9), category
        assert table[category]["num"] == figures["num"], category
        if "acc w. hallu" in figures:
            assert table[category]["acc_w_hallu"] == pytest.approx(figures["acc w. hallu"], abs=1e-9), category
    overall = expected["overall"]
    assert table["all"]["acc"] == pytest.approx(overall["acc"], abs=1e-9)
    assert table["all"]["acc_w_hallu"] == pytest.approx(overall["acc w.o. adv pair"], abs=1e-9)
    assert table["all"]["num"] == overall["num"]
    rows = {(r.metric, r.group): r.estimate for r in probmed_scored.rows if r.family == "probmed"}
    assert rows[probmed.PAIRED, "all"].value == pytest.approx(overall["acc"], abs=1e-9)
    assert rows[probmed.WITHOUT_ADVERSARIAL, "all"].value == pytest.approx(overall["acc w.o. adv pair"], abs=1e-9)
    assert rows[probmed.PAIRED, "entity"].value == pytest.approx(expected["per_question_type"]["entity"]["acc"])
    # The pooled figure weights every unit alike and leaves out image 7's lone organ question (the script
    # counts it: the last image of its type escapes the two-question check), so it differs; both are reported.
    pooled = rows[probmed.PAIRED + probmed.POOLED, "all"]
    assert pooled.n == rows[probmed.PAIRED, "all"].n - 1 and pooled.value != pytest.approx(overall["acc"])
    for estimate in rows.values():
        assert estimate.low <= estimate.value <= estimate.high


def test_probmed_report_names_the_script_and_both_weightings(probmed_scored, tmp_path):
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["probmed_table"]["reference"] == probmed.REFERENCE
    assert results["references"]["probmed"] == probmed.REFERENCE
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "ProbMed's figures (eric-ai-lab/ProbMed eval/calculate_score.py at cb06421)" in markdown
    assert "| paired_accuracy_pooled |" in markdown and "| paired_accuracy |" in markdown


def test_medmax_family_equals_medmax_on_every_answer(tmp_path):
    data = tmp_path / "medmax_eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in medmax_rows()))
    predictions = write_predictions(tmp_path / "predictions.jsonl", medmax_predictions())
    result = score_predictions(get_task("medmax-eval", data=data), predictions, families=("medmax",))
    expected = reference("medmax")
    ours = {item_id: figures["accuracy"] for item_id, figures in result.scores["medmax"].items()}
    assert ours == {item_id: float(hit) for item_id, hit in expected.items() if not item_id.startswith("accuracy")}
    for kind in ("closed", "mcq"):
        assert result.medmax_table.line(f"{kind} accuracy").value == pytest.approx(100 * expected[f"accuracy_{kind}"])
