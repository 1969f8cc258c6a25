"""Mixtures: exact per-dataset counts, determinism, credential filter, GMAI-VL lists, resolvable image paths."""
import collections
import json
import math
from pathlib import Path

import pytest
import yaml

from medtune.cli import main
from medtune.data.jsonl import Tally, read_samples, write_samples
from medtune.data.mixture import RecipeError, load_mixture, manifest_path
from medtune.data.schema import ImageRef, Metadata, qa_sample
from medtune.paths import bundled_data, recipe_path


def _dataset(folder: Path, prefix: str, n: int, credentialed: int = 0) -> Path:
    """``n`` canonical samples with one real image file each under ``folder/images``."""
    (folder / "images").mkdir(parents=True)
    samples = []
    for i in range(n):
        (folder / "images" / f"{prefix}{i}.png").write_bytes(f"{prefix}{i}".encode())
        samples.append(qa_sample(f"{prefix}{i}", f"question {i}?", f"answer {i}", [ImageRef(f"{prefix}{i}.png")],
                                 meta=Metadata(credential=i < credentialed)))
    write_samples(folder / "data.jsonl", samples)
    return folder / "data.jsonl"


@pytest.fixture
def recipe(tmp_path):
    _dataset(tmp_path / "a", "a", 10)
    _dataset(tmp_path / "b", "b", 7)
    _dataset(tmp_path / "c", "c", 6, credentialed=2)
    data = {"seed": 3, "datasets": [
        {"name": "a", "path": "a/data.jsonl", "image_root": "a/images", "ratio": 0.5},
        {"name": "b", "path": "b/data.jsonl", "image_root": "b/images", "ratio": 2.5},
        {"name": "c", "path": "c/data.jsonl", "image_root": "c/images", "count": 3}]}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _ids(mixture, **kwargs):
    return [sample.id for sample, _ in mixture.iter_samples(**kwargs)]


def _source_counts(ids):
    return collections.Counter(i.split("#")[0] for i in ids)


def test_counts_follow_ratios_and_counts(recipe):
    mixture = load_mixture(recipe)
    assert mixture.available() == {"a": 10, "b": 7, "c": 4}          # 2 credentialed records are not usable
    ids = _ids(mixture)
    per_dataset = collections.Counter(i.split("/")[0] for i in ids)
    assert per_dataset == {"a": 5, "b": 18, "c": 3}                  # 0.5 x 10, round(2.5 x 7), count 3
    copies = _source_counts(i for i in ids if i.startswith("b/"))
    assert sorted(copies.values()) == [2, 2, 2, 3, 3, 3, 3]          # two whole copies + 4 drawn once more
    assert max(_source_counts(i for i in ids if not i.startswith("b/")).values()) == 1
    assert len(set(ids)) == len(ids)


def test_same_seed_same_order_other_seed_other_order(recipe):
    mixture = load_mixture(recipe)
    assert _ids(mixture) == _ids(load_mixture(recipe)) == _ids(mixture, seed=3)
    other = _ids(mixture, seed=4)
    assert other != _ids(mixture)
    assert collections.Counter(i.split("/")[0] for i in other) == {"a": 5, "b": 18, "c": 3}


@pytest.mark.parametrize("shuffle", ["interleave", "none"])
def test_streaming_orders_are_deterministic_and_lazy(recipe, shuffle):
    mixture = load_mixture(recipe)
    mixture.shuffle = shuffle
    assert _ids(mixture) == _ids(mixture) != _ids(mixture, seed=9)
    tally = Tally()
    stream = mixture.iter_samples(tally=tally)
    next(stream)
    assert tally.read < 10 + 7 + 6                                   # the first sample comes before all is read
    assert len(list(stream)) == 5 + 18 + 3 - 1 and tally.read == 10 + 7 + 6
    if shuffle == "none":
        firsts = [i.split("/")[0] for i in _ids(mixture)]
        assert firsts == sorted(firsts, key="abc".index)


