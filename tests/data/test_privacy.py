"""Pixel PHI and file names: DICOM that may show burned-in patient text is refused unless the user says otherwise
(and then the report says so), and files medtune writes are named by content, never after a source file."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from broken_inputs import write_dicom
from medtune.cli import main
from medtune.data.formats import read_records
from medtune.data.images import BurnedInError, ImageError, load_image, materialise
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, UltrasoundImageStorage  # noqa: E402

PIXELS = np.arange(256).reshape(16, 16)


def llava_file(root: Path, images: list[str]) -> Path:
    records = [{"id": f"r{i}", "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                 {"from": "gpt", "value": "A scan."}]}
               for i, image in enumerate(images)]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("options, reason", [
    ({"burned_in": "YES"}, "BurnedInAnnotation is YES"),
    ({"sop_class": SecondaryCaptureImageStorage}, "Secondary Capture"),
    ({"sop_class": UltrasoundImageStorage, "modality": "US"}, "Ultrasound"),
    ({"sop_class": CTImageStorage, "modality": "OT"}, "modality OT"),
])
def test_dicom_that_may_show_burned_in_text_is_refused_by_default(options, reason, tmp_path):
    write_dicom(tmp_path / "x.dcm", PIXELS, **options)
    with pytest.raises(BurnedInError, match=reason) as refused:
        load_image("x.dcm", tmp_path)
    assert "--allow-burned-in" in str(refused.value) and isinstance(refused.value, ImageError)
    assert load_image("x.dcm", tmp_path, allow_burned_in=True).size == (16, 16)


def test_plain_ct_loads_and_burned_in_no_is_not_a_refusal(tmp_path):
    write_dicom(tmp_path / "ct.dcm", PIXELS)
    write_dicom(tmp_path / "no.dcm", PIXELS, burned_in="NO")
    assert load_image("ct.dcm", tmp_path).size == load_image("no.dcm", tmp_path).size == (16, 16)


def test_check_refuses_burned_in_dicom_and_records_the_flag_in_its_report(tmp_path, capsys):
    write_dicom(tmp_path / "sc.dcm", PIXELS, sop_class=SecondaryCaptureImageStorage)
    data = llava_file(tmp_path, ["sc.dcm"])
    assert main(["data", "check", str(data)]) == 1
    assert "burned-in" in capsys.readouterr().out
    report = tmp_path / "report.json"
    assert main(["data", "check", str(data), "--allow-burned-in", "--report", str(report)]) == 0
    assert "1 image with possible burned-in annotation accepted (--allow-burned-in)" in capsys.readouterr().out
    written = json.loads(report.read_text())
    assert written["allow_burned_in"] is True and written["burned_in_accepted"] == 1


def test_materialise_refuses_burned_in_dicom_unless_allowed_and_says_so(tmp_path, capsys):
    write_dicom(tmp_path / "sc.dcm", PIXELS, burned_in="YES")
    data = llava_file(tmp_path, ["sc.dcm"])
    out = tmp_path / "out.jsonl"
    argv = ["data", "convert", "--to", "canonical", str(data), str(out), "--materialise", str(tmp_path / "png")]
    assert main(argv) == 2  # the one record is refused, so nothing usable is left
    assert "burned-in" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--allow-burned-in"]) == 0
    printed = capsys.readouterr().out
    assert "1 image with possible burned-in annotation accepted (--allow-burned-in)" in printed
    assert printed.strip().splitlines()[-1] == "1 read, 1 written, 0 skipped"


def test_materialised_files_are_named_by_content_not_by_the_source_name(tmp_path):
    (tmp_path / "a").mkdir()
    identifying = "Doe_Jane_MRN0012345.dcm"
    write_dicom(tmp_path / "a" / identifying, PIXELS)
    shutil.copy(tmp_path / "a" / identifying, tmp_path / "copy.dcm")
    first = materialise(ImageRef(f"a/{identifying}"), tmp_path, tmp_path / "png")
    second = materialise(ImageRef("copy.dcm"), tmp_path, tmp_path / "png")
    assert first == second  # same pixels, same file
    assert re.fullmatch(r"[0-9a-f]{32}\.png", first.path)
    assert [p.name for p in (tmp_path / "png").iterdir()] == [first.path]
    other = materialise(ImageRef("copy.dcm"), tmp_path, tmp_path / "png", window="lung")
    assert other != first  # another window is another image


def test_converted_dataset_names_no_source_file(tmp_path, capsys):
    write_dicom(tmp_path / "Doe_Jane.dcm", PIXELS)
    data = llava_file(tmp_path, ["Doe_Jane.dcm"])
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", "--to", "canonical", str(data), str(out), "--materialise",
                 str(tmp_path / "png")]) == 0
    (sample,) = read_records("canonical", out, tally=Tally())
    written = [p.name for p in (tmp_path / "png").iterdir()] + [sample.images[0].path]
    assert not any("Doe" in name for name in written)


@pytest.mark.parametrize("name", ["DOE_JOHN_1965.dcm", "DOE_JOHN_1965.nii.gz"])
def test_convert_copies_no_volume_file_name_unless_asked(name, tmp_path, capsys):
    """A DICOM or NIfTI file name can hold the patient's name: without --materialise, convert stops (naming the
    record, never the file); --keep-image-names copies the names as asked."""
    data = llava_file(tmp_path, ["scan.png", name])
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", "--from", "llava", "--to", "canonical", str(data), str(out)]) == 2
    err = capsys.readouterr().err
    assert "record 2 refers to a DICOM or NIfTI file by its name" in err and "DOE" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))
    assert main(["data", "convert", "--from", "llava", "--to", "canonical", str(data), str(out),
                 "--keep-image-names"]) == 0
    assert name in out.read_text()
