"""``medtune data convert`` through the real CLI entry point (medtune.cli.main)."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from medtune.cli import main
from medtune.data.formats import read_records
from medtune.data.jsonl import Tally
from medtune.paths import bundled_data

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def convert(*argv):
    return main(["data", "convert", *map(str, argv)])


def test_vqa_rad_test_split_to_messages_writes_451_samples(tmp_path, capsys):
    out = tmp_path / "test.jsonl"
    assert convert("--from", "vqa-rad", "--to", "messages", bundled_data("vqa_rad", "testset.json"), out) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == "451 read, 451 written, 0 skipped"
    assert "--image-root" in printed  # the images stay in data/vqa_rad/images: the user is told so
    lines = out.read_text().splitlines()
    assert len(lines) == 451
    answer_types = [json.loads(line)["meta"]["answer_type"] for line in lines]
    assert (answer_types.count("closed"), answer_types.count("open")) == (272, 179)
    samples = list(read_records("messages", out, tally=Tally()))
    assert [s.id for s in samples] == [str(r["qid"]) for r in json.loads(bundled_data("vqa_rad", "testset.json").read_text())]


def test_strict_stops_at_the_first_bad_record_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "slake.json"
    path = bundled_data("slake", "train_en.json")
    assert convert("--from", "slake", "--to", "llava", path, out, "--strict") == 2
    assert f"{path}:[1622] (id 1622): empty field 'answer'" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert convert("--from", "slake", "--to", "llava", path, out) == 0
    assert "4919 read, 4918 written, 1 skipped (1 empty field)" in capsys.readouterr().out


def test_medmax_credentialed_rows_are_counted_and_included_on_request(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert convert("--from", "medmax", "--to", "canonical", FIXTURES / "medmax.jsonl", out) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("5 read, 2 written, 3 skipped (2 credentialed (images not shipped), 1 ")
    assert convert("--from", "medmax", "--to", "canonical", FIXTURES / "medmax.jsonl", out,
                   "--include-credentialed") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("5 read, 3 written, 2 skipped")
    assert sum(json.loads(line)["meta"].get("credential", False) for line in out.read_text().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--from", "slake", "--to", "llava", "--include-credentialed"], "--include-credentialed does not apply to --from slake"),
    (["--from", "llava", "--to", "canonical", "--window", "lung"], "--window applies only with --materialise"),
])
def test_flags_that_do_not_apply_are_refused(argv, message, tmp_path, capsys):
    assert convert(*argv, FIXTURES / "llava_med_instruct.json", tmp_path / "o.jsonl") == 2
    assert message in capsys.readouterr().err


def test_read_only_target_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert("--from", "llava", "--to", "vqa-rad", FIXTURES / "llava_med_instruct.json", tmp_path / "o.json")
    assert exit_info.value.code == 2 and "invalid choice: 'vqa-rad'" in capsys.readouterr().err


def _llava_dataset(root: Path, image_paths: list[str]) -> Path:
    records = [{"id": f"r{i}", "image": image,
                "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                  {"from": "gpt", "value": "A scan."}]} for i, image in enumerate(image_paths)]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_materialise_leaves_png_references_alone(tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    data = _llava_dataset(tmp_path, ["a.png"])
    assert convert("--from", "llava", "--to", "canonical", data, tmp_path / "out.jsonl",
                   "--materialise", tmp_path / "png") == 0
    (sample,) = read_records("canonical", tmp_path / "out.jsonl", tally=Tally())
    assert [i.path for i in sample.images] == ["a.png"]
    assert not (tmp_path / "png").exists() or list((tmp_path / "png").iterdir()) == []


def test_materialise_turns_dicom_into_png_without_patient_identifiers(tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    source = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    patient_name = str(pydicom.dcmread(source).PatientName)
    (tmp_path / "scans").mkdir()
    shutil.copy(source, tmp_path / "scans" / "ct.dcm")
    Image.new("RGB", (32, 32)).save(tmp_path / "scans" / "x.png")
    data = _llava_dataset(tmp_path, ["scans/ct.dcm", "scans/missing.dcm", "scans/x.png"])
    out = tmp_path / "out.jsonl"
    assert convert("--from", "llava", "--to", "canonical", data, out, "--materialise", tmp_path / "png",
                   "--window", "lung") == 0
    printed = capsys.readouterr().out
    assert "3 read, 2 written, 1 skipped (1 image could not be materialised)" in printed
    assert "sample r1:" in printed and "missing.dcm" in printed
    samples = {s.id: s for s in read_records("canonical", out, tally=Tally())}
    (png_path,) = [i.path for i in samples["r0"].images]
    assert png_path.startswith("png/") and png_path.endswith(".png")
    with Image.open(tmp_path / png_path) as png:
        assert (png.format, png.size) == ("PNG", (128, 128))
    assert [i.path for i in samples["r2"].images] == ["scans/x.png"]
    for written in [out, *(tmp_path / "png").iterdir()]:
        assert patient_name.encode() not in written.read_bytes()
        assert patient_name.split("^")[0].encode() not in written.read_bytes()


def test_materialise_folder_must_lie_inside_the_image_root(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    data = _llava_dataset(root, ["a.png"])
    assert convert("--from", "llava", "--to", "canonical", data, tmp_path / "o.jsonl",
                   "--materialise", tmp_path / "elsewhere") == 2
    assert "must lie inside the image root" in capsys.readouterr().err
