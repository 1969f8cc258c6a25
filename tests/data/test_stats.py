import json
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.data.schema import ImageRef, Metadata, qa_sample
from medtune.data.jsonl import write_samples
from medtune.data.stats import collect, percentiles

REPO = Path(__file__).resolve().parents[2]


def test_nearest_rank_percentiles():
    values = list(range(1, 101))  # 1..100
    assert percentiles(values) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}
    assert percentiles([5, 1, 3]) == {"p50": 3, "p90": 5, "p99": 5, "max": 5}


def make_samples():
    samples = []
    for i in range(10):
        images = [ImageRef(f"{i}.png")] * (i % 3)
        meta = Metadata(source="a" if i < 7 else "b", modality="CT" if i % 2 else None, organ="lung",
                        answer_type="closed" if i < 4 else "open", split="train", credential=(i == 9))
        samples.append(qa_sample(f"s{i}", "q" * (i + 1), "yes" if i < 4 else "x" * 10 * i, images, meta))
    return samples


def test_counts_and_lengths_match_the_samples():
    stats = collect(make_samples()).to_dict()
    assert stats["samples"] == 10
    counts = stats["counts"]
    assert counts["source"] == {"a": 7, "b": 3}
    assert counts["modality"] == {"CT": 5, "(none)": 5}
    assert counts["answer_type"] == {"open": 6, "closed": 4}
    assert counts["credential"] == {"false": 9, "true": 1}
    assert counts["task"] == {"(none)": 10}
    assert stats["images_per_sample"] == {0: 4, 1: 3, 2: 3}
    assert stats["turns_per_sample"] == {2: 10}
    assert stats["text_length_chars"]["question"] == {"p50": 5, "p90": 9, "p99": 10, "max": 10}
    # answers: "yes" x4 (3 chars), then 40, 50, ..., 90 characters
    assert stats["text_length_chars"]["answer"] == {"p50": 40, "p90": 80, "p99": 90, "max": 90}
    assert stats["text_length_chars"]["sample"]["max"] == 10 + 90


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_samples(data, make_samples())
    with open(data, "a") as handle:
        handle.write("{broken\n")
    out_json = tmp_path / "stats.json"
    assert main(["data", "stats", str(data), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    assert saved["counts"]["source"] == {"a": 7, "b": 3}
    assert saved["images_per_sample"] == {"0": 4, "1": 3, "2": 3}
    assert "task: not set in any sample" in out
    assert "  a                    7   70.0%" in out
    assert "text length (characters)" in out
    assert out.strip().splitlines()[-1] == "11 read, 0 written, 1 skipped (1 not valid JSON)"


def test_bundled_vqa_rad_test_split():
    testset = REPO / "data" / "vqa_rad" / "testset.json"
    if not testset.is_file():
        pytest.skip("bundled VQA-RAD absent")
    from medtune.data.formats import read_records
    from medtune.data.jsonl import Tally

    stats = collect(read_records("vqa-rad", testset, tally=Tally())).to_dict()
    assert stats["samples"] == 451
    assert stats["counts"]["answer_type"] == {"closed": 272, "open": 179}  # the published split
    assert stats["images_per_sample"] == {1: 451}
