"""The medmax family: MedMax's per-item rules, a crafted predictions file against a hand-computed table (with
unparsed judge verdicts counted in their own line), the CLI report, and the one-token budget per tokenizer."""
import functools
import json
import math

import pytest

from judge_helpers import fake_endpoint
from medtune.cli import main
from medtune.data.jsonl import write_samples
from medtune.data.schema import Metadata, qa_sample
from medtune.eval import medmax
from medtune.eval.judge import Judge
from medtune.eval.metrics import Item
from medtune.eval.score import score_predictions
from medtune.eval.tasks import get_task

ABCD = ["mass", "effusion", "nodule", "cyst"]
# id, answer type, truth, choices, prediction, MedMax's verdict by hand (open: the judge's reply)
CLOSED = [
    ("c1", "yes", "yes", 1),        # the word itself
    ("c2", "yes", "Yes.", 1),       # lowercased, punctuation is no obstacle to a substring
    ("c3", "no", "No", 1),
    ("c4", "yes", "yes, no", 0),    # both words: wrong for either truth
    ("c5", "no", "Normal", 1),      # MedMax's substring quirk: "normal" holds "no"
    ("c6", "yes", "no", 0),
    ("c7", "Yes", "YES", 0),        # MedMax compares the truth as written: "Yes" is neither "yes" nor "no"
    ("c8", "left", "left", 0),      # a truth other than yes/no can never be right under this rule
]
MCQ = [
    ("m1", "B", ABCD, "B", 1),
    ("m2", "A", ABCD, " a ", 1),    # upper-cased and stripped
    ("m3", "C", ABCD, "(C)", 0),    # must *be* the letter
    ("m4", "D", ABCD, "D.", 0),
    ("m5", "effusion", ["mass", "effusion"], "b", 1),  # truth as option text: its letter, B
    ("m6", "A", ABCD, "B", 0),
]
OPEN = [
    ("o1", "liver", "The Liver", "Correctness: 1"),
    ("o2", "left lung", "right lung", "Correctness: 0"),
    ("o3", "cyst", "a cyst", "Both name a cyst.\nCorrectness: 1"),
    ("o4", "mass", "nodule", "I cannot tell."),           # unparsed
    ("o5", "ct", "mri", "correctness: 0"),                # unparsed: the substring test is case-sensitive
    ("o6", "axial", "axial plane", "Correctness: 1"),
]
JUDGE_REPLIES = [reply for *_, reply in OPEN]

# The table by hand (percent; MedMax's standard error is std(ddof=1) / sqrt(n)):
#   closed: c1 c2 c3 c5 right = 4/8 = 50; squares about the mean: 8 x 0.5^2 = 2, stderr = sqrt(2 / 7 / 8) = 18.90;
#           two truths ("Yes", "left") are not exactly yes/no. (With --medmax-truth normalised "Yes" is "yes",
#           so c7 is right too: 5/8 = 62.5, 5 x 0.375^2 + 3 x 0.625^2 = 1.875, stderr = sqrt(1.875 / 7 / 8).)
#   mcq:    m1 m2 m5 right = 3/6 = 50; 6 x 0.5^2 = 1.5, stderr = sqrt(1.5 / 5 / 6) = 22.36.
#   open:   judged 6: o1 o3 o6 right, o2 wrong, o4 o5 unparsed.
#           medtune (unparsed = wrong): 3/6 = 50, stderr 22.36 as for mcq.
#           MedMax-reported (unparsed dropped): 3/4 = 75; 3 x 0.25^2 + 0.75^2 = 0.75, stderr = sqrt(0.75/3/4) = 25.
#           unparsed verdicts: 2.
EXPECTED_TABLE = [
    ("closed accuracy", "figure", 50.0, 100 * math.sqrt(2 / 7 / 8), 8),
    ("closed truths not exactly yes/no (always wrong)", "count", None, None, 2),
    ("mcq accuracy", "figure", 50.0, 100 * math.sqrt(1.5 / 5 / 6), 6),
    ("open accuracy (unparsed verdicts count as wrong)", "figure", 50.0, 100 * math.sqrt(1.5 / 5 / 6), 6),
    ("open accuracy, MedMax-reported (unparsed verdicts dropped)", "figure", 75.0, 25.0, 4),
    ("unparsed verdicts", "count", None, None, 2),
]
EXPECTED_CLOSED_NORMALISED = [("closed accuracy", "figure", 62.5, 100 * math.sqrt(1.875 / 7 / 8), 8),
                              ("closed truths not exactly yes/no (always wrong)", "count", None, None, 1)]
