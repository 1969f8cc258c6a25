import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from broken_inputs import PATIENT_ID, PATIENT_NAME, make_broken_dataset, write_dicom, write_rgb_png
from medtune.cli import main
from medtune.data import checks

pytest.importorskip("pydicom")
REPO = Path(__file__).resolve().parents[2]


def user(*parts):
    return {"role": "user", "content": list(parts)}


def assistant(text):
    return {"role": "assistant", "content": text}


def text(value):
    return {"type": "text", "text": value}


def image(path, **where):
    return {"type": "image", "image": {"path": path, **where}}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


BROKEN = Path(__file__).resolve().parent / "broken"


def broken_folder(tmp_path: Path, source: str) -> tuple[Path, dict[int, str]]:
    """The committed tests/data/broken (copied, so nothing is written into the repository) or a fresh one."""
    if source == "generated":
        return make_broken_dataset(tmp_path / "set")
    shutil.copytree(BROKEN, tmp_path / "set")
    expected = json.loads((BROKEN / "expected.json").read_text())
    return tmp_path / "set" / "broken.jsonl", {int(line): message for line, message in expected.items()}


def test_committed_folder_matches_the_generator(tmp_path):
    _, generated = make_broken_dataset(tmp_path / "fresh")
    assert broken_folder(tmp_path, "committed")[1] == generated
    committed = sorted(p.relative_to(BROKEN / "images") for p in (BROKEN / "images").iterdir())
    assert committed == sorted(p.relative_to(tmp_path / "fresh" / "images")
                               for p in (tmp_path / "fresh" / "images").iterdir())


@pytest.mark.parametrize("source", ["committed", "generated"])
def test_every_broken_input_gets_its_own_message_and_no_patient_data_leaks(tmp_path, capsys, source):
    data, expected = broken_folder(tmp_path, source)
    report = tmp_path / "report.json"
    assert main(["data", "check", str(data), "--report", str(report)]) == 1
    out, err = capsys.readouterr()
    problem_lines = [line for line in out.splitlines() if line.startswith(f"{data}:")]
    by_line = {int(line.split(":")[1]): line for line in problem_lines}
    assert sorted(by_line) == sorted(expected)  # one problem per broken line, none for the good PNG / DICOM
    assert len(problem_lines) == len(expected)
    for number, message in expected.items():
        assert message in by_line[number], by_line[number]
    # Each message is distinct from every other broken input's: no two lines share their reason.
    reasons = {line.split(": error: ", 1)[1].split(" [id")[0].split("': ", 1)[-1] for line in problem_lines}
    assert len(reasons) == len(expected)
    assert f"checked 11 records and 9 distinct images (7 unusable): {len(expected)} errors, 0 warnings" in out
    assert "11 read, 0 written, 1 skipped (1 not valid JSON)" in out
    saved = json.loads(report.read_text())
    assert saved["errors"] == len(expected) and len(saved["problems"]) == len(expected)
    assert {p["kind"] for p in saved["problems"]} == {"unreadable image", "missing image", "image outside root",
                                                      "unparsable record", "placeholder mismatch"}
    stats = tmp_path / "stats.json"
    assert main(["data", "stats", str(data), "--json", str(stats)]) == 0
    out2, err2 = capsys.readouterr()
    assert (data.parent / "images" / "patient.dcm").read_bytes().count(PATIENT_NAME.encode()) == 1  # it is there
    for secret in (PATIENT_NAME, "Doe^Jane", "Quixotic", PATIENT_ID, "St Example Hospital"):
        for text in (out, err, out2, err2, report.read_text(), stats.read_text()):
            assert secret not in text


