"""The Hugging Face Parquet releases (MMMU, Quilt-VQA, MedMax's evaluation set): images written once by content
hash and decoded late, rows streamed, detection from the columns, and clear lines for what cannot be read."""
import sys

import pytest
import suite_fixtures

from medtune.data.files import readable_text_file
from medtune.data.formats import detect_format, parquet, read_records
from medtune.data.images import ImageError, load_image
from medtune.data.jsonl import Tally
from medtune.errors import InputFileError


def test_images_are_written_once_by_content_and_decoded_late_with_limits(tmp_path):
    fixture = suite_fixtures.mmmu_parquet(tmp_path)
    samples = list(read_records("mmmu", fixture.path, tally=Tally()))
    folder = fixture.path.parent / "validation-00000-of-00001_images"
    written = sorted(folder.iterdir())
    assert len(written) == 3 and all(f.suffix == ".png" for f in written)  # four images, one picture shared
    assert samples[0].images[0] == samples[1].images[0] != samples[0].images[1]
    assert (fixture.path.parent / samples[0].images[0].path).read_bytes() == suite_fixtures.png_bytes(11)  # unchanged
    with pytest.raises(ImageError, match="over the limit"):
        load_image(samples[0].images[0], fixture.path.parent, max_pixels=100)
    again = list(read_records("mmmu", fixture.path, tally=Tally()))
    assert [s.images for s in again] == [s.images for s in samples] and sorted(folder.iterdir()) == written


def test_rows_are_streamed_in_batches_never_read_whole(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    fixture = suite_fixtures.quilt_parquet(tmp_path)  # two row groups
    def whole_file(*args, **kwargs):
        raise AssertionError("the whole file was read")
    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    monkeypatch.setattr(parquet, "BATCH_ROWS", 1)
    ids = [s.id for s in read_records("quilt-vqa", fixture.path, tally=Tally())]
    assert ids == ["quilt_vqa-1", "quilt_vqa-2", "quilt_vqa-3"]


def test_columns_name_the_format_or_the_candidates(tmp_path):
    both = suite_fixtures.write_parquet(tmp_path / "both.parquet", {
        "id": ["validation_Pharmacy_1"], "question": ["Q?"], "options": ["['a', 'b']"], "answer": ["A"],
        "image_1": [None], "task_name": ["vqa_rad"], "question_type": ["closed"], "prompt": ["Q?"]})
    with pytest.raises(InputFileError, match=r"columns fit several formats equally \(medmax-eval, mmmu\)"):
        detect_format(both)
    neither = suite_fixtures.write_parquet(tmp_path / "neither.parquet", {"text": ["hello"]})
    with pytest.raises(InputFileError, match=r"columns \['text'\] fit none of"):
        detect_format(neither)


def test_a_bad_image_cell_costs_its_row_only(tmp_path, monkeypatch):
    from medtune.data.formats import embedded_images

    fixture = suite_fixtures.quilt_parquet(tmp_path)  # rows 1 and 3 share one picture, row 2 has its own
    shared, own = len(suite_fixtures.png_bytes(33)), len(suite_fixtures.png_bytes(99))
    assert shared != own
    monkeypatch.setattr(embedded_images, "MAX_IMAGE_BYTES", min(shared, own))
    tally = Tally()
    ids = [s.id for s in read_records("quilt-vqa", fixture.path, tally=tally)]
    assert ids == (["quilt_vqa-2"] if shared > own else ["quilt_vqa-1", "quilt_vqa-3"])
    assert tally.bad_records == 3 - len(ids) and "over the limit" in str(tally.examples)


def test_parquet_is_refused_where_no_reader_takes_it(tmp_path, monkeypatch):
    fixture = suite_fixtures.mmmu_parquet(tmp_path)
    with pytest.raises(InputFileError, match="does not read .*Parquet is read by: quilt-vqa, mmmu, medmax-eval"):
        list(read_records("probmed", fixture.path, tally=Tally()))
    with pytest.raises(InputFileError, match="a Parquet file, not a recipe"):
        readable_text_file(fixture.path, "recipe (YAML)")
    with pytest.raises(InputFileError, match="a Parquet file, not a task data file"):
        readable_text_file(fixture.path, "task data file")   # only where the caller reads Parquet
    assert readable_text_file(fixture.path, "task data file", parquet=True) == fixture.path  # the eval CLI's check
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputFileError, match="needs pyarrow: pip install pyarrow"):
        list(read_records("mmmu", fixture.path, tally=Tally()))


def test_rlaif_v_rows_become_preference_pairs_with_their_images_written_once(tmp_path):
    """RLAIF-V's release columns (image as a datasets Image, question, chosen, rejected ...): detected from the
    columns, each row a pair whose rejected reply sits beside the chosen one; a row that prefers nothing is
    counted, not kept."""
    path = suite_fixtures.write_parquet(tmp_path / "RLAIF-V-Dataset_000.parquet", {
        "ds_name": ["RLAIF-V"] * 3, "image": [suite_fixtures.image_cell(suite_fixtures.png_bytes(11), "a.jpg"),
                                              suite_fixtures.image_cell(suite_fixtures.png_bytes(11), "a.jpg"),
                                              suite_fixtures.image_cell(suite_fixtures.png_bytes(50), "b.jpg")],
        "question": ["What is shown?", "Any fracture?", "Describe it."],
        "chosen": ["A chest X-ray.", "No.", "Same."], "rejected": ["A cat.", "Yes, two.", "Same."],
        "origin_dataset": ["x"] * 3, "origin_split": ['{"model": "m"}'] * 3, "idx": ["r1", "r2", "r3"],
        "image_path": ["a.jpg", "a.jpg", "b.jpg"]}, image_columns=("image",))
    assert detect_format(path) == "rlaif-v"
    tally = Tally()
    pairs = list(read_records("rlaif-v", path, tally=tally))
    assert [p.id for p in pairs] == ["r1", "r2"] and tally.skipped and "prefers nothing" in tally.details()[0]
    assert [(p.messages[-1].text, p.rejected.text) for p in pairs] == [("A chest X-ray.", "A cat."), ("No.", "Yes, two.")]
    assert pairs[0].question == "What is shown?" and pairs[0].images == pairs[1].images
    assert (path.parent / pairs[0].images[0].path).read_bytes() == suite_fixtures.png_bytes(11)
    assert pairs[0].meta.extra["origin_split"] == '{"model": "m"}'
