import json

import pytest

from medtune.data.jsonl import RecordError, Tally, read_samples, write_samples
from medtune.data.schema import ImageRef, Metadata, SchemaError, Sample, normalise_answer_type, qa_sample


@pytest.mark.parametrize("raw, expected", [
    ("CLOSED ", "closed"), ("close", "closed"), ("Closed", "closed"), ("OPEN", "open"),
    ("yes/no", "closed"), ("multiple_choice", "mcq"), ("MCQ", "mcq"), ("", None), (None, None),
])
def test_answer_type_spellings_normalise(raw, expected):
    assert normalise_answer_type(raw) == expected


def test_unknown_answer_type_is_named():
    with pytest.raises(SchemaError, match="unknown answer_type 'sometimes'"):
        Metadata(answer_type="sometimes")


def test_sample_round_trips_through_json():
    sample = qa_sample("q1", "Is there a fracture?", "no",
                       images=[ImageRef("a.dcm", frame=2), ImageRef("vol.nii.gz", axis="axial", slice=40)],
                       meta=Metadata(source="x", answer_type="CLOSED ", choices=["yes", "no"], extra={"k": 1}))
    data = json.loads(json.dumps(sample.to_dict()))
    again = Sample.from_dict(data)
    assert again == sample
    assert again.meta.answer_type == "closed" and again.meta.answer == "no"
    assert [i.path for i in again.images] == ["a.dcm", "vol.nii.gz"]


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "messages": []}, "sample has no messages"),
    ({"id": "", "messages": [{"role": "user", "content": "hi"}]}, "sample id must be a non-empty string"),
    ({"id": "a", "messages": [{"role": "doctor", "content": "hi"}]}, "unknown role 'doctor'"),
    ({"id": "a", "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "unknown content part type"),
    ({"id": "a", "messages": [{"role": "user", "content": "x"}], "meta": {"organ_": 1}}, "meta has unknown keys"),
    ({"id": "a", "messages": [{"role": "user", "content": [{"type": "image", "image": {"path": "a", "frame": -1}}]}]},
     "frame must be a non-negative integer"),
])
def test_invalid_records_say_why(record, message):
    with pytest.raises(SchemaError, match=message):
        Sample.from_dict(record)


def test_reading_counts_bad_lines_and_strict_raises(tmp_path):
    good = qa_sample("1", "q?", "a").to_dict()
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"id": "2", "messages": []}) + "\n")
    tally = Tally()
    assert [s.id for s in read_samples(path, tally=tally)] == ["1"]
    assert tally.read == 3 and tally.n_skipped == 2
    assert "3 read, 0 written, 2 skipped" in tally.summary()
    with pytest.raises(RecordError, match=rf"{path}:2: not valid JSON"):
        list(read_samples(path, strict=True))


def test_writer_never_leaves_a_partial_file(tmp_path):
    out = tmp_path / "out.jsonl"

    def samples():
        yield qa_sample("1", "q?", "a")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_samples(out, samples())
    assert not out.exists() and list(tmp_path.iterdir()) == []
    write_samples(out, [qa_sample("1", "q?", "a")])
    assert [s.id for s in read_samples(out)] == ["1"]


def test_atomic_writes_get_the_permissions_a_plain_open_would(tmp_path):
    from medtune.data.jsonl import write_json

    write_json(tmp_path / "report.json", {"a": 1})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 != 0o600
