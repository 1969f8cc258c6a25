"""The Arrow token cache: a second run reads the cache, keys change with what changes the rows."""
import copy
import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.data.jsonl import RecordError, read_samples, write_samples
from medtune.data.schema import ImageRef, Message, Part, Sample
from medtune.train.cache import CachedDataset, ImageMemo, cache_key, encode_checked, encode_with_cache


@pytest.fixture(autouse=True)
def own_memos(monkeypatch):
    """Each test starts with no image kept by the process (the memo is shared by every dataset of a process)."""
    monkeypatch.setattr(ImageMemo, "_shared", {})


@pytest.fixture(scope="module")
def vlm():
    from medtune.models import presets
    from medtune.models.build import build_vlm

    return build_vlm(presets.tiny_spec())


def _qa(sample_id, question, answer, images=()):
    user = tuple(Part.of_image(ImageRef(i)) for i in images) + (Part.of_text(question),)
    messages = [Message("user", user)] + ([Message("assistant", (Part.of_text(answer),))] if answer else [])
    return Sample(sample_id, messages)


@pytest.fixture
def data(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    path = tmp_path / "train.jsonl"
    write_samples(path, [_qa("1", "Is it normal?", "Yes.", ["x.png"]), _qa("2", "What is an effusion?", "Fluid."),
                         _qa("3", "Where?", "Left.", ["missing.png"]), _qa("4", "Unanswered?", None),
                         _qa("5", "Two views?", "Yes, both.", ["x.png", "x.png"])])
    return path


class CountingEncoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return encode_checked(*args, **kwargs)


def _run(path, vlm, cache_dir, encoder, **settings):
    settings = {"max_length": 128, **settings}
    return encode_with_cache(lambda: ((s, path.parent) for s in read_samples(path)), vlm, data_files=[path],
                             cache_dir=cache_dir, encoder=encoder, **settings)


def test_second_run_reads_the_cache(data, vlm, tmp_path):
    encoder = CountingEncoder()
    cold = _run(data, vlm, tmp_path / "cache", encoder)
    assert not cold.from_cache and encoder.calls == 5
    warm = _run(data, vlm, tmp_path / "cache", encoder)
    assert warm.from_cache and encoder.calls == 5  # nothing encoded the second time
    assert warm.key == cold.key
    assert warm.rows.to_list() == cold.rows.to_list()
    assert [r["id"] for r in warm.rows] == ["1", "2", "5"]
    # the skips of the cold run are reported again by the cached one
    for tally in (cold.tally, warm.tally):
        assert (tally.read, tally.written) == (5, 3)
        assert dict(tally.skipped) == {"bad image": 1, "no assistant reply": 1}
    assert warm.tally.summary() == cold.tally.summary()


def test_key_follows_content_and_settings(data, vlm, tmp_path):
    encoder = CountingEncoder()
    first = _run(data, vlm, tmp_path / "cache", encoder)
    copy = tmp_path / "copy" / "renamed.jsonl"
    copy.parent.mkdir()
    shutil.copy(data, copy)
    shutil.copy(data.parent / "x.png", copy.parent / "x.png")
    assert cache_key([copy], vlm, max_length=128, truncation="text") == first.key  # same bytes, same key
    assert _run(data, vlm, tmp_path / "cache", encoder, max_length=64).key != first.key
    assert _run(data, vlm, tmp_path / "cache", encoder, truncation="drop").key != first.key
    other_template = dataclasses.replace(vlm, template="chatml", tokenizer=_with_template(vlm.tokenizer, "chatml"))
    assert _run(data, other_template, tmp_path / "cache", encoder).key != first.key
    assert encoder.calls == 5 * 4
    with open(data, "a", encoding="utf-8") as handle:
        handle.write('{"id": "6", "messages": [{"role": "user", "content": "x"}, '
                     '{"role": "assistant", "content": "y"}]}\n')
    edited = _run(data, vlm, tmp_path / "cache", encoder)
    assert not edited.from_cache and len(edited.rows) == 4


def _with_template(tokenizer, name):
    import copy

    from medtune.models.templates import get_template

    changed = copy.deepcopy(tokenizer)
    changed.chat_template = get_template(name).jinja
    return changed


def test_cached_rows_decode_to_what_encode_sample_gives(data, vlm, tmp_path):
    cached = _run(data, vlm, tmp_path / "cache", CountingEncoder())
    dataset = CachedDataset(cached.rows, vlm)
    samples = {s.id: s for s in read_samples(data)}
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    for index, sample_id in enumerate(["1", "2", "5"]):
        expected = vlm.encode_sample(samples[sample_id], data.parent, max_length=128)
        item = dataset[index]
        assert item["input_ids"] == expected["input_ids"] and item["labels"] == expected["labels"]
        if expected["pixel_values"] is None:
            assert item["pixel_values"] is None
        else:
            assert torch.equal(item["pixel_values"], expected["pixel_values"])


def test_strict_stops_at_the_first_unusable_sample(data, vlm, tmp_path):
    with pytest.raises(RecordError, match=r"train.jsonl:3: bad image: .*missing.png"):
        _run(data, vlm, tmp_path / "cache", CountingEncoder(), strict=True)
    assert not any((tmp_path / "cache").glob("*/tally.json"))  # nothing half-built was left to trust


def test_the_image_memo_gives_the_same_pixels_and_decodes_each_image_once(data, vlm, tmp_path, monkeypatch):
    from medtune.models import processing

    cached = _run(data, vlm, tmp_path / "cache", CountingEncoder())
    plain = CachedDataset(cached.rows, vlm, memo_bytes=0)
    memo = CachedDataset(cached.rows, vlm)
    decoded = []
    real = processing.load_images
    monkeypatch.setattr(processing, "load_images", lambda refs, *a, **k: decoded.extend(refs) or real(refs, *a, **k))

    expected = [plain[i] for i in range(len(plain))]
    assert len(decoded) == 3                               # no memo: x.png once for sample 1, twice for sample 5
    decoded.clear()
    for _ in range(3):                                     # three epochs over the same rows
        for item, want in zip((memo[i] for i in range(len(memo))), expected):
            assert item["input_ids"] == want["input_ids"]
            if want["pixel_values"] is None:
                assert item["pixel_values"] is None
            else:
                assert torch.equal(item["pixel_values"], want["pixel_values"])
    assert [ref.path for ref in decoded] == ["x.png"]      # once, for sample 1; sample 5's two images reuse it
    assert (memo.memo.hits, memo.memo.misses, len(memo.memo.entries)) == (3 * 3 - 1, 1, 1)
    # returned pixels are not the kept tensor: a consumer writing into them changes nothing later
    memo[2]["pixel_values"].zero_()
    assert torch.equal(memo[2]["pixel_values"], expected[2]["pixel_values"])

    # an edited image file is decoded again (its size and modification time are part of the key)
    image = tmp_path / "x.png"
    Image.fromarray(np.full((24, 32, 3), 200, dtype=np.uint8)).save(image)
    decoded.clear()
    assert torch.equal(memo[0]["pixel_values"], plain[0]["pixel_values"])
    assert [ref.path for ref in decoded] == ["x.png", "x.png"]   # once via the memo, once without it


def test_the_image_memo_keeps_no_more_than_its_limit(data, vlm, tmp_path):
    cached = _run(data, vlm, tmp_path / "cache", CountingEncoder())
    one_image = CachedDataset(cached.rows, vlm, memo_bytes=0)[0]["pixel_values"][0]
    small = CachedDataset(cached.rows, vlm, memo_bytes=one_image.numel() * one_image.element_size() - 1)
    for _ in range(2):
        assert torch.equal(small[0]["pixel_values"][0], one_image)
    assert small.memo.entries == {} and small.memo.bytes == 0 and small.memo.misses == 2


def test_a_pass_decodes_each_image_file_once_and_still_skips_every_sample_of_a_broken_one(data, vlm, tmp_path,
                                                                                          monkeypatch):
    from medtune.models import processing

    write_samples(data, [*read_samples(data), _qa("6", "Again?", "Yes.", ["x.png"]),
                         _qa("7", "Still there?", "No.", ["missing.png"])])
    opened = []
    real = processing._load_image
    monkeypatch.setattr(processing, "_load_image", lambda ref, *args: opened.append(ref.path) or real(ref, *args))
    built = encode_with_cache(lambda: ((s, data.parent) for s in read_samples(data)), vlm, data_files=[data],
                              cache_dir=tmp_path / "cache", max_length=128)
    # x.png behind samples 1, 5 (twice) and 6 is decoded once; the missing file is tried for each of its samples
    assert sorted(opened) == ["missing.png", "missing.png", "x.png"]
    assert [row["id"] for row in built.rows] == ["1", "2", "5", "6"]
    assert dict(built.tally.skipped) == {"bad image": 2, "no assistant reply": 1}


def test_datasets_with_the_same_preprocessing_share_one_memo(data, vlm, tmp_path, monkeypatch):
    from medtune.models import processing

    cached = _run(data, vlm, tmp_path / "cache", CountingEncoder())
    decoded = []
    real = processing.load_images
    monkeypatch.setattr(processing, "load_images", lambda refs, *a, **k: decoded.extend(refs) or real(refs, *a, **k))
    first_stage, second_stage = CachedDataset(cached.rows, vlm), CachedDataset(cached.rows, vlm)
    assert torch.equal(first_stage[0]["pixel_values"], second_stage[0]["pixel_values"])
    assert [ref.path for ref in decoded] == ["x.png"] and first_stage.memo is second_stage.memo
    # other preprocessing (here another image size) keeps its own pixels
    processor = copy.deepcopy(vlm.image_processor)
    processor.size, processor.crop_size = {"shortest_edge": 16}, {"height": 16, "width": 16}
    resized = copy.copy(vlm)
    resized.image_processor = processor
    assert resized.image_processor.to_json_string() != vlm.image_processor.to_json_string()
    assert CachedDataset(cached.rows, resized).memo is not first_stage.memo


def test_a_mixture_stage_reads_its_mixture_and_detects_each_format_once(data, vlm, tmp_path, monkeypatch):
    from medtune.data import formats, mixture
    from medtune.train.data import stage_dataset
    from medtune.train.recipe import DataSpec

    (tmp_path / "mix.yaml").write_text(f"datasets:\n  - name: qa\n    path: {data}\n")
    calls = {"load_mixture": 0, "detect_format": 0}
    for module, name in ((mixture, "load_mixture"), (formats, "detect_format")):
        def counted(*args, _original=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    spec = DataSpec(mixture=str(tmp_path / "mix.yaml"))
    dataset, tally = stage_dataset(spec, vlm, max_length=128, seed=0, cache_dir=tmp_path / "cache", progress=False)
    assert calls == {"load_mixture": 1, "detect_format": 1}   # the cache key and the samples share one reading
    assert len(dataset) == 3 and (tally.read, tally.written) == (5, 3)