# The family's rows (value, n, excluded): "all" is 4 + 3 + 3 right of 8 + 6 + 6 = 50%.
EXPECTED_ROWS = {
    ("closed", "accuracy"): (50.0, 8, 0),
    ("mcq", "accuracy"): (50.0, 6, 0),
    ("open", "accuracy"): (50.0, 6, 0),
    ("open", "medmax_reported_accuracy"): (75.0, 4, 2),
    ("open", "unparsed_verdicts"): (100 * 2 / 6, 6, 0),
    ("all", "accuracy"): (50.0, 20, 0),
}


@pytest.fixture
def files(tmp_path):
    gt = tmp_path / "gt.jsonl"
    samples = [qa_sample(i, f"question {i}?", truth, meta=Metadata(answer_type="closed")) for i, truth, *_ in CLOSED]
    samples += [qa_sample(i, f"question {i}?", truth, meta=Metadata(answer_type="mcq", choices=choices))
                for i, truth, choices, *_ in MCQ]
    samples += [qa_sample(i, f"question {i}?", truth, meta=Metadata(answer_type="open")) for i, truth, *_ in OPEN]
    write_samples(gt, samples)
    preds = tmp_path / "preds.jsonl"
    answers = [(c[0], c[2]) for c in CLOSED] + [(m[0], m[3]) for m in MCQ] + [(o[0], o[2]) for o in OPEN]
    preds.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in answers))
    return gt, preds


def table_tuples(table: dict) -> list[tuple]:
    return [(line["label"], line["kind"], line["value"], line["stderr"], line["n"]) for line in table["lines"]]


def approx_table(expected):
    return [(label, kind, None if value is None else pytest.approx(value), None if se is None else pytest.approx(se),
             n) for label, kind, value, se, n in expected]


@pytest.mark.parametrize("truth, prediction, verdict", [(t, p, v) for _, t, p, v in CLOSED])
def test_closed_rule(truth, prediction, verdict):
    assert medmax.closed_correct(prediction, truth) == verdict


@pytest.mark.parametrize("truth, choices, prediction, verdict", [(t, c, p, v) for _, t, c, p, v in MCQ])
def test_mcq_rule(truth, choices, prediction, verdict):
    item = Item("q", "?", truth, "mcq", prediction, choices)
    assert medmax.mcq_correct(prediction, medmax.truth_of(item)) == verdict


def test_normalised_truth_is_an_option_and_the_table_says_which_rule(files):
    gt, preds = files
    result = score_predictions(get_task("custom", data=gt), preds, families=("medmax",),
                               medmax_truth="normalised")
    table = result.medmax_table.to_dict()
    assert table["truth"] == "normalised" and table_tuples(table)[:2] == approx_table(EXPECTED_CLOSED_NORMALISED)
    assert "truth normalised" in result.medmax_table.render()


@pytest.mark.parametrize("reply, verdict", [("Correctness: 1", 1.0), ("Reasoning...\nCorrectness: 0", 0.0),
                                            ("Correctness: 1 (not Correctness: 0)", 1.0),  # "1" is checked first
                                            ("correctness: 1", None), ("Correctness:1", None), ("", None)])
def test_verdict_lines_are_read_by_substring(reply, verdict):
    assert medmax.parse_correctness(reply) == verdict


