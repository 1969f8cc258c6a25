"""`medtune tokenize-images` (medtune/models/tokenize_images.py): sharding, resume after a kill, unreadable images,
code range checks and MedMax's layouts, on a tiny random Chameleon saved to disk."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pq = pytest.importorskip("pyarrow.parquet")

from test_vq import random_images, tiny_chameleon  # noqa: E402

from medtune.cli import main  # noqa: E402
from medtune.data.images import ImageError, load_image  # noqa: E402
from medtune.data.shards import shard_of  # noqa: E402
from medtune.distributed import shard_from_env  # noqa: E402
from medtune.errors import UserError  # noqa: E402
from medtune.models import tokenize_images as ti  # noqa: E402
from medtune.models import vq  # noqa: E402
from medtune.models.vq import image_tokenizer  # noqa: E402

torch.set_num_threads(1)
BROKEN = "scans/broken.png"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "chameleon"
    tiny_chameleon().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return image_tokenizer(model_dir)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 samples over 10 images (RGB, RGBA, greyscale; one shared by two samples; two samples with two images),
    one text-only sample, one truncated PNG."""
    root = tmp_path_factory.mktemp("data")
    (root / "scans").mkdir()
    names = [f"scans/img{i}.png" for i in range(10)]
    for name, image in zip(names, random_images(10, seed=7)):
        image.save(root / name)
    (root / BROKEN).write_bytes((root / names[0]).read_bytes()[:80])
    images_of = [[names[i]] for i in range(10)] + [[names[3], names[4]], [names[5], BROKEN]]
    images_of[1] = [names[1], names[2]]
    samples = [_sample(f"s{i}", refs) for i, refs in enumerate(images_of)]
    samples.insert(4, {"id": "text-only", "messages": [{"role": "user", "content": "no image here"}]})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    return path


def _sample(sample_id, refs):
    content = [{"type": "image", "image": ref} for ref in refs] + [{"type": "text", "text": "what is shown?"}]
    return {"id": sample_id, "messages": [{"role": "user", "content": content}]}


def _references(dataset):
    """(id, image index, path) of every image reference, in input order."""
    rows = []
    for line in dataset.read_text().splitlines():
        sample = json.loads(line)
        refs = [part["image"] for m in sample["messages"] if isinstance(m["content"], list)
                for part in m["content"] if part["type"] == "image"]
        rows += [(sample["id"], index, ref) for index, ref in enumerate(refs)]
    return rows


@pytest.fixture(scope="module")
def reference_out(dataset, tokenizer, tmp_path_factory):
    """One uninterrupted, unsharded run: what every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "codes.parquet"
    result = ti.tokenize_images(dataset, out, tokenizer, batch_size=3, chunk_rows=4, progress=False)
    assert result.merged is not None and not ti.parts_dir(out).exists()
    return out


# --------------------------------------------------------------------------------------------- the output

def test_output_has_every_readable_reference_once_in_input_order_with_its_own_codes(dataset, tokenizer,
                                                                                     reference_out):
    table = pq.read_table(reference_out)
    assert table.schema.names == ["id", "image_index", "image", "codes"]
    readable = [row for row in _references(dataset) if row[2] != BROKEN]
    assert list(zip(*(table.column(c).to_pylist() for c in ("id", "image_index", "image")))) == readable
    for (sample_id, index, path), codes in zip(readable, table.column("codes").to_pylist()):
        expected = tokenizer.encode([load_image(path, dataset.parent)])[0].tolist()
        assert codes == expected and len(codes) == tokenizer.codes_per_image == 64


def test_two_shards_merged_equal_one_shard(dataset, tokenizer, reference_out, tmp_path):
    out = tmp_path / "codes.parquet"
    first = ti.tokenize_images(dataset, out, tokenizer, num_shards=2, shard_index=0, batch_size=2, progress=False)
    assert first.merged is None and "shard 1 of 2" in first.waiting and not out.exists()
    second = ti.tokenize_images(dataset, out, tokenizer, num_shards=2, shard_index=1, batch_size=5, progress=False)
    assert first.read > 0 and second.read > 0 and first.read + second.read == len(_references(dataset))
    assert second.merged is not None and second.merged.summary() == "15 images read, 14 tokenized, 1 skipped " \
                                                                    "(1 truncated or corrupt image data)"
    assert pq.read_table(out).equals(pq.read_table(reference_out))
    assert out.read_bytes() == reference_out.read_bytes()
    assert not ti.parts_dir(out).exists()


def test_shards_are_stable_hashes_of_the_sample_id_and_follow_torchrun(monkeypatch):
    ids = [f"sample-{i}" for i in range(200)]
    assignment = [shard_of(sample_id, 4) for sample_id in ids]
    assert assignment == [shard_of(sample_id, 4) for sample_id in ids] and set(assignment) == {0, 1, 2, 3}
    assert shard_of("synpic100132", 7) == 5  # the same number in every process (Python's hash() is salted)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert shard_from_env(1, 0) == (3, 2)


# ------------------------------------------------------------------------------------------------ resuming

_SLOW_CLI = """
import sys, time
import medtune.models.vq as vq
encode = vq.ImageTokenizer.encode_pixels
def slow(self, pixels):
    time.sleep(0.3)
    return encode(self, pixels)
