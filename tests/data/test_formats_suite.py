"""The benchmark-suite readers: each round-trips a fixture in its released layout (ids, answers, choices, image
count), is detected from content where content can tell, and keeps images late and safe (VLMEvalKit's base64)."""
import os
from pathlib import Path

import pytest
import suite_fixtures

from medtune.data.formats import default_image_root, detect_format, read_records
from medtune.data.images import ImageError, load_image
from medtune.data.jsonl import Tally

# Fixtures (by maker) whose content cannot name their format: a nested PathMMU object, GMAI-MMBench is a VLMEvalKit
# TSV, Quilt-VQA's answered JSON is LLaVA-Med VQA records. Its Parquet table is told by its columns.
DETECTED_AS = {"pathmmu": None, "gmai": "vlmevalkit", "quilt": "llava-med-vqa"}


@pytest.mark.parametrize("make", suite_fixtures.ALL, ids=lambda make: make.__name__)
def test_reader_round_trips_ids_answers_choices_and_images(make, tmp_path):
    fixture = make(tmp_path)
    tally = Tally()
    samples = list(read_records(fixture.format, fixture.path, tally=tally))
    got = {s.id: (s.meta.answer, s.meta.choices, len(s.images)) for s in samples}
    assert got == fixture.expected
    root = default_image_root(fixture.format, fixture.path)
    for sample in samples:
        for ref in sample.images:
            assert load_image(ref, root).size == (32, 32)  # every image resolves under the default root
        if sample.meta.answer_type == "mcq" and not sample.meta.extra.get("prompt_verbatim"):
            assert sample.meta.extra["question"] in sample.question and "A: " in sample.question


@pytest.mark.parametrize("make", suite_fixtures.ALL, ids=lambda make: make.__name__)
def test_detected_from_content(make, tmp_path):
    fixture = make(tmp_path)
    expected = DETECTED_AS.get(make.__name__, fixture.format)
    if expected is None:
        with pytest.raises(Exception, match="cannot tell its format"):
            detect_format(fixture.path)
    else:
        assert detect_format(fixture.path) == expected


def test_vlmevalkit_images_are_written_once_by_content_and_decoded_late_with_limits(tmp_path):
    fixture = suite_fixtures.vlmevalkit(tmp_path)
    samples = list(read_records("vlmevalkit", fixture.path, tally=Tally()))
    folder = fixture.path.parent / "Bench_VAL_images"
    assert len(list(folder.iterdir())) == 2  # row 2 refers to row 0's image
    assert samples[2].images == samples[0].images and samples[1].images != samples[0].images
    assert samples[1].meta.extra["question"].startswith("Hint: Axial CT\n")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(samples[0].images[0], fixture.path.parent, max_pixels=100)
    again = list(read_records("vlmevalkit", fixture.path, tally=Tally()))
    assert [s.images for s in again] == [s.images for s in samples] and len(list(folder.iterdir())) == 2


def test_vlmevalkit_bad_image_cell_is_counted_not_fatal(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\tA\tB\tanswer\timage\n1\tQ?\tx\ty\tA\t" + "!" * 100 + "\n"
                    "2\tQ?\tx\ty\tB\t9\n")
    tally = Tally()
    assert list(read_records("vlmevalkit", path, tally=tally, require_usable=False)) == []
    assert tally.bad_records == 2 and "neither base64" in str(tally.examples)


def test_medmax_eval_filters_one_task_and_sends_its_prompt_verbatim(tmp_path):
    from medtune.eval.tasks import get_task

    fixture = suite_fixtures.medmax_eval(tmp_path)
    tally = Tally()
    samples = list(read_records("medmax-eval", fixture.path, tally=tally, task_name="pmc_vqa", question_type="mcq"))
    assert [s.id for s in samples] == ["pmc_vqa-mcq-3"] and tally.skipped["another MedMax task"] == 3
    task = get_task("medmax-eval", data=fixture.path, task_name="pmc_vqa", question_type="mcq")
    assert task.prompt(samples[0]) == "Which modality?\nA: CT\nB: MRI\nC: X-ray\nD: PET"


def test_pathmmu_subset_option_and_mmmu_withheld_answers_are_counted(tmp_path):
    fixture = suite_fixtures.pathmmu(tmp_path)
    tally = Tally()
    assert [s.id for s in read_records("pathmmu", fixture.path, tally=tally, subset="Atlas", split="val")] == \
        ["Atlas_val-1"]
    assert tally.skipped["another PathMMU subset or split"] == 2
    mmmu = suite_fixtures.mmmu(tmp_path)
    everything = list(read_records("mmmu", mmmu.path, tally=Tally(), split=None))
    assert {s.id: s.meta.answer for s in everything}["test_Clinical_Medicine_4"] is None


REAL_FILES = {  # MEDTUNE_BENCHMARKS=<folder>: the released files, where a licence lets a person have them
    "quilt-vqa": "Quilt_VQA/quiltvqa_test_w_ans.json", "pathmmu": "PathMMU/data.json",
    "probmed": "ProbMed/probmed.json", "medxpertqa": "MedXpertQA/MM/test.jsonl",
    "gmai-mmbench": "LMUData/GMAI-MMBench_VAL.tsv", "medmax-eval": "medmax_eval_data/medmax_eval_data.jsonl",
    "mmmu": "MMMU/Clinical_Medicine/validation-00000-of-00001.parquet",
}


@pytest.mark.parametrize("fmt, relative", sorted(REAL_FILES.items()))
def test_real_release_reads_without_bad_records(fmt, relative):
    root = os.environ.get("MEDTUNE_BENCHMARKS")
    path = Path(root or "/nonexistent") / relative
    if not path.is_file():
        pytest.skip(f"{relative} not present (set MEDTUNE_BENCHMARKS to a folder holding the released files)")
    tally = Tally()
    count = sum(1 for _ in read_records(fmt, path, tally=tally))
    assert count > 0 and tally.bad_records == 0, tally.summary()
