"""`medtune eval score | compare | merge` end to end through the real CLI, on a hand-checked ground truth."""
import json

import pytest

from medtune.cli import main
from medtune.data.jsonl import write_samples
from medtune.data.schema import Metadata, qa_sample

# id, answer type, truth, organ, prediction
CASES = [
    ("a", "closed", "no", "CHEST", "Normal."),          # compat: hit ("no" in "normal"); strict: unparsed miss
    ("b", "closed", "yes", "HEAD", "Yes, there is."),   # hit in both
    ("c", "open", "left lung", "CHEST", "the left lung"),  # recall 1, exact
    ("d", "open", "pleural effusion", "CHEST", "effusion"),  # recall 1/2, not exact
]


@pytest.fixture
def files(tmp_path):
    gt = tmp_path / "gt.jsonl"
    write_samples(gt, [qa_sample(i, f"question {i}?", truth, meta=Metadata(answer_type=kind, organ=organ))
                       for i, kind, truth, organ, _ in CASES])
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "prediction": p, "prompt": f"question {i}?", "settings": {}}) + "\n"
                             for i, *_, p in CASES))
    return gt, preds


def rows_of(out_dir):
    results = json.loads((out_dir / "results.json").read_text())
    return {(r["family"], r["answer_type"], r["group_by"], r["group"], r["metric"]): r for r in results["rows"]}


def test_score_writes_every_report_file_with_the_right_numbers(files, tmp_path, capsys):
    gt, preds = files
    out = tmp_path / "report"
    assert main(["eval", "score", str(preds), "--gt", str(gt), "--out", str(out)]) == 0
    rows = rows_of(out)
    assert rows[("compat", "closed", "all", "all", "accuracy")]["value"] == 100.0
    assert rows[("compat", "open", "all", "all", "recall")]["value"] == 75.0
    assert rows[("strict", "closed", "all", "all", "accuracy")]["value"] == 50.0
    assert rows[("strict", "open", "all", "all", "exact")]["value"] == 50.0
    assert rows[("strict", "all", "all", "all", "accuracy")]["value"] == 50.0  # b and c right
    assert rows[("strict", "all", "all", "all", "accuracy")]["n"] == 4
    assert rows[("strict", "closed", "organ", "CHEST", "accuracy")]["value"] == 0.0
    chest_recall = rows[("compat", "open", "organ", "CHEST", "recall")]
    assert (chest_recall["n"], chest_recall["value"]) == (2, 75.0)
    assert chest_recall["ci_low"] <= 75.0 <= chest_recall["ci_high"]

    assert "| custom | compat | open | all | recall | 2 | 75.00 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wrong = [json.loads(line) for line in (out / "wrong_answers.jsonl").read_text().splitlines()]
    assert [(w["id"], w["wrong_in"]) for w in wrong] == [("a", ["strict"]), ("d", ["compat", "strict"])]
    assert "yes/no accuracy        100" in capsys.readouterr().out


def test_the_two_exact_match_figures_are_told_apart_next_to_the_table(files, tmp_path, capsys):
    gt, preds = files
    out = tmp_path / "report"
    assert main(["eval", "score", str(preds), "--gt", str(gt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    # "effusion" for "pleural effusion": a whole point in the script's exact match, a miss in strict's exact
    assert any(line.startswith("strict  open   exact      50.00") for line in printed)
    table_line = next(i for i, line in enumerate(printed) if line.startswith("Exact Match Score"))
    assert printed[table_line].split()[3] == "100"
    note = next(line for line in printed if line.startswith("note: "))
    assert printed.index(note) > table_line
    assert "'Exact Match Score' is not strict's 'exact'" in note and "partial credit" in note
    assert note.removeprefix("note: ") in (out / "results.md").read_text()


def test_missing_predictions_fail_naming_the_ids_unless_allowed(files, tmp_path, capsys):
    gt, preds = files
    lines = preds.read_text().splitlines()
    preds.write_text("\n".join(lines[:3]) + "\n")  # "d" unanswered
    assert main(["eval", "score", str(preds), "--gt", str(gt)]) == 2
    assert "1 of 4 questions have no prediction (ids: d)" in capsys.readouterr().err
    out = tmp_path / "partial"
    assert main(["eval", "score", str(preds), "--gt", str(gt), "--allow-missing", "--out", str(out)]) == 0
    assert rows_of(out)[("compat", "open", "all", "all", "recall")]["value"] == 50.0  # "d" scored as wrong
    assert json.loads((out / "results.json").read_text())["counts"]["missing"] == ["d"]


def test_compare_prints_both_runs_with_the_difference(files, tmp_path, capsys):
    gt, preds = files
    main(["eval", "score", str(preds), "--gt", str(gt), "--out", str(tmp_path / "A")])
    preds.write_text(preds.read_text().replace('"effusion"', '"pleural effusion"'))
    main(["eval", "score", str(preds), "--gt", str(gt), "--out", str(tmp_path / "B")])
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "A"), str(tmp_path / "B" / "results.json")]) == 0
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.split()[:5] == ["custom", "strict", "open", "all", "exact"])
    assert "50.00" in line and "100.00" in line and "+50.00" in line
    assert main(["eval", "--compare", str(tmp_path / "A"), str(tmp_path / "B")]) == 0
    assert capsys.readouterr().out == printed