def test_structural_problems_are_each_reported_with_their_line(tmp_path, capsys):
    write_rgb_png(tmp_path / "a.png")
    ok = {"id": "ok", "messages": [user(image("a.png"), text("Q?")), assistant("A")]}
    records = [
        ok,
        {"id": "empty", "messages": [user(text("  ")), assistant("A")]},
        {"id": "first", "messages": [assistant("A"), user(text("Q?"))]},
        {"id": "twice", "messages": [user(text("Q?")), user(text("Q again?")), assistant("A")]},
        {"id": "nouser", "messages": [{"role": "system", "content": "be brief"}, assistant("A")]},
        {"id": "latesys", "messages": [user(text("Q?")), {"role": "system", "content": "x"}, assistant("A")]},
        dict(ok),  # duplicate id "ok"
        {"id": "type", "messages": [user(text("Q?")), assistant("A")], "meta": {"answer_type": "sometimes"}},
        {"id": "unanswered", "messages": [user(text("Q?"))]},
        {"id": "dup-ph", "messages": [user(image("a.png"), text("<image>\nQ?")), assistant("A")]},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["data", "check", str(data)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{data}:")]
    assert lines == [
        f"{data}:2: error: empty user turn (message 1) [id empty]",
        f"{data}:3: error: assistant turn before any user turn [id first]",
        f"{data}:4: error: two consecutive user turns (messages 1 and 2) [id twice]",
        f"{data}:5: error: no user turn [id nouser]",
        f"{data}:6: error: system message at position 2 (only the first may be system) [id latesys]",
        f"{data}:7: error: duplicate id 'ok' (first at {data}:1) [id ok]",
        f"{data}:8: error: unknown answer_type 'sometimes' (expected one of open, closed, mcq) [id type]",
        f"{data}:9: warning: no assistant turn (a question without an answer) [id unanswered]",
        f"{data}:10: warning: '<image>' in the text duplicates the 1 image part(s) [id dup-ph]",
    ]


def test_warnings_fail_only_under_strict(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "q", "messages": [user(text("Q?"))]}])
    assert main(["data", "check", str(data)]) == 0
    assert main(["data", "check", str(data), "--strict"]) == 1
    clean = write_jsonl(tmp_path / "c.jsonl", [{"id": "q", "messages": [user(text("Q?")), assistant("A")]}])
    assert main(["data", "check", str(clean), "--strict"]) == 0
    assert "0 errors, 0 warnings" in capsys.readouterr().out


def test_each_distinct_image_is_loaded_once(tmp_path, monkeypatch):
    write_rgb_png(tmp_path / "shared.png")
    records = [{"id": str(i), "messages": [user(image("shared.png"), image("gone.png"), text("Q?")), assistant("A")]}
               for i in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    calls = []
    real = checks.load_image
    monkeypatch.setattr(checks, "load_image", lambda ref, *a, **k: calls.append(ref.path) or real(ref, *a, **k))
    problems, images = checks.check_dataset(data, "canonical", tmp_path, progress=False)
    assert sorted(calls) == ["gone.png", "shared.png"]
    # The missing image is still reported for every sample that names it.
    assert [p.where for p in problems] == [f"{data}:{n}" for n in range(1, 7)]
    assert {p.kind for p in problems} == {"missing image"}


def test_allow_root_admits_an_outside_folder(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_rgb_png(outside / "x.png")
    (tmp_path / "set").mkdir()
    data = write_jsonl(tmp_path / "set" / "d.jsonl",
                       [{"id": "a", "messages": [user(image(str(outside / "x.png")), text("Q?")), assistant("A")]}])
    assert main(["data", "check", str(data)]) == 1
    assert "outside the image root" in capsys.readouterr().out
    assert main(["data", "check", str(data), "--allow-root", str(outside)]) == 0


def test_dicom_frames_are_checked_against_the_file(tmp_path, capsys):
    write_dicom(tmp_path / "mf.dcm", np.arange(2 * 8 * 8).reshape(2, 8, 8), frames=2)
    records = [{"id": str(f), "messages": [user(image("mf.dcm", frame=f), text("Q?")), assistant("A")]}
               for f in (0, 1, 2)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["data", "check", str(data)]) == 1
    out = capsys.readouterr().out
    assert f"{data}:3: error: image 'mf.dcm': frame 2 out of range (the file has 2 frames) [id 2]" in out
    assert "checked 3 records and 3 distinct images (1 unusable): 1 errors" in out
    assert PATIENT_NAME not in out


def test_llava_input_is_checked_after_conversion(tmp_path, capsys):
    write_rgb_png(tmp_path / "x.png")
    records = [
        {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat?"},
                                                        {"from": "gpt", "value": "b"}]},
        {"id": "b", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                              {"from": "gpt", "value": "b"}]},
        {"id": "b", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                        {"from": "gpt", "value": "c"}]},
    ]
    data = tmp_path / "l.json"
    data.write_text(json.dumps(records))
    assert main(["data", "check", str(data), "--format", "llava"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{data}:")]
    assert len(lines) == 3
    assert lines[0].startswith(f"{data}:[0]: error: ") and "placeholder" in lines[0]
    assert lines[1] == f"{data}:[1]: error: image 'missing.png': file not found [id b]"
    assert lines[2] == f"{data}:[2]: error: duplicate id 'b' (first at {data}:[1]) [id b]"


def test_bundled_vqa_rad_test_split_is_clean(capsys):
    testset = REPO / "data" / "vqa_rad" / "testset.json"
    if not testset.is_file():
        pytest.skip("bundled VQA-RAD absent")
    assert main(["data", "check", str(testset), "--format", "vqa-rad"]) == 0
    out = capsys.readouterr().out
    assert "checked 451 records" in out and "0 errors, 0 warnings" in out


def test_reports_on_pydicom_samples_carry_no_patient_data(tmp_path, capsys):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    sources = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]
    secrets = [str(value) for path in sources for value in (dcmread(path).PatientName, dcmread(path).PatientID)]
    records = [{"id": p.stem, "messages": [user(image(str(p)), text("Q?")), assistant("A")]} for p in sources]
    records.append({"id": "f", "messages": [user(image(str(sources[0]), frame=1), text("Q?")), assistant("A")]})
    data = write_jsonl(tmp_path / "d.jsonl", records)
    report, stats = tmp_path / "report.json", tmp_path / "stats.json"
    allow = ["--allow-root", str(sources[0].parent)]
    assert main(["data", "check", str(data), "--report", str(report), *allow]) == 1  # frame 1 does not exist
    assert main(["data", "stats", str(data), "--json", str(stats)]) == 0
    out, err = capsys.readouterr()
    assert "frame 1 out of range (the file has 1 frame)" in out
    for secret in secrets:
        assert secret and secret not in out + err + report.read_text() + stats.read_text()


def test_dicom_without_the_extra_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import sys
    write_dicom(tmp_path / "x.dcm", np.zeros((4, 4)))
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "messages": [user(image("x.dcm"), text("Q?"))]}])
    monkeypatch.setitem(sys.modules, "pydicom", None)
    assert main(["data", "check", str(data)]) == 2
    assert capsys.readouterr().err.strip() == ("medtune data: error: x.dcm: reading DICOM needs pydicom: "
                                               "pip install 'medtune[dicom]'")


