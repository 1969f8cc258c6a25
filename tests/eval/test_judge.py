"""LLM judge against a fake OpenAI-compatible endpoint (httpx.MockTransport): verdicts, retries, records."""
import json

import pytest

from judge_helpers import fake_endpoint
from medtune.eval import judge as judge_module
from medtune.eval.judge import Judge, JudgeError, parse_verdict
from medtune.eval.metrics import Item, aggregate, score_items


@pytest.mark.parametrize("reply, verdict", [
    ("CORRECT", 1.0), ("Incorrect.", 0.0), ("The answer is correct", 1.0),
    ("correct or incorrect?", None), ("I am not sure", None), ("", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


ITEMS = [Item("1", "Which organ?", "liver", "open", "the liver"),
         Item("2", "Which side?", "left", "open", "right"),
         Item("3", "What lesion?", "cyst", "open", "a round thing"),
         Item("4", "Is it normal?", "yes", "closed", "yes")]


def test_unparsed_verdicts_stay_in_the_denominator_and_everything_is_recorded(monkeypatch):
    monkeypatch.setattr(judge_module.time, "sleep", lambda s: None)
    seen = []
    judge = Judge("http://judge.test/v1", "grader", transport=fake_endpoint(["CORRECT", 503, "INCORRECT", "hmm"], seen))
    scores = score_items(ITEMS, ["judge"], judge=judge)
    assert scores["judge"] == {"1": {"accuracy": 1.0, "unparsed": 0.0}, "2": {"accuracy": 0.0, "unparsed": 0.0},
                               "3": {"accuracy": 0.0, "unparsed": 1.0}, "4": {}}
    rows = {r.metric: r for r in aggregate("t", ITEMS, scores) if r.answer_type == "open"}
    assert rows["accuracy"].estimate.n == 3 and rows["accuracy"].estimate.value == pytest.approx(100 / 3)
    assert rows["unparsed"].estimate.value == pytest.approx(100 / 3)
    # Four calls for three items: the 503 was retried. Prompts carry question, reference and candidate.
    assert len(seen) == 4 and seen[0]["model"] == "grader" and seen[0]["temperature"] == 0.0
    assert "Reference answer: liver" in seen[0]["messages"][0]["content"]
    assert [r["verdict"] for r in judge.records] == [1.0, 0.0, None]
    assert judge.records[2]["reply"] == "hmm"


def test_a_client_error_stops_at_once_with_the_servers_message():
    judge = Judge("http://judge.test/v1", "grader", transport=fake_endpoint([401], []))
    with pytest.raises(JudgeError, match="HTTP 401: overloaded"):
        judge.score(ITEMS[:1])


def test_retries_run_out(monkeypatch):
    monkeypatch.setattr(judge_module.time, "sleep", lambda s: None)
    judge = Judge("http://judge.test/v1", "grader", retries=2, transport=fake_endpoint([500, 500, 500], []))
    with pytest.raises(JudgeError, match="failed after 3 attempts"):
        judge.score(ITEMS[:1])


def test_scoring_with_a_judge_saves_prompts_and_verdicts(tmp_path, monkeypatch):
    from medtune.data.jsonl import write_samples
    from medtune.data.schema import Metadata, qa_sample
    from medtune.eval.score import score_predictions
    from medtune.eval.tasks import get_task

    gt = tmp_path / "gt.jsonl"
    write_samples(gt, [qa_sample(i.id, i.question, i.answer, meta=Metadata(answer_type=i.answer_type)) for i in ITEMS])
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"question_id": i.id, "text": i.prediction}) + "\n" for i in ITEMS))
    judge = Judge("http://judge.test/v1", "grader", transport=fake_endpoint(["CORRECT", "INCORRECT", "??"], []))
    result = score_predictions(get_task("custom", data=gt), preds, out_dir=tmp_path / "out", judge=judge)
    saved = [json.loads(line) for line in (tmp_path / "out" / "judge.jsonl").read_text().splitlines()]
    assert [(r["id"], r["verdict"]) for r in saved] == [("1", 1.0), ("2", 0.0), ("3", None)]
    assert "Candidate answer: a round thing" in saved[2]["prompt"]
    row = next(r for r in result.rows if r.family == "judge" and r.metric == "accuracy" and r.group_by == "all")
    assert (row.estimate.n, row.estimate.value) == (3, pytest.approx(100 / 3))