def test_merge_cli_checks_ids_against_the_task(files, tmp_path, capsys):
    gt, preds = files
    lines = preds.read_text().splitlines(keepends=True)
    (tmp_path / "s0.jsonl").write_text("".join(lines[0::2]))
    (tmp_path / "s1.jsonl").write_text("".join(lines[1::2]) + lines[0])
    merged = tmp_path / "merged.jsonl"
    args = ["eval", "merge", str(tmp_path / "s0.jsonl"), str(tmp_path / "s1.jsonl"), "--out", str(merged),
            "--gt", str(gt)]
    assert main(args) == 2
    assert "1 duplicated ids: a" in capsys.readouterr().err
    (tmp_path / "s1.jsonl").write_text("".join(lines[1::2]))
    assert main(args) == 0
    assert merged.read_text() == preds.read_text()


def test_scores_a_llava_med_answer_file_against_a_llava_med_test_json(tmp_path, capsys):
    """Both files as LLaVA-Med / Med-MoE write them; answers out of order and one question unanswered."""
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps([
        {"id": 101, "image": "a.jpg", "answer_type": "CLOSED",
         "conversations": [{"from": "human", "value": "<image>\nIs it normal?"}, {"from": "gpt", "value": "No"}]},
        {"id": 102, "image": "b.jpg", "answer_type": "OPEN",
         "conversations": [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "left lung"}]},
        {"id": 103, "image": "c.jpg", "answer_type": "close",
         "conversations": [{"from": "human", "value": "<image>\nAny mass?"}, {"from": "gpt", "value": "yes"}]},
    ]))
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 102, "prompt": "Where?", "text": "The left lung.", "answer_id": "x"}\n'
                       '{"question_id": 101, "prompt": "Is it normal?", "text": "Abnormal", "answer_id": "y"}\n')
    out = tmp_path / "report"
    assert main(["eval", "score", str(answers), "--gt", str(test_json), "--allow-missing", "--out", str(out)]) == 0
    rows = rows_of(out)
    # 101: "no" in "abnormal" is a compat hit; 103 unanswered: a miss. Strict: both wrong.
    assert rows[("compat", "closed", "all", "all", "accuracy")]["value"] == 50.0
    assert rows[("strict", "closed", "all", "all", "accuracy")]["value"] == 0.0
    assert rows[("compat", "open", "all", "all", "recall")]["value"] == 100.0
    assert rows[("strict", "open", "all", "all", "exact")]["value"] == 100.0


def test_results_chart_labels_every_bar_including_zero_and_undefined(files, tmp_path):
    """A 0.0 bar has no height: its value is written above it, as every bar's is; an empty figure reads n/a."""
    import dataclasses

    from medtune.eval.metrics import is_headline
    from medtune.eval.report import chart, load_rows
    from medtune.eval.stats import Estimate

    gt, preds = files
    preds.write_text(preds.read_text().replace('"Yes, there is."', '"Maybe."'))   # strict closed: 0 of 2
    out = tmp_path / "report"
    assert main(["eval", "score", str(preds), "--gt", str(gt), "--out", str(out)]) == 0
    rows = load_rows(out)
    shown = [r for r in rows if r.group_by == "all" and is_headline(r)]
    labels = [text.get_text() for text in chart(rows).axes[0].texts]
    assert labels == [f"{r.estimate.value:.1f}" for r in shown] and "0.0" in labels
    undefined = dataclasses.replace(shown[0], estimate=Estimate(float("nan"), 0, float("nan"), float("nan")))
    assert [t.get_text() for t in chart([undefined, *shown[1:]]).axes[0].texts][0] == "n/a"
