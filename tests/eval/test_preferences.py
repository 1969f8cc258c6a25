"""`medtune data preferences`: a model's wrong answers on a labelled set become preference pairs (chosen = the
reference answer, rejected = the model's), decided by the strict metric family; the rest is counted by reason."""
from __future__ import annotations

import json

from medtune.cli import main
from medtune.data.schema import Sample
from medtune.paths import bundled_data

TEST = bundled_data("vqa_rad", "testset.json")


def _questions(n: int) -> list[dict]:
    return json.loads(TEST.read_text(encoding="utf-8"))[:n]


def test_wrong_answers_become_pairs_and_the_rest_is_counted(tmp_path, capsys):
    questions = _questions(12)
    closed = [q for q in questions if str(q["answer"]).lower() in ("yes", "no")]
    wrong = {str(q["qid"]): "no" if str(q["answer"]).lower() == "yes" else "YES." for q in closed[:3]}
    right = {str(q["qid"]): f" {str(q['answer']).upper()} " for q in closed[3:5]}   # strict folds case and space
    empty = {str(questions[-1]["qid"]): ""} if str(questions[-1]["qid"]) not in {**wrong, **right} else {}
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n"
                                   for i, p in {**wrong, **right, **empty}.items()))
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "preferences", str(TEST), str(predictions), str(out), "--format", "vqa-rad"]) == 0
    pairs = [Sample.from_dict(json.loads(line)) for line in out.read_text().splitlines()]
    assert [p.id for p in pairs] == list(wrong)
    for pair in pairs:
        assert pair.rejected.text == wrong[pair.id] and pair.messages[-1].text.lower() != wrong[pair.id].lower()
    printed = capsys.readouterr().out
    assert (f"3 pairs (wrong answers); 2 answered right, {len(_all()) - 3 - 2 - len(empty):,} no prediction, "
            f"{len(empty)} empty prediction, 0 no reference answer") in printed


def _all() -> list[dict]:
    return json.loads(TEST.read_text(encoding="utf-8"))


def test_no_wrong_answer_writes_nothing_and_says_why(tmp_path, capsys):
    question = _questions(1)[0]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(json.dumps({"id": str(question["qid"]), "prediction": str(question["answer"])}) + "\n")
    assert main(["data", "preferences", str(TEST), str(predictions), str(tmp_path / "out.jsonl"),
                 "--format", "vqa-rad"]) != 0
    assert ("no wrong answer among the 451 questions (1 answered right, 450 no prediction, 0 empty prediction, "
            "0 no reference answer), so there is no pair to write") in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_conversions_keep_a_pair_whole_or_count_it(tmp_path, capsys):
    """A pair survives --materialise (which rebuilds every sample); a format that cannot hold the rejected reply
    counts the pair as skipped instead of writing half of it."""
    import shutil

    pairs = [json.loads(line) for line in bundled_data("vqa_rad", "tiny-preferences.jsonl").read_text().splitlines()[:2]]
    images = tmp_path / "images"
    images.mkdir()
    for pair in pairs:
        name = pair["messages"][0]["content"][0]["image"]["path"]
        shutil.copy(bundled_data("vqa_rad", "images", name), images / name)
    source = tmp_path / "images" / "pairs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "images" / "materialised.jsonl"
    assert main(["data", "convert", "--to", "canonical", str(source), str(out), "--materialise",
                 str(images / "png")]) == 0
    assert [json.loads(line)["rejected"] for line in out.read_text().splitlines()] == [p["rejected"] for p in pairs]
    capsys.readouterr()
    assert main(["data", "convert", "--to", "llava", str(source), str(tmp_path / "llava.json")]) != 0
    assert "2 preference pair" in capsys.readouterr().out
