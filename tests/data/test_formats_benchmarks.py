"""Benchmark readers on the real files (bundled VQA-RAD and SLAKE; PathVQA from ../shared when present), checked
field by field against the raw JSON, and lossless canonical -> llava / messages -> canonical round trips."""
import json
from pathlib import Path

import pytest

from medtune.data.formats import default_image_root, read_records, write_records
from medtune.data.jsonl import Tally
from medtune.paths import bundled_data

PATHVQA = Path("/work/shared/data/pathvqa")
needs_pathvqa = pytest.mark.skipif(not (PATHVQA / "test_slice.json").is_file(),
                                   reason="PathVQA slice not present (../shared/data/pathvqa)")

BUNDLED = [
    ("vqa-rad", bundled_data("vqa_rad", "trainset.json")),
    ("vqa-rad", bundled_data("vqa_rad", "testset.json")),
    ("vqa-rad", bundled_data("vqa_rad", "VQA_RAD Dataset Public.json")),
    ("slake", bundled_data("slake", "train_en.json")),
    ("slake", bundled_data("slake", "validate_en.json")),
    ("slake", bundled_data("slake", "test_en.json")),
    pytest.param("pathvqa", PATHVQA / "test_slice.json", marks=needs_pathvqa),
    pytest.param("pathvqa", PATHVQA / "train_slice.json", marks=needs_pathvqa),
]


def read_all(fmt, path, **options):
    tally = Tally()
    return list(read_records(fmt, path, tally=tally, **options)), tally


def raw(path):
    return json.loads(Path(path).read_text())


def test_vqa_rad_mevf_test_split_matches_the_raw_file():
    path = bundled_data("vqa_rad", "testset.json")
    samples, tally = read_all("vqa-rad", path)
    assert tally.summary() == "451 read, 0 written, 0 skipped"
    assert sum(s.meta.answer_type == "closed" for s in samples) == 272
    assert sum(s.meta.answer_type == "open" for s in samples) == 179
    for sample, record in zip(samples, raw(path), strict=True):
        assert sample.id == str(record["qid"])
        assert (sample.question, sample.meta.answer) == (record["question"], str(record["answer"]))
        assert [i.path for i in sample.images] == [record["image_name"]]
        assert (sample.meta.organ, sample.meta.split, sample.meta.source) == (record["image_organ"], "test", "vqa-rad")
        assert sample.meta.extra == {"question_type": record["question_type"], "phrase_type": record["phrase_type"]}
        assert (path.parent / "images" / record["image_name"]).is_file()
    assert default_image_root("vqa-rad", path) == path.parent / "images"


def test_vqa_rad_closed_with_a_trailing_space_normalises():
    path = bundled_data("vqa_rad", "trainset.json")
    samples, _ = read_all("vqa-rad", path)
    spaced = {str(r["qid"]) for r in raw(path) if r["answer_type"] == "CLOSED "}
    assert len(spaced) == 2
    assert {s.id: s.meta.answer_type for s in samples if s.id in spaced} == dict.fromkeys(spaced, "closed")
    assert {s.meta.answer_type for s in samples} == {"open", "closed"}


def test_vqa_rad_public_json_split_agrees_with_the_mevf_test_file():
    public, tally = read_all("vqa-rad", bundled_data("vqa_rad", "VQA_RAD Dataset Public.json"))
    mevf_test, _ = read_all("vqa-rad", bundled_data("vqa_rad", "testset.json"))
    assert tally.n_skipped == 0 and len({s.id for s in public}) == len(public)

    def triples(samples):
        return sorted((s.images[0].path, s.question, s.meta.answer.lower()) for s in samples)

    public_test = [s for s in public if s.meta.split == "test"]
    assert triples(public_test) == triples(mevf_test)
    assert all(s.meta.extra["phrase_type"].startswith("test_") for s in public_test)
    assert "qid_linked_id" in public[0].meta.extra and "image_case_url" in public[0].meta.extra