def test_replacement_draws_independently(tmp_path):
    _dataset(tmp_path / "a", "a", 4)
    mixture = load_mixture({"datasets": [{"name": "a", "path": str(tmp_path / "a/data.jsonl"), "count": 50,
                                          "replacement": True}]})
    ids = _ids(mixture)
    assert len(ids) == 50 and len(set(ids)) == 50
    counts = _source_counts(ids)
    assert set(counts) <= {f"a/a{i}" for i in range(4)} and sum(counts.values()) == 50
    assert max(counts.values()) - min(counts.values()) > 1           # not whole copies


def test_credentialed_samples_are_skipped_and_counted_unless_included(recipe):
    mixture = load_mixture(recipe)
    tally = Tally()
    ids = _ids(mixture, tally=tally)
    assert not {"c/c0", "c/c1"} & set(ids)
    assert tally.skipped == {"credentialed (images not shipped)": 2}
    mixture.include_credentialed = True
    assert mixture.available()["c"] == 6


def test_mix_cli_writes_resolvable_paths_and_manifest(recipe, tmp_path, capsys):
    out = tmp_path / "out" / "mixed.jsonl"
    assert main(["data", "mix", str(recipe), str(out)]) == 0
    manifest = json.loads(manifest_path(out).read_text())
    root = Path(manifest["image_root"])
    assert root == tmp_path
    samples = list(read_samples(out))
    assert len(samples) == 26
    for sample in samples:
        name = sample.id.split("/")[1].split("#")[0]
        image = root / sample.images[0].path
        assert image.read_bytes() == name.encode()                  # the path still finds the sample's own image
    by_name = {d["name"]: d for d in manifest["datasets"]}
    assert {n: (d["requested"], d["written"]) for n, d in by_name.items()} == {"a": (5, 5), "b": (18, 18),
                                                                              "c": (3, 3)}
    assert by_name["b"]["image_prefix"] == "b/images" and manifest["seed"] == 3
    output = capsys.readouterr().out
    assert f"image root for {out}: {tmp_path}" in output
    assert output.strip().splitlines()[-1] == "23 read, 26 written, 2 skipped (2 credentialed (images not shipped))"


