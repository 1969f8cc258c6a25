"""Predictions files: flushed per record, resumed by id, sharded disjointly, merged only when complete."""
import json

import pytest

from medtune.data.jsonl import RecordError, Tally
from medtune.data.shards import shard_rows
from medtune.eval.predictions import (
    MergeError, PredictionWriter, merge_predictions, prediction_record, read_predictions,
)


def record(qid, text="yes"):
    return prediction_record(qid, text, prompt=f"question {qid}?", settings={"max_new_tokens": 8}, task="t")


def test_each_record_is_on_disk_as_soon_as_it_is_written(tmp_path):
    path = tmp_path / "preds.jsonl"
    with PredictionWriter(path) as writer:
        writer.write(record("1"))
        writer.write(record("2", "no"))
        # Still open: a crash now would keep both answers.
        assert read_predictions(path) == {"1": "yes", "2": "no"}
    assert json.loads(path.read_text().splitlines()[0])["prompt"] == "question 1?"


def test_resume_skips_answered_ids_and_cuts_a_half_written_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    with PredictionWriter(path) as writer:
        writer.write(record("1"))
        writer.write(record("2"))
    with open(path, "a") as handle:  # the process was killed in the middle of writing record 3
        handle.write('{"id": "3", "predic')
    with PredictionWriter(path) as writer:
        assert writer.dropped_partial_line
        assert writer.answered == {"1", "2"}
        with pytest.raises(ValueError, match="'2' is already answered"):
            writer.write(record("2"))
        writer.write(record("3"))
    assert read_predictions(path, tally=(tally := Tally())) == {"1": "yes", "2": "yes", "3": "yes"}
    assert tally.n_skipped == 0


def test_refuses_to_overwrite_without_resume(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(record("1")) + "\n")
    with pytest.raises(FileExistsError):
        PredictionWriter(path, resume=False).__enter__()


def test_reads_llava_med_answer_files_keyed_by_string_id(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 11, "prompt": "q", "text": "Yes", "answer_id": "a", "model_id": "m", "metadata": {}},
        {"question_id": "x7", "text": "left"},
    ]) + "\n")
    assert read_predictions(path) == {"11": "Yes", "x7": "left"}


def test_bad_lines_are_counted_or_raised_with_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2}\nnot json\n')
    tally = Tally()
    assert read_predictions(path, tally=tally) == {"1": "yes"}
    assert tally.read == 3 and tally.n_skipped == 2
    with pytest.raises(RecordError, match=r"answers.jsonl:2( \(id 2\))?: a prediction needs"):
        read_predictions(path, strict=True)


def test_an_id_answered_twice_in_one_file_is_named(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "5", "prediction": "a"}\n{"id": "5", "prediction": "b"}\n')
    with pytest.raises(ValueError, match="answered more than once: 5"):
        read_predictions(path)


@pytest.mark.parametrize("mode", ["modulo", "contiguous", "hash"])
def test_shards_are_disjoint_and_cover_everything(mode):
    items = list(range(11))
    parts = [shard_rows(items, 3, i, mode, key=str) for i in range(3)]
    assert sorted(x for part in parts for x in part) == items
    assert all(part == sorted(part) for part in parts)   # input order kept
    if mode == "contiguous":
        assert parts[0] + parts[1] + parts[2] == items
    elif mode == "modulo":
        assert parts[1] == [1, 4, 7, 10]
    else:   # by a hash of the key: the same in every run, whatever else the input holds
        assert parts == [shard_rows(list(range(40)), 3, i, mode, key=str)[:len(parts[i])] for i in range(3)]
    if mode != "hash":
        assert sorted(len(p) for p in parts) == [3, 4, 4]
    with pytest.raises(ValueError, match="shard index 3 is not in 0..2"):
        shard_rows(items, 3, 3, mode)


def _write(path, ids):
    path.write_text("".join(json.dumps(record(i, f"answer {i}")) + "\n" for i in ids))
    return path


def test_two_merged_shards_equal_one_run(tmp_path):
    ids = [str(i) for i in range(7)]
    whole = _write(tmp_path / "whole.jsonl", ids)
    shards = [_write(tmp_path / f"shard{k}.jsonl", shard_rows(ids, 2, k)) for k in range(2)]
    assert merge_predictions(shards, tmp_path / "merged.jsonl", expected_ids=ids) == 7
    assert (tmp_path / "merged.jsonl").read_text() == whole.read_text()


def test_merge_names_missing_duplicated_and_unexpected_ids(tmp_path):
    a = _write(tmp_path / "a.jsonl", ["1", "2", "3"])
    b = _write(tmp_path / "b.jsonl", ["3", "5", "99"])
    with pytest.raises(MergeError) as caught:
        merge_predictions([a, b], tmp_path / "merged.jsonl", expected_ids=["1", "2", "3", "4", "5"])
    error = caught.value
    assert (error.missing, error.duplicated, error.unexpected) == (["4"], ["3"], ["99"])
    for part in ("1 missing ids: 4", "1 duplicated ids: 3", "1 unexpected ids: 99"):
        assert part in str(error)
    assert not (tmp_path / "merged.jsonl").exists()


def test_torchrun_environment_picks_the_shard(monkeypatch):
    from medtune.distributed import shard_from_env
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shard_from_env(4, 1) == (4, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert shard_from_env() == (2, 1)


def test_a_resumed_shard_asks_only_what_is_left(tmp_path):
    from types import SimpleNamespace

    from medtune.eval.predictions import pending, shard_path
    questions = [SimpleNamespace(id=str(i)) for i in range(10)]
    path = shard_path(tmp_path, 2, 1)
    assert path.name == "predictions.shard001-of-002.jsonl"
    with PredictionWriter(path) as writer:
        for question in pending(questions, writer.answered, 2, 1)[:2]:
            writer.write(record(question.id))
    with PredictionWriter(path) as writer:  # the run restarts
        assert [q.id for q in pending(questions, writer.answered, 2, 1)] == ["5", "7", "9"]