@pytest.mark.parametrize("name, split", [("train_en.json", "train"), ("validate_en.json", "validation"),
                                         ("test_en.json", "test")])
def test_slake_fields_and_split(name, split):
    path = bundled_data("slake", name)
    samples, tally = read_all("slake", path)
    by_id = {s.id: s for s in samples}
    records = raw(path)
    empty = [i for i, r in enumerate(records) if r["answer"] == ""]
    assert len(samples) == len(records) - len(empty) and tally.n_skipped == len(empty)
    for index in empty:  # SLAKE train has an empty answer: skipped with its location, not dropped silently
        location = f"{path}:[{index}] (id {records[index]['qid']}): empty field 'answer'"
        assert location in "\n".join(tally.details())
    for record in records:
        if record["answer"] == "":
            continue
        sample = by_id[str(record["qid"])]
        assert (sample.meta.modality, sample.meta.organ, sample.meta.split) == (record["modality"], record["location"], split)
        assert sample.meta.answer_type == record["answer_type"].strip().lower()
        assert sample.meta.extra["content_type"] == record["content_type"]
        assert sample.images[0].path == record["img_name"]


@needs_pathvqa
def test_pathvqa_closed_is_a_yes_no_answer_when_the_file_has_no_answer_type(tmp_path):
    records = raw(PATHVQA / "test_slice.json")
    stripped = tmp_path / "test.json"
    stripped.write_text(json.dumps([{k: v for k, v in r.items() if k != "answer_type"} for r in records]))
    samples, _ = read_all("pathvqa", stripped)
    assert [s.id for s in samples] == [r["qid"] for r in records]
    assert [s.meta.answer_type for s in samples] == [r["answer_type"].lower() for r in records]
    assert {s.meta.split for s in samples} == {"test"}
    assert default_image_root("pathvqa", PATHVQA / "test_slice.json") == PATHVQA / "images"


@pytest.mark.parametrize("fmt, path", BUNDLED)
def test_canonical_llava_canonical_round_trip_is_lossless(fmt, path, tmp_path):
    samples, _ = read_all(fmt, path)
    write_records("canonical", tmp_path / "a.jsonl", samples, tally=Tally())
    canonical, _ = read_all("canonical", tmp_path / "a.jsonl")
    write_records("llava", tmp_path / "b.json", canonical, tally=Tally())
    via_llava, tally = read_all("llava", tmp_path / "b.json")
    write_records("canonical", tmp_path / "c.jsonl", via_llava, tally=Tally())
    assert tally.n_skipped == 0 and tally.notes == []
    assert via_llava == samples
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


@pytest.mark.parametrize("fmt, path", BUNDLED)
def test_canonical_messages_canonical_round_trip_is_lossless(fmt, path, tmp_path):
    samples, _ = read_all(fmt, path)
    write_records("messages", tmp_path / "m.jsonl", samples, tally=Tally())
    again, tally = read_all("messages", tmp_path / "m.jsonl")
    assert tally.n_skipped == 0 and again == samples


def test_split_option_overrides_file_name_and_phrase_type():
    public, _ = read_all("vqa-rad", bundled_data("vqa_rad", "VQA_RAD Dataset Public.json"), split="validation")
    slake, _ = read_all("slake", bundled_data("slake", "test_en.json"), split="train")
    assert {s.meta.split for s in public} == {"validation"} and {s.meta.split for s in slake} == {"train"}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_writes_a_list_or_json_lines_by_suffix(suffix, tmp_path):
    samples, _ = read_all("vqa-rad", bundled_data("vqa_rad", "testset.json"))
    out = tmp_path / f"test{suffix}"
    write_records("llava", out, samples, tally=Tally())
    text = out.read_text()
    records = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in records] == [s.id for s in samples]
    assert all(r["image"] == s.images[0].path and r["conversations"][0]["value"].startswith("<image>\n")
               for r, s in zip(records, samples))