def test_crafted_predictions_give_the_hand_computed_table(files):
    gt, preds = files
    seen = []
    judge = Judge("http://judge.test/v1", "grader", transport=fake_endpoint(JUDGE_REPLIES, seen))
    result = score_predictions(get_task("custom", data=gt), preds, families=("medmax",), judge=judge)

    assert table_tuples(result.medmax_table.to_dict()) == approx_table(EXPECTED_TABLE)
    rows = {(r.answer_type, r.metric): r for r in result.rows if r.family == "medmax" and r.group_by == "all"}
    assert {key: (pytest.approx(r.estimate.value), r.estimate.n, r.excluded) for key, r in rows.items()} == \
        EXPECTED_ROWS
    for row in rows.values():  # every row carries a bootstrap interval around its value
        assert row.estimate.low <= row.estimate.value <= row.estimate.high
    # One judge call per open answer, none for the other families' judge; the answer is lowercased first.
    assert len(seen) == len(OPEN) and seen[0]["max_tokens"] == medmax.JUDGE_MAX_TOKENS
    assert "Answer to check: the liver" in seen[0]["messages"][0]["content"]
    assert "Correctness: 1" in seen[0]["messages"][0]["content"]  # the prompt asks for the line it parses
    assert [(r["id"], r["family"], r["verdict"]) for r in judge.records] == \
        [("o1", "medmax", 1.0), ("o2", "medmax", 0.0), ("o3", "medmax", 1.0), ("o4", "medmax", None),
         ("o5", "medmax", None), ("o6", "medmax", 1.0)]


def test_without_a_judge_open_answers_are_counted_as_not_judged(files):
    gt, preds = files
    result = score_predictions(get_task("custom", data=gt), preds, families=("medmax",))
    table = result.medmax_table
    assert table.line("open not judged (no judge endpoint)").n == len(OPEN)
    assert table.line("unparsed verdicts") is None and table.line("closed accuracy").value == 50.0
    rows = {(r.answer_type, r.metric): r for r in result.rows if r.family == "medmax" and r.group_by == "all"}
    assert (rows["open", "accuracy"].estimate.n, rows["open", "accuracy"].excluded) == (0, len(OPEN))
    assert (rows["open", "not_judged"].estimate.n, rows["open", "not_judged"].estimate.value) == (len(OPEN), 100.0)
    # the overall figure covers closed and mcq and says the open answers are out: 8 right of 14
    overall = rows["all", "accuracy"]
    assert (overall.estimate.n, overall.excluded, overall.estimate.value) == (14, len(OPEN), pytest.approx(700 / 14))


