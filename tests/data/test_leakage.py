"""`medtune data leakage`: the known VQA-RAD leakage through the real CLI, cleaning, and each category's rule."""
import json
import re
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.data.jsonl import read_samples, write_samples
from medtune.data.leakage import ImageHasher, find_leakage, jaccard, question_tokens
from medtune.data.schema import ImageRef, Metadata, qa_sample
from medtune.paths import bundled_data

VQA_RAD = bundled_data("vqa_rad")
TRAIN, TEST = VQA_RAD / "trainset.json", VQA_RAD / "testset.json"


def _leakage(tmp_path, *args, name="report.json"):
    report = tmp_path / name
    assert main(["data", "leakage", *map(str, args), "--report", str(report)]) == 0
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def vqa_rad_run(tmp_path_factory):
    """One CLI run on the bundled MEVF split, with a cleaned training set."""
    tmp_path = tmp_path_factory.mktemp("leakage")
    clean = tmp_path / "train_clean.jsonl"
    report = _leakage(tmp_path, TRAIN, TEST, "--format", "vqa-rad", "--clean", clean)
    return report, clean, tmp_path


def test_vqa_rad_known_leakage(vqa_rad_run):
    report, _, _ = vqa_rad_run
    assert report["exact_pairs"]["count"] == 22
    assert report["rephrasings"]["frame_records"] == 1267
    assert report["rephrasings"]["count"] == 283
    assert report["images"] == {**report["images"], "test_images": 203, "test_images_in_train": 203}
    assert (report["train_records"], report["test_records"]) == (3064, 451)
    assert report["unreadable_images"] == {}          # images were compared by content, not by path


def test_vqa_rad_rephrasings_match_public_question_frames(vqa_rad_run):
    """Parity with the public JSON: train frames equal to a test question's question_frame and no train one's."""
    report, _, _ = vqa_rad_run
    public = json.loads((VQA_RAD / "VQA_RAD Dataset Public.json").read_text())

    def key(image, text, answer):
        return image, " ".join(text.casefold().split()), " ".join(str(answer).casefold().split())

    frames_of = {True: set(), False: set()}
    for record in public:
        if record["question_frame"] != "NULL":
            frames_of[record["phrase_type"].startswith("test")].add(
                key(record["image_name"], record["question_frame"], record["answer"]))
    expected = {str(r["qid"]) for r in json.loads(TRAIN.read_text()) if r["phrase_type"] == "frame"
                and key(r["image_name"], r["question"], r["answer"]) in frames_of[True] - frames_of[False]}
    assert {pair["train_id"] for pair in report["rephrasings"]["pairs"]} == expected


def test_vqa_rad_exact_pairs_are_identical_records(vqa_rad_run):
    report, _, _ = vqa_rad_run
    train = {str(r["qid"]): r for r in json.loads(TRAIN.read_text())}
    test = {str(r["qid"]): r for r in json.loads(TEST.read_text())}
    for pair in report["exact_pairs"]["pairs"]:
        a, b = train[pair["train_id"]], test[pair["test_id"]]
        assert a["image_name"] == b["image_name"]
        assert a["question"].strip().lower() == b["question"].strip().lower()
        assert str(a["answer"]).lower() == str(b["answer"]).lower()


def test_cleaned_training_set_has_no_exact_pair_or_rephrasing(vqa_rad_run):
    report, clean, tmp_path = vqa_rad_run
    removed = {p["train_id"] for p in report["exact_pairs"]["pairs"] + report["rephrasings"]["pairs"]}
    kept = [s.id for s in read_samples(clean)]
    assert len(kept) == 3064 - len(removed) and not removed & set(kept)
    assert report["cleaned"]["removed"] == len(removed)
    again = _leakage(tmp_path, clean, TEST, "--format-test", "vqa-rad", "--image-root", VQA_RAD / "images",
                     name="again.json")
    assert again["exact_pairs"]["count"] == 0
    assert again["rephrasings"]["count"] == 0
    frames = {str(r["qid"]) for r in json.loads(TRAIN.read_text()) if r["phrase_type"] == "frame"}
    assert again["rephrasings"]["frame_records"] == len(frames - removed)