def test_medmax_credentialed_rows_follow_the_recipe(tmp_path):
    rows = [{"text": "<image> A chest film. No effusion.", "image_path": "a.png", "credential": "NO"},
            {"text": "<image> A CT. A mass.", "image_path": "b.png", "credential": "YES"},
            {"text": "Text only.", "credential": "NO"}]
    (tmp_path / "medmax.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = {"datasets": [{"name": "m", "path": str(tmp_path / "medmax.jsonl"), "format": "medmax"}]}
    tally = Tally()
    assert len(_ids(load_mixture(recipe), tally=tally)) == 2
    assert tally.skipped == {"credentialed (images not shipped)": 1}
    included = load_mixture({**recipe, "include_credentialed": True})
    credentialed = [s for s, _ in included.iter_samples() if s.meta.credential]
    assert len(credentialed) == 1 and credentialed[0].images[0].path == "b.png"


def _llava_records(prefix, n):
    return [{"id": f"{prefix}{i}", "image": f"{prefix}{i}.png",
             "conversations": [{"from": "human", "value": f"<image>\nDescribe {i}."},
                               {"from": "gpt", "value": f"Finding {i}."}]} for i in range(n)]


def test_gmai_vl_list_is_a_recipe(tmp_path, capsys):
    for prefix in ("ct", "xray"):
        (tmp_path / prefix).mkdir()
        for i in range(8):
            (tmp_path / prefix / f"{prefix}{i}.png").write_bytes(f"{prefix}{i}".encode())
    (tmp_path / "ct.json").write_text(json.dumps(_llava_records("ct", 8)))
    (tmp_path / "xray.jsonl").write_text("\n".join(json.dumps(r) for r in _llava_records("xray", 8)))
    listing = {"ct": {"image_dir": "ct", "annotations": "ct.json", "sample_ratio": 0.25, "length": 8,
                      "data_augment": False},
               "xray": {"image_dir": "xray", "annotations": "xray.jsonl", "sample_ratio": 1.5, "length": 9,
                        "data_augment": True}}
    (tmp_path / "list.json").write_text(json.dumps(listing))
    out = tmp_path / "gmai.jsonl"
    assert main(["data", "mix", str(tmp_path / "list.json"), str(out), "--seed", "1"]) == 0
    samples = list(read_samples(out))
    assert collections.Counter(s.id.split("/")[0] for s in samples) == {"ct": 2, "xray": 12}
    assert all((tmp_path / s.images[0].path).read_bytes().decode() == s.id.split("/")[1].split("#")[0]
               for s in samples)
    assert samples[0].messages[0].content[0].type == "image"
    assert "xray: 12 samples from 8 usable records (list says length 9)" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"shufle": True}, "unknown keys ['shufle']"),
    ({"datasets": [{"name": "a", "path": "a.jsonl", "ratio": 0.5, "count": 3}]}, "give ratio or count, not both"),
    ({"datasets": [{"name": "a", "path": "a.jsonl", "ratio": -1}]}, "ratio must be a number >= 0"),
    ({"datasets": [{"name": "a", "path": "a.jsonl"}, {"name": "a", "path": "b.jsonl"}]}, "repeated: ['a']"),
    ({"datasets": [{"name": "a", "path": "a.jsonl", "fromat": "llava"}]}, "dataset 'a' has unknown keys"),
])
def test_bad_recipes_name_the_file_and_the_problem(tmp_path, change, message):
    for name in ("a", "b"):  # datasets without a format: it is detected from their content
        write_samples(tmp_path / f"{name}.jsonl", [qa_sample("1", "Q?", "A")])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"datasets": [{"name": "a", "path": "a.jsonl"}], **change}))
    with pytest.raises(RecipeError, match=f"^{path}: .*") as error:
        load_mixture(path)
    assert message in str(error.value)


def test_bad_recipe_through_cli_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("datasets: [{name: a, path: missing.jsonl}]\n")
    assert main(["data", "mix", str(path), str(tmp_path / "o.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_image_paths_leaving_the_root_are_skipped(tmp_path):
    write_samples(tmp_path / "d.jsonl", [qa_sample("ok", "q?", "a", [ImageRef("x.png")]),
                                         qa_sample("up", "q?", "a", [ImageRef("../../etc/passwd")])])
    mixture = load_mixture({"datasets": [{"name": "d", "path": str(tmp_path / "d.jsonl")}]})
    tally = Tally()
    assert _ids(mixture, tally=tally) == ["d/ok"]
    assert tally.skipped == {"image path leaves the image root": 1}
    mixture.strict = True
    with pytest.raises(ValueError, match="'../../etc/passwd' leaves the image root"):
        _ids(mixture)


def test_example_recipe_runs_on_bundled_data(tmp_path):
    out = tmp_path / "example.jsonl"
    assert main(["data", "mix", str(recipe_path("mix-example")), str(out)]) == 0
    manifest = json.loads(manifest_path(out).read_text())
    counts = {d["name"]: (d["available"], d["written"]) for d in manifest["datasets"]}
    assert counts["vqa-rad"] == (3064, 2 * 3064)
    slake_bad = sum(manifest["tally"]["skipped"].values())   # the bundled SLAKE train has one empty answer
    assert counts["slake"] == (4919 - slake_bad, math.floor((4919 - slake_bad) * 0.5 + 0.5))
    assert Path(manifest["image_root"]) == bundled_data()
    vqa_rad = next(s for s in read_samples(out) if s.id.startswith("vqa-rad/"))
    assert (bundled_data() / vqa_rad.images[0].path).is_file()