def test_eval_score_cli_writes_the_medmax_table(files, tmp_path, monkeypatch, capsys):
    import medtune.eval.judge as judge_module

    gt, preds = files
    seen = []
    monkeypatch.setattr(judge_module, "Judge",
                        functools.partial(Judge, transport=fake_endpoint(JUDGE_REPLIES, seen)))
    out = tmp_path / "report"
    assert main(["eval", "score", str(preds), "--gt", str(gt), "--metrics", "medmax", "--out", str(out),
                 "--judge-endpoint", "http://judge.test/v1", "--judge-model", "grader"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert table_tuples(results["medmax_table"]) == approx_table(EXPECTED_TABLE)
    assert results["families"] == ["medmax"] and len(seen) == len(OPEN)
    row = next(r for r in results["rows"] if r["family"] == "medmax" and r["metric"] == "medmax_reported_accuracy"
               and r["group_by"] == "all")
    assert (row["value"], row["n"], row["excluded"]) == (75.0, 4, 2)
    markdown = (out / "results.md").read_text()
    assert "## MedMax table" in markdown and "| unparsed verdicts |  |  | 2 |" in markdown
    assert "| open accuracy, MedMax-reported (unparsed verdicts dropped) | 75.00 | 25.00 | 4 |" in markdown
    assert "| custom | medmax | open | all | medmax_reported_accuracy | 4 (2 excluded) | 75.00 |" in markdown
    saved = [json.loads(line) for line in (out / "judge.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in saved] == [1.0, 0.0, 1.0, None, None, 1.0]
    assert "unparsed verdicts" in capsys.readouterr().out


def test_token_budget_is_one_where_every_accepted_answer_is_one_token():
    """The offline tokenizer (vocabulary 2048) writes yes/no and A-D in one token each, as Chameleon's
    tokenizer does for MedMax: the budget is MedMax's 1."""
    from medtune.models.tokenizer import offline_tokenizer

    tokenizer = offline_tokenizer()
    assert medmax.answer_token_budget(tokenizer, "closed") == 1
    assert medmax.answer_token_budget(tokenizer, "mcq", ABCD) == 1


def test_token_budget_fits_the_longest_accepted_answer_and_no_more():
    """A 300-token vocabulary splits "yes" in two: every accepted answer fits the budget, the longest exactly."""
    from medtune.models.tokenizer import offline_tokenizer

    tokenizer = offline_tokenizer(vocab_size=300)

    def fewest(text):
        return min(len(tokenizer.encode(text, add_special_tokens=False)),
                   len(tokenizer.encode(" " + text, add_special_tokens=False)))

    for answer_type, choices in (("closed", None), ("mcq", ABCD), ("mcq", ABCD + ["a", "b"])):
        budget = medmax.answer_token_budget(tokenizer, answer_type, choices)
        needed = [fewest(answer) for answer in medmax.candidate_answers(answer_type, choices)]
        assert all(n <= budget for n in needed) and budget in needed
    assert medmax.answer_token_budget(tokenizer, "closed") == 2 == fewest("yes")
    assert medmax.candidate_answers("mcq", ABCD + ["a", "b"]) == tuple("ABCDEF")


def test_medmax_protocol_settings_per_answer_type(tmp_path):
    from medtune.models.tokenizer import offline_tokenizer

    gt = tmp_path / "gt.jsonl"
    write_samples(gt, [qa_sample("c", "Is it?", "yes", meta=Metadata(answer_type="closed")),
                       qa_sample("m", "Which?", "A", meta=Metadata(answer_type="mcq", choices=ABCD)),
                       qa_sample("o", "What?", "cyst", meta=Metadata(answer_type="open"))])

    def budgets(task):
        return {s.id: task.settings_for(s)["max_new_tokens"] for s in task.samples()}

    assert budgets(get_task("custom", data=gt)) == {"c": 32, "m": 32, "o": 128}  # medtune's defaults
    endpoint = get_task("custom", data=gt, protocol="medmax")  # no tokenizer: MedMax's literal numbers
    assert budgets(endpoint) == {"c": 1, "m": 1, "o": 60}
    assert endpoint.describe()["answer_token_budget"]["closed"] == 1
    local = get_task("custom", data=gt, protocol="medmax", tokenizer=offline_tokenizer(vocab_size=300))
    assert budgets(local) == {"c": 2, "m": 1, "o": 60}
    assert local.describe()["answer_token_budget"]["closed"] == 2
    assert all(local.settings_for(s)["temperature"] == 0.0 for s in local.samples())


def test_eval_run_with_the_medmax_protocol_uses_the_models_tokenizer(tmp_path, capsys):
    """A tiny model whose tokenizer needs two tokens for "yes": closed questions get 2 new tokens, open 60;
    the run's report has the medmax rows with its open answers counted as not judged."""
    pytest.importorskip("torch")
    from medtune.models import presets
    from medtune.models.build import build_vlm
    from medtune.models.tokenizer import offline_tokenizer

    tokenizer = offline_tokenizer(vocab_size=300)
    build_vlm(presets.tiny_spec(tokenizer=tokenizer.name_or_path)).save(tmp_path / "model")
    out = tmp_path / "run"
    assert main(["eval", "run", "--task", "vqa-rad", "--model", str(tmp_path / "model"), "--device", "cpu",
                 "--protocol", "medmax", "--metrics", "medmax,strict", "--limit", "48", "--out", str(out)]) == 0
    assert "open answers are reported as not judged" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # each record holds the settings its answer was generated with
    budgets = {(r["answer_type"], r["settings"]["max_new_tokens"]) for r in records}
    assert budgets == {("closed", 2), ("open", 60)}
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["protocol"] == "medmax" and results["task"]["answer_token_budget"]["closed"] == 2
    not_judged = next(line for line in results["medmax_table"]["lines"] if line["label"].startswith("open not"))
    assert not_judged["n"] == sum(r["answer_type"] == "open" for r in records) > 0