def _write_image(path: Path, content: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path.name


def _sample(sample_id, image, question, answer, phrase_type=None):
    extra = {"phrase_type": phrase_type} if phrase_type else {}
    return qa_sample(sample_id, question, answer, [ImageRef(image)], meta=Metadata(extra=extra))


def test_images_compared_by_content_not_name(tmp_path):
    _write_image(tmp_path / "test" / "a.png", b"scan A")
    _write_image(tmp_path / "train" / "copy_of_a.png", b"scan A")
    _write_image(tmp_path / "train" / "a.png", b"another scan with the same name")
    test = [(_sample("t1", "a.png", "Is there a mass?", "yes"), tmp_path / "test")]
    train = [(_sample("r1", "copy_of_a.png", "is there a  MASS?", "Yes"), tmp_path / "train"),
             (_sample("r2", "a.png", "Is there a mass?", "yes"), tmp_path / "train")]
    report = find_leakage(train, test)
    assert [p["train_id"] for p in report.exact.values()] == ["r1"]
    assert (report.test_images_in_train, report.train_records_on_test_images) == (1, 1)


def test_a_log_gets_one_plain_progress_line_not_a_bar(tmp_path, capsys):
    image = _write_image(tmp_path / "x.png", b"x")
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_samples(train, [_sample(f"r{i}", image, f"Is there a mass in segment {i}?", "no") for i in range(3)])
    write_samples(test, [_sample("t", image, "Is there a mass?", "no")])
    assert main(["data", "leakage", str(train), str(test)]) == 0
    err = capsys.readouterr().err   # not a terminal, as in a log
    assert re.fullmatch(r"comparing: 3 training records in 0:\d\d \([\d.,]+ training records/s\)\n", err), err


def test_near_duplicates_follow_the_threshold(tmp_path):
    image = _write_image(tmp_path / "x.png", b"x")
    test = [(_sample("t", image, "Is there a mass in the liver?", "no"), tmp_path)]
    train = [(_sample("punct", image, "Is there a mass in the liver", "no"), tmp_path),       # Jaccard 1.0
             (_sample("close", image, "Is there a mass in the left liver?", "no"), tmp_path),  # 7/8
             (_sample("far", image, "What organ is this?", "liver"), tmp_path)]
    assert jaccard(question_tokens("Is there a mass in the left liver?"),
                   question_tokens("Is there a mass in the liver?")) == pytest.approx(7 / 8)
    ids = lambda report: sorted(p["train_id"] for p in report.near.values())
    assert ids(find_leakage(train, test, near_threshold=0.8)) == ["close", "punct"]
    assert ids(find_leakage(train, test, near_threshold=0.9)) == ["punct"]
    assert find_leakage(train, test).exact == {}


def test_frame_counts_only_when_no_training_source_yields_it(tmp_path):
    image = _write_image(tmp_path / "x.png", b"x")
    test = [(_sample("10", image, "Is the heart big?", "yes"), tmp_path)]
    train = [(_sample("11", image, "Is/Are the heart enlarged?", "yes", "frame"), tmp_path),   # source 10: test
             (_sample("20", image, "Heart size?", "yes"), tmp_path),
             (_sample("21", image, "Is/Are the heart enlarged?", "yes", "frame"), tmp_path),   # source 20: train
             (_sample("12", image, "Is/Are the lungs clear?", "yes", "frame"), tmp_path)]      # source 11: train
    report = find_leakage(train, test)
    assert report.rephrasing == {}
    assert report.rephrasing_also_from_training == [{"train_id": "11", "test_id": "10"}]
    report = find_leakage(train[:2], test)
    assert [p["train_id"] for p in report.rephrasing.values()] == ["11"]


def test_clean_can_also_remove_near_duplicates(tmp_path):
    image = _write_image(tmp_path / "x.png", b"x")
    write_samples(tmp_path / "test.jsonl", [_sample("t", image, "Is there a mass?", "no")])
    write_samples(tmp_path / "train.jsonl", [_sample("same", image, "Is there a mass?", "no"),
                                             _sample("near", image, "Is there a mass", "yes"),
                                             _sample("other", image, "What modality?", "CT")])
    clean = tmp_path / "clean.jsonl"
    _leakage(tmp_path, tmp_path / "train.jsonl", tmp_path / "test.jsonl", "--clean", clean)
    assert [s.id for s in read_samples(clean)] == ["near", "other"]
    _leakage(tmp_path, tmp_path / "train.jsonl", tmp_path / "test.jsonl", "--clean", clean,
             "--remove", "exact,near")
    assert [s.id for s in read_samples(clean)] == ["other"]


def test_unreadable_image_is_reported_not_fatal(tmp_path):
    test = [(_sample("t", "missing.png", "Q?", "a"), tmp_path)]
    hasher = ImageHasher()
    report = find_leakage([(_sample("r", "missing.png", "Q?", "a"), tmp_path)], test, hasher=hasher)
    assert list(hasher.unreadable) == [str(tmp_path / "missing.png")]
    assert len(report.exact) == 1   # compared by path instead


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["data", "leakage", str(tmp_path / "nope.jsonl"), str(TEST), "--format-test", "vqa-rad"]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "leakage", str(TRAIN), str(TEST), "--remove", "exact,images"])
    assert exit_info.value.code == 2
    assert "unknown categories ['images']" in capsys.readouterr().err