vq.ImageTokenizer.encode_pixels = slow
from medtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _count_encoded_images(monkeypatch) -> list[int]:
    counts = []
    encode = vq.ImageTokenizer.encode_pixels

    def counting(self, pixels):
        counts.append(len(pixels))
        return encode(self, pixels)

    monkeypatch.setattr(vq.ImageTokenizer, "encode_pixels", counting)
    return counts


def test_a_killed_run_resumes_to_the_same_parquet_without_re_encoding(dataset, model_dir, reference_out, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "codes.parquet"
    script = tmp_path / "slow_cli.py"
    script.write_text(_SLOW_CLI)
    command = [sys.executable, str(script), "tokenize-images", str(dataset), str(out), "--model", str(model_dir),
               "--batch-size", "2", "--chunk-rows", "2", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    shard = ti.parts_dir(out) / "shard-00000-of-00001"
    deadline = time.monotonic() + 60
    while len(list(shard.glob("chunk-*.parquet"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()
    assert not out.exists()
    finished = {(r["id"], r["image_index"]) for chunk in shard.glob("chunk-*.parquet")
                for r in pq.read_table(chunk, columns=["id", "image_index"]).to_pylist()}
    assert 4 <= len(finished) < 14
    (shard / ".chunk-000002.parquet.x1y2.partial").write_bytes(b"PAR1 half a chunk")  # what a kill mid-write leaves

    counts = _count_encoded_images(monkeypatch)
    result = ti.tokenize_images(dataset, out, image_tokenizer(model_dir), batch_size=2, chunk_rows=2, progress=False)
    pending = {path for sample_id, index, path in _references(dataset)
               if (sample_id, index) not in finished and path != BROKEN}
    assert sum(counts) == result.encoded == len(pending)  # finished images are not encoded again
    assert result.resumed == len(finished) and result.tokenized == 14
    assert out.read_bytes() == reference_out.read_bytes()


def test_a_resumed_run_with_another_model_is_refused(dataset, tokenizer, tmp_path):
    out = tmp_path / "codes.parquet"
    ti.tokenize_images(dataset, out, tokenizer, num_shards=2, shard_index=0, progress=False)
    other = image_tokenizer(tiny_chameleon(seed=3))
    with pytest.raises(UserError, match="different tokenizer; .*delete .*codes.parquet.parts"):
        ti.tokenize_images(dataset, out, other, num_shards=2, shard_index=1, progress=False)
    with pytest.raises(UserError, match="different num_shards"):
        ti.tokenize_images(dataset, out, tokenizer, num_shards=3, shard_index=1, progress=False)
    with pytest.raises(UserError, match="shard 1 of 2 not finished"):
        ti.merge_parts(out)


# ----------------------------------------------------------------------------------------- bad images, codes

def test_an_unreadable_image_is_named_counted_and_left_out(dataset, model_dir, tmp_path, capsys):
    out = tmp_path / "codes.parquet"
    assert main(["tokenize-images", str(dataset), str(out), "--model", str(model_dir), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "15 images read, 14 tokenized, 1 skipped (1 truncated or corrupt image data)" in captured.out
    assert f"{dataset.parent / BROKEN} (sample 's11', image 1): truncated or corrupt image data" in captured.err
    assert BROKEN not in pq.read_table(out).column("image").to_pylist()

    strict = main(["tokenize-images", str(dataset), str(tmp_path / "strict.parquet"), "--model", str(model_dir),
                   "--device", "cpu", "--strict"])
    assert strict == 2 and "broken.png (sample 's11', image 1): truncated" in capsys.readouterr().err
    with pytest.raises(ImageError, match="broken.png"):
        ti.tokenize_images(dataset, tmp_path / "again.parquet", image_tokenizer(model_dir), strict=True,
                           progress=False)


def test_codes_outside_the_code_book_stop_the_run_naming_the_image(dataset, tokenizer, tmp_path, monkeypatch):
    original = type(tokenizer).encode_pixels

    def out_of_range(self, pixels):
        codes = original(self, pixels)
        codes[-1, 5] = self.codebook_size
        return codes

    monkeypatch.setattr(type(tokenizer), "encode_pixels", out_of_range)
    with pytest.raises(vq.CodeRangeError, match=r"scans/img2.png \(sample 's1', image 1\): image code 16 at \[5\] "
                                                r"is outside the code book \[0, 16\)"):
        ti.tokenize_images(dataset, tmp_path / "codes.parquet", tokenizer, batch_size=3, progress=False)


# --------------------------------------------------------------------------------------------- MedMax layouts

def test_medmax_layouts_round_trip_through_read_codes(dataset, tokenizer, reference_out, tmp_path):
    ours = ti.read_codes(reference_out)
    assert set(ours) == {(i, n) for i, n, path in _references(dataset) if path != BROKEN}
    medmax_out = tmp_path / "medmax.parquet"
    ti.tokenize_images(dataset, medmax_out, tokenizer, medmax=True, progress=False)
    table = pq.read_table(medmax_out)
    assert table.schema.names == ["img_path", "img_tokens"]
    assert str(table.schema.field("img_tokens").type) == "list<element: int64>"
    by_path = ti.read_codes(medmax_out)
    paths = table.column("img_path").to_pylist()
    assert len(paths) == len(set(paths)) == 10  # one row per distinct image, as MedMax's own files have
    assert all(by_path[path] == ours[(i, n)] for (i, n), path in
               {(k[0], k[1]): k[2] for k in _references(dataset) if k[2] != BROKEN}.items())

    jsonl = tmp_path / "medmax.jsonl"  # MedMax's training file: text with <image>, image_path, image_tokens
    jsonl.write_text("".join(json.dumps({"id": f"m{i}", "text": "<image> a scan", "image_path": path,
                                         "image_tokens": by_path[path], "credential": "NO"}) + "\n"
                             for i, path in enumerate(paths)))
    assert ti.read_codes(jsonl) == {(f"m{i}", 0): by_path[path] for i, path in enumerate(paths)}
    canonical = tmp_path / "canonical.jsonl"
    assert main(["data", "convert", "--from", "medmax", "--to", "canonical", str(jsonl), str(canonical)]) == 0
    assert ti.read_codes(canonical) == ti.read_codes(jsonl)


def test_a_folder_and_a_csv_give_the_same_codes_as_the_data_file(dataset, model_dir, reference_out, tmp_path):
    folder_out, csv_out = tmp_path / "folder.parquet", tmp_path / "csv.parquet"
    assert main(["tokenize-images", str(dataset.parent / "scans"), str(folder_out), "--model", str(model_dir),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    by_file = ti.read_codes(folder_out)
    assert sorted(key[0] for key in by_file) == sorted(f"img{i}.png" for i in range(10))  # ids = relative paths
    csv = tmp_path / "images.csv"
    csv.write_text("img_path\n" + "".join(f"scans/img{i}.png\n" for i in range(10)))
    assert main(["tokenize-images", str(csv), str(csv_out), "--model", str(model_dir), "--device", "cpu",
                 "--image-root", str(dataset.parent)]) == 0
    ours = ti.read_codes(reference_out)
    assert {key[0]: codes for key, codes in ti.read_codes(csv_out).items()} == \
        {f"scans/{name}": codes for (name, _), codes in by_file.items()}
    assert ti.read_codes(csv_out)[("scans/img0.png", 0)] == ours[("s0", 0)]


def test_a_merge_names_rows_a_lost_or_copied_chunk_leaves_missing_or_doubled(dataset, tokenizer, tmp_path):
    out = tmp_path / "codes.parquet"
    (ti.parts_dir(out)).mkdir(parents=True)
    (ti.parts_dir(out) / "merge.lock").touch()   # keep the last shard from merging: the test merges
    for index in range(2):
        ti.tokenize_images(dataset, out, tokenizer, num_shards=2, shard_index=index, batch_size=1, chunk_rows=3,
                           progress=False)
    chunks = sorted(ti.parts_dir(out).glob("shard-*/chunk-*.parquet"))
    lost = sorted(pq.read_table(chunks[0]).column("position").to_pylist())
    assert len(lost) == 3
    chunks[0].rename(chunks[0].with_suffix(".lost"))
    with pytest.raises(UserError) as missing:
        ti.merge_parts(out)
    assert str(missing.value) == (f"cannot merge {ti.parts_dir(out)}: {len(lost)} missing input row positions: "
                                  f"{', '.join(map(str, lost))}")
    chunks[0].with_suffix(".lost").rename(chunks[0])
    (chunks[-1].parent / "chunk-999999.parquet").write_bytes(chunks[0].read_bytes())   # a chunk copied over
    with pytest.raises(UserError, match=f"{len(lost)} duplicated input row positions: {lost[0]}"):
        ti.merge_parts(out)
    assert not out.exists()


def test_an_interrupted_merge_is_finished_by_merge_only(dataset, tokenizer, reference_out, tmp_path, capsys):
    out = tmp_path / "codes.parquet"
    assert main(["tokenize-images", "--merge", str(out)]) == 2
    assert "nothing to merge" in capsys.readouterr().err
    ti.tokenize_images(dataset, out, tokenizer, num_shards=2, shard_index=0, progress=False)
    (ti.parts_dir(out) / "merge.lock").touch()  # a merging shard was killed
    last = ti.tokenize_images(dataset, out, tokenizer, num_shards=2, shard_index=1, progress=False)
    assert last.merged is None and "merge was interrupted: run medtune tokenize-images --merge" in last.waiting
    assert main(["tokenize-images", "--merge", str(out)]) == 0
    assert "wrote 14 rows" in capsys.readouterr().out and out.read_bytes() == reference_out.read_bytes()
    assert main(["tokenize-images", str(dataset), str(out), "--model", "unused", "--device", "cpu"]) == 2
    assert "exists: delete it" in capsys.readouterr().err
    assert main(["tokenize-images", str(dataset), str(tmp_path / "x.parquet")]) == 2
    assert "needs INPUT, OUT and --model" in capsys.readouterr().err
