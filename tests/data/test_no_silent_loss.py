"""Data never vanishes silently: every record of an input is read, written or skipped with a reason that names it,
a file read in the wrong format fails saying which format it looks like, formats are detected from content, and a
missing image root is named once. All through the real CLI entry point (medtune.cli.main) on tiny files."""
import json
from pathlib import Path

import pytest
import yaml

from medtune.cli import main
from medtune.data.formats import read_records
from medtune.data.jsonl import Tally, write_samples
from medtune.data.schema import ImageRef, Metadata, qa_sample
from medtune.errors import UserError
from medtune.paths import bundled_data

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def llava_record(sample_id: str, question: str = "What is shown?", image: str = "x.png") -> str:
    return json.dumps({"id": sample_id, "image": image,
                       "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                         {"from": "gpt", "value": "A scan."}]})


def llava_list(path: Path, records: list[str]) -> Path:
    path.write_text("[\n" + ",\n".join(records) + "\n]\n")
    return path


def summary_line(out: str) -> str:
    return out.strip().splitlines()[-1]


# ---- every record accounted for ---------------------------------------------------------------------------

def test_a_malformed_record_in_a_json_list_is_skipped_and_the_rest_are_read(tmp_path, capsys):
    broken = llava_record("b").replace('"image": "x.png",', '"image": "x.png",,')  # doubled comma
    data = llava_list(tmp_path / "data.json", [llava_record("a"), broken, llava_record("c")])
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", "--from", "llava", "--to", "canonical", str(data), str(out)]) == 0
    printed = capsys.readouterr().out
    assert summary_line(printed) == "3 read, 2 written, 1 skipped (1 not valid JSON)"
    assert f"{data}:[1] (id b): not valid JSON" in printed
    assert [s.id for s in read_records("canonical", out, tally=Tally())] == ["a", "c"]


def test_a_record_with_a_stray_quote_on_its_own_line_is_skipped_and_reading_resumes(tmp_path):
    lines = ['[', '{"id": "a", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},',
             '{"id": "b", "conversations": [{"from": "human", "value": "Q?}, {"from": "gpt", "value": "A"}]},',
             '{"id": "c", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]}', ']']
    data = tmp_path / "data.json"
    data.write_text("\n".join(lines) + "\n")
    tally = Tally()
    assert [s.id for s in read_records("llava", data, tally=tally)] == ["a", "c"]
    assert (tally.read, tally.n_skipped) == (3, 1)


def test_an_unreadable_tail_is_counted_and_the_conversion_fails(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text("[\n" + llava_record("a") + ",\n" + llava_record("b")[:40])  # cut mid-record
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", "--from", "llava", "--to", "canonical", str(data), str(out)]) == 2
    captured = capsys.readouterr()
    assert summary_line(captured.out) == "2 read, 1 written, 1 skipped (1 unreadable rest of file)"
    assert "(id b)" in captured.out and "rest of the file from line 3 is unreadable" in captured.err
    assert [s.id for s in read_records("canonical", out, tally=Tally())] == ["a"]  # what came before it
    assert main(["data", "stats", str(data), "--format", "llava"]) == 2  # the other verbs refuse it outright
    assert "its records are not counted" in capsys.readouterr().err


def test_a_valid_file_read_in_the_wrong_format_fails_and_names_the_right_one(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    slake = bundled_data("slake", "test_en.json")
    assert main(["data", "convert", "--from", "vqa-rad", "--to", "canonical", str(slake), str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of its 1061 records" in err and "looks like slake" in err
    assert not out.exists()


def test_stats_in_the_wrong_format_fails_too(capsys):
    assert main(["data", "stats", str(bundled_data("vqa_rad", "testset.json")), "--format", "slake"]) == 2
    assert "looks like vqa-rad" in capsys.readouterr().err


def test_check_in_the_wrong_format_lists_the_problems_and_names_the_format(capsys):
    assert main(["data", "check", str(FIXTURES / "medmax.jsonl"), "--format", "llava"]) == 1
    assert "looks like medmax" in capsys.readouterr().out


# ---- detection from content -------------------------------------------------------------------------------

def _canonical(path: Path) -> Path:
    write_samples(path, [qa_sample("q1", "Is there a mass?", "no", images=[ImageRef("x.png")],
                                   meta=Metadata(answer_type="closed"))])
    return path


@pytest.mark.parametrize("expected, path", [
    ("llava", FIXTURES / "llava_med_instruct.json"),
    ("llava-med-vqa", FIXTURES / "llava_med_vqa_test.json"),
    ("medmax", FIXTURES / "medmax.jsonl"),
    ("messages", FIXTURES / "messages_sharegpt.jsonl"),
    ("pmc-vqa", FIXTURES / "pmc_vqa.csv"),
    ("vqa-rad", bundled_data("vqa_rad", "testset.json")),
    ("vqa-rad", bundled_data("vqa_rad", "VQA_RAD Dataset Public.json")),
    ("slake", bundled_data("slake", "validate_en.json")),
    ("canonical", None),
    ("pathvqa", None),
])
def test_formats_are_detected_from_content(expected, path, tmp_path):
    if expected == "canonical":
        path = _canonical(tmp_path / "data.jsonl")
    if expected == "pathvqa":
        path = tmp_path / "pathvqa.json"
        path.write_text(json.dumps([{"qid": "t0", "image": "a.jpg", "question": "what is this?", "answer": "liver"}]))
    from medtune.data.formats import detect_format

    assert detect_format(path) == expected


def test_ambiguous_content_is_an_error_naming_the_candidates(tmp_path):
    path = tmp_path / "both.json"
    path.write_text(json.dumps([{"qid": 1, "image_name": "a.jpg", "img_name": "a.jpg", "question": "q?",
                                 "answer": "yes"}]))
    from medtune.data.formats import detect_format

    with pytest.raises(UserError, match="slake.*vqa-rad|vqa-rad.*slake"):
        detect_format(path)


def test_unrecognised_content_is_an_error_naming_the_keys(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"foo": 1, "bar": 2}) + "\n")
    from medtune.data.formats import detect_format

    with pytest.raises(UserError, match=r"\['bar', 'foo'\]"):
        detect_format(path)


def test_convert_without_from_detects_the_format(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", "--to", "canonical", str(bundled_data("slake", "validate_en.json")), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(slake, detected)" in printed and summary_line(printed).startswith("1053 read, 1053 written")


def test_check_on_a_llava_list_reads_records_not_lines(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes((bundled_data("vqa_rad", "images") / "synpic42202.jpg").read_bytes())
    data = llava_list(tmp_path / "data.json", [llava_record("a"), llava_record("b")])
    assert main(["data", "check", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "not valid JSON" not in printed and "checked 2 records" in printed
    assert "llava (detected" in printed


def test_stats_and_leakage_detect_formats(tmp_path, capsys):
    train, test = bundled_data("vqa_rad", "trainset.json"), bundled_data("vqa_rad", "testset.json")
    assert main(["data", "stats", str(test)]) == 0
    assert summary_line(capsys.readouterr().out) == "451 read, 0 written, 0 skipped"
    assert main(["data", "leakage", str(train), str(test), "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["train"]["format"], report["test"]["format"]) == ("vqa-rad", "vqa-rad")


def test_a_mix_recipe_dataset_without_a_format_is_detected(tmp_path, capsys):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 0, "shuffle": "none", "datasets": [
        {"name": "slake", "path": str(bundled_data("slake", "validate_en.json")), "count": 3}]}))
    out = tmp_path / "mix.jsonl"
    assert main(["data", "mix", str(recipe), str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3


# ---- the image root is named once --------------------------------------------------------------------------

def test_a_missing_image_root_is_named_once_up_front(tmp_path, capsys):
    data = llava_list(tmp_path / "data.json", [llava_record(str(i)) for i in range(5)])
    nowhere = tmp_path / "no-such-images"
    assert main(["data", "check", str(data), "--image-root", str(nowhere)]) == 2
    captured = capsys.readouterr()
    assert "file not found" not in captured.out
    assert captured.err.count(str(nowhere)) == 1 and "does not exist" in captured.err


def test_a_missing_image_root_stops_leakage_and_materialise_too(tmp_path, capsys):
    data = llava_list(tmp_path / "data.json", [llava_record("a")])
    nowhere = tmp_path / "no-such-images"
    assert main(["data", "leakage", str(data), str(data), "--image-root", str(nowhere)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "convert", "--to", "canonical", str(data), str(tmp_path / "o.jsonl"), "--image-root",
                 str(nowhere), "--materialise", str(nowhere / "png")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- per-record errors name the record's id -----------------------------------------------------------------

def test_record_errors_name_the_record_id(tmp_path, capsys):
    records = [
        llava_record("good"),
        llava_record("two-placeholders", question="<image> and <image>?"),          # placeholder count
        json.dumps({"id": "no-turns", "image": "x.png"}),                           # missing field
        json.dumps({"id": "robot", "conversations": [{"from": "robot", "value": "hi"}]}),  # unknown speaker
    ]
    data = llava_list(tmp_path / "data.json", records)
    tally = Tally()
    list(read_records("llava", data, tally=tally))
    examples = "\n".join(tally.examples.values())
    for sample_id in ("two-placeholders", "no-turns", "robot"):
        assert f"(id {sample_id})" in examples
    (tmp_path / "x.png").write_bytes((bundled_data("vqa_rad", "images") / "synpic42202.jpg").read_bytes())
    assert main(["data", "check", str(data)]) == 1
    printed = capsys.readouterr().out
    for sample_id in ("two-placeholders", "no-turns", "robot"):
        assert f"[id {sample_id}]" in printed


def test_benchmark_record_errors_name_the_qid(tmp_path):
    path = tmp_path / "trainset.json"
    path.write_text(json.dumps([{"qid": 42, "image_name": "a.jpg", "question": "q?", "answer": ""}]))
    tally = Tally()
    with pytest.raises(UserError):  # nothing usable: the one record is bad
        list(read_records("vqa-rad", path, tally=tally))
    assert "(id 42): empty field 'answer'" in "\n".join(tally.examples.values())


# ---- nothing half-written stays behind ---------------------------------------------------------------------

_WRITER = """
import sys, time
from medtune.data.jsonl import atomic_open
with atomic_open(sys.argv[1]) as handle:
    handle.write("half a line")
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def _writer(out: Path):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    return process


def test_a_killed_writers_partial_file_is_removed_by_the_next_run(tmp_path):
    import signal

    data = llava_list(tmp_path / "data.json", [llava_record("a")])
    out = tmp_path / "out.jsonl"
    killed = _writer(out)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = _writer(tmp_path / "other.jsonl")   # another output's writer, still running
    try:
        (stale,) = tmp_path.glob(".out.jsonl.*.partial")
        assert main(["data", "convert", "--from", "llava", "--to", "canonical", str(data), str(out)]) == 0
        assert not stale.exists() and not list(tmp_path.glob(".out.jsonl.*.partial"))
        assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a"]
        assert len(list(tmp_path.glob(".other.jsonl.*.partial"))) == 1   # not ours to remove
    finally:
        live.kill()
        live.wait()


def test_a_running_writers_partial_file_of_the_same_output_is_kept(tmp_path):
    from medtune.data.jsonl import remove_stale_partials

    out = tmp_path / "out.jsonl"
    live = _writer(out)
    try:
        assert remove_stale_partials(out) == [] and len(list(tmp_path.glob(".out.jsonl.*.partial"))) == 1
    finally:
        live.kill()
        live.wait()
    assert len(remove_stale_partials(out)) == 1 and not list(tmp_path.glob(".out.jsonl.*.partial"))