def test_a_missing_file_is_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"medtune data: error: {tmp_path / 'nope.jsonl'}: no such file"


def slake_records(count: int) -> list[dict]:
    """SLAKE's JSON as it ships without its imgs/ folder: every record names an image that is not there."""
    return [{"qid": 100 + i, "img_name": f"xmlab{i % 3}/source.jpg", "question": "Which modality is this?",
             "answer": "CT", "q_lang": "en", "answer_type": "OPEN"} for i in range(count)]


def test_annotations_without_images_print_a_few_examples_a_count_and_where_images_were_looked_for(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "test.json"
    data.write_text(json.dumps(slake_records(12)))
    command = [sys.executable, "-c", "import sys; from medtune.cli import main; sys.exit(main())", "data", "check",
               str(data)]
    # stderr into the same pipe: what a person sees in a log, in the order it arrives there
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "format: slake (detected from the file's content; --format to choose)"
    problems = [line for line in lines if line.startswith(f"{data}:")]
    assert problems == [f"{data}:[{i}]: error: image 'xmlab{i % 3}/source.jpg': file not found [id {100 + i}]"
                        for i in range(5)]
    assert "missing image: 12 problems, the first 5 shown above" in done.stdout
    assert f"image paths were looked up under {tmp_path} (--image-root DIR" in done.stdout
    assert "checked 12 records and 3 distinct images (3 unusable): 12 errors, 0 warnings" in done.stdout


def test_no_images_checks_the_annotations_alone(tmp_path, capsys):
    records = slake_records(4)
    records[2]["qid"] = records[1]["qid"]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(records))
    report = tmp_path / "report.json"
    assert main(["data", "check", str(data), "--no-images", "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith(f"{data}:")] == [
        f"{data}:[2]: error: duplicate id '101' (first at {data}:[1]) [id 101]"]
    assert "checked 4 records and no image (annotations only): 1 errors, 0 warnings" in out
    assert "looked up under" not in out
    assert json.loads(report.read_text())["annotations_only"] is True


def test_examples_zero_prints_every_problem_and_the_report_keeps_all(tmp_path, capsys):
    data = tmp_path / "test.json"
    data.write_text(json.dumps(slake_records(7)))
    report = tmp_path / "report.json"
    assert main(["data", "check", str(data), "--examples", "2", "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith(f"{data}:")]) == 2
    assert f"missing image: 7 problems, the first 2 shown above (all in {report}" in out
    assert len(json.loads(report.read_text())["problems"]) == 7
    assert main(["data", "check", str(data), "--examples", "0"]) == 1
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith(f"{data}:")]) == 7
    assert "problems, the first" not in out
