"""Format readers and writers on realistic records (fixtures/formats), the registry and the streaming parser."""
import csv
import json
from pathlib import Path

import pytest

from medtune.data.formats import FORMATS, default_image_root, read_records, write_records
from medtune.data.formats import records as records_module
from medtune.data.jsonl import RecordError, Tally
from medtune.data.schema import ImageRef, Message, Metadata, Part, Sample, qa_sample

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def read(fmt, path, **options):
    tally = Tally()
    samples = {s.id: s for s in read_records(fmt, path, tally=tally, **options)}
    return samples, tally


def parts(message):
    return [("image", p.image.path) if p.type == "image" else ("text", p.text) for p in message.content]


# ------------------------------------------------------------------------------------------------ llava

def test_llava_placeholders_images_and_speakers():
    samples, tally = read("llava", FIXTURES / "llava_med_instruct.json")
    first = samples["PMC-1"]
    assert [m.role for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert parts(first.messages[0]) == [("text", "What does the chest X-ray show?"), ("image", "fig1.jpg")]
    assert first.meta.extra == {"domain": {"chest_xray": True}}
    two_images = samples["PMC-3"]
    assert [m.role for m in two_images.messages] == ["system", "user", "assistant"]
    assert parts(two_images.messages[1]) == [("image", "ct_a.png"), ("text", "Before treatment."),
                                             ("image", "ct_b.png"), ("text", "After treatment. What changed?")]
    # An image with no placeholder goes in front of the first user turn.
    assert parts(samples["PMC-4"].messages[0]) == [("image", "fig4.jpg"), ("text", "Which organ is shown?")]


def test_llava_drops_and_counts_leading_assistant_turns():
    samples, tally = read("llava", FIXTURES / "llava_med_instruct.json")
    greeting_dropped = samples["PMC-2"]
    assert [m.role for m in greeting_dropped.messages] == ["user", "assistant"]
    assert greeting_dropped.question == "Describe the staining."
    assert any(note.startswith("1 leading assistant turns dropped") for note in tally.notes)


def test_llava_bad_records_are_skipped_with_their_reason():
    path = FIXTURES / "llava_med_instruct.json"
    samples, tally = read("llava", path)
    assert "PMC-5" not in samples and "PMC-6" not in samples
    assert tally.read == 6 and tally.n_skipped == 2
    details = "\n".join(tally.details())
    assert (f"{path}:[4] (id PMC-5): <image> placeholders do not match images: 2 placeholder(s) in the text, "
            "1 image(s) listed") in details
    assert f"{path}:[5] (id PMC-6): unknown speaker 'doctor'" in details
    with pytest.raises(RecordError, match=r"llava_med_instruct.json:\[4\] \(id PMC-5\): <image> placeholders do not"):
        list(read_records("llava", path, tally=Tally(), strict=True))


def test_llava_carries_meta_and_volume_references(tmp_path):
    sample = Sample("s1", [
        Message("system", (Part.of_text("Be brief."),)),
        Message("user", (Part.of_image(ImageRef("ct/a.dcm", frame=3)), Part.of_text("\nLeading newline kept"),
                         Part.of_image(ImageRef("mr/b.nii.gz", axis="coronal", slice=12)))),
        Message("assistant", (Part.of_text("Both normal.\n"),)),
    ], Metadata(source="x", answer_type="CLOSED ", choices=["yes", "no"], credential=True, extra={"k": [1]}))
    out = tmp_path / "out.json"
    tally = Tally()
    write_records("llava", out, [sample], tally=tally)
    written = json.loads(out.read_text())  # a plain JSON list, as LLaVA's loader wants
    assert written[0]["image"] == [{"path": "ct/a.dcm", "frame": 3},
                                   {"path": "mr/b.nii.gz", "axis": "coronal", "slice": 12}]
    assert written[0]["conversations"][1]["value"].count("<image>") == 2
    again, _ = read("llava", out)
    assert again["s1"] == sample


def test_writers_skip_text_with_a_literal_placeholder(tmp_path):
    bad = qa_sample("bad", "What does <image> mean in LLaVA files?", "a placeholder")
    good = qa_sample("good", "q?", "a", images=[ImageRef("x.png")])
    for fmt in ("llava", "messages", "medmax"):
        tally = Tally()
        write_records(fmt, tmp_path / f"{fmt}.jsonl", [bad, good], tally=tally)
        assert tally.written == 1 and tally.n_skipped == 1
        assert "sample bad: text contains a literal <image>" in tally.details()[0]


# --------------------------------------------------------------------------------------------- messages

def test_messages_reads_sharegpt_and_openai_shapes():
    path = FIXTURES / "messages_sharegpt.jsonl"
    samples, tally = read("messages", path)
    first = samples["messages_sharegpt-1"]  # no id: file stem + line
    assert parts(first.messages[0]) == [("image", "imgs/xmlab102.jpg"),
                                        ("text", "What diseases are included in the picture?")]
    openai = samples["oa-2"]
    assert [m.role for m in openai.messages] == ["system", "user", "assistant"]
    assert parts(openai.messages[1]) == [("image", "scans/ct_01.png"), ("text", "Which plane is this?")]
    slots = samples["oa-3"]
    assert parts(slots.messages[0]) == [("image", "a.png"), ("image", "b.png"), ("text", "Same patient?")]
    assert slots.messages[1].role == "assistant" and slots.messages[1].text == "Yes."


def test_messages_bad_records_name_line_and_reason():
    path = FIXTURES / "messages_sharegpt.jsonl"
    samples, tally = read("messages", path)
    assert tally.read == 7 and tally.n_skipped == 4 and set(samples) == {"messages_sharegpt-1", "oa-2", "oa-3"}
    details = "\n".join(tally.details())
    assert f"{path}:4 (id oa-4): image 'https://example.org/x.png' is a URL or inline data" in details
    assert f"{path}:5 (id oa-5): unknown content part type 'audio'" in details
    assert f"{path}:6 (id oa-6): <image> placeholders do not match images: 1 placeholder(s) in the text, 2 image(s)" in details
    assert f"{path}:7: not valid JSON" in details


def test_messages_round_trip_is_lossless(tmp_path):
    samples, _ = read("messages", FIXTURES / "messages_sharegpt.jsonl")
    llava_samples, _ = read("llava", FIXTURES / "llava_med_instruct.json")
    originals = list(samples.values()) + list(llava_samples.values())
    write_records("messages", tmp_path / "m.jsonl", originals, tally=Tally())
    again = list(read_records("messages", tmp_path / "m.jsonl", tally=Tally()))
    assert again == originals


# ----------------------------------------------------------------------------------------------- medmax

def test_medmax_skips_and_counts_credentialed_rows():
    path = FIXTURES / "medmax.jsonl"
    samples, tally = read("medmax", path)
    assert set(samples) == {"medmax-1", "medmax-3"}
    assert tally.skipped["credentialed (images not shipped)"] == 2
    assert tally.examples["credentialed (images not shipped)"] == f"{path}:2"
    vqa = samples["medmax-1"]
    assert [m.role for m in vqa.messages] == ["assistant"]  # the whole sequence is trained on, as MedMax does
    assert parts(vqa.messages[0]) == [("image", "medmax/img_001.png"), (
        "text", "What abnormality is seen in this chest X-ray? The image shows a left pneumothorax.")]
    assert (vqa.meta.source, vqa.meta.task, vqa.meta.credential) == ("pmc_vqa", "VQA", False)
    assert vqa.meta.extra["image_tokens"] == [12, 4077, 8191]
    assert "<image> placeholders do not match images: 2 placeholder(s)" in "\n".join(tally.details())


def test_medmax_includes_credentialed_rows_when_asked():
    samples, tally = read("medmax", FIXTURES / "medmax.jsonl", include_credentialed=True)
    generated = samples["medmax-2"]
    assert generated.meta.credential is True
    assert parts(generated.messages[0]) == [("text", "Generate a chest X-ray with cardiomegaly. "),
                                            ("image", "medmax/gen_002.png")]
    assert "credentialed (images not shipped)" not in tally.skipped
    assert "medmax.jsonl:4: credentialed row has no image_path" in "\n".join(tally.details())


def test_medmax_round_trip_keeps_text_and_tokens(tmp_path):
    samples, _ = read("medmax", FIXTURES / "medmax.jsonl")
    write_records("medmax", tmp_path / "m.jsonl", samples.values(), tally=Tally())
    source = {i: json.loads(line) for i, line in enumerate((FIXTURES / "medmax.jsonl").read_text().splitlines(), 1)}
    written = {r["id"]: r for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())}
    for sample_id, record in written.items():
        original = source[int(sample_id.split("-")[1])]
        for key in ("text", "source", "task", "image_tokens"):
            assert record.get(key) == original.get(key)
        assert record["credential"] == original["credential"].upper()


# ---------------------------------------------------------------------------------------------- pmc-vqa

def test_pmc_vqa_choices_and_answer_letter():
    path = FIXTURES / "pmc_vqa.csv"
    samples, tally = read("pmc-vqa", path)
    rows = list(csv.DictReader(path.open()))
    first = samples["0"]
    assert first.meta.answer_type == "mcq"
    assert first.meta.choices == ["Diffuse uptake pattern", "Focal uptake pattern", "No uptake pattern",
                                  "Cannot determine from the information given"]
    assert first.meta.answer == rows[0]["Answer"] and first.meta.extra["answer_label"] == "B"
    assert first.question.startswith(rows[0]["Question"] + "\nA: Diffuse uptake pattern\nB: ")
    assert first.meta.extra["Caption"] == rows[0]["Caption"] and first.images[0].path == rows[0]["Figure_path"]
    assert samples["1"].meta.answer == "Kidney" and samples["1"].meta.extra["answer_label"] == "C"
    assert samples["2"].meta.extra["answer_label"] == "B" and samples["2"].meta.choices[0] == "CT"
    assert "3" not in samples
    assert f"{path}:5 (id 3): answer matches no choice" in "\n".join(tally.details())


def test_pmc_vqa_json_reads_like_csv(tmp_path):
    rows = list(csv.DictReader((FIXTURES / "pmc_vqa.csv").open()))
    (tmp_path / "pmc_vqa.json").write_text(json.dumps(rows))
    from_csv, _ = read("pmc-vqa", FIXTURES / "pmc_vqa.csv")
    from_json, _ = read("pmc-vqa", tmp_path / "pmc_vqa.json")
    assert from_json == from_csv


# ---------------------------------------------------------------------------------------- llava-med-vqa

def test_llava_med_vqa_keeps_ids_and_normalises_answer_types():
    path = FIXTURES / "llava_med_vqa_test.json"
    samples, tally = read("llava-med-vqa", path)
    assert {k: (s.meta.answer_type, s.meta.answer) for k, s in samples.items()} == {
        "1001": ("closed", "yes"), "1002": ("closed", "no"), "1003": ("open", "right upper lobe")}
    assert samples["1003"].meta.extra == {"question_type": "POS"}
    assert samples["1002"].question == "Is the heart enlarged?"  # read from the misspelt "conversatons"
    assert f"{path}:[3] (id 1004): unknown answer_type 'sometimes'" in "\n".join(tally.details())


# --------------------------------------------------------------------------------------------- registry

def test_registry_refuses_unknown_formats_options_and_read_only_writes(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'coco'.*known: canonical, llava"):
        read_records("coco", FIXTURES / "medmax.jsonl", tally=Tally())
    with pytest.raises(ValueError, match="format 'llava' takes no option 'include_credentialed'"):
        read_records("llava", FIXTURES / "medmax.jsonl", tally=Tally(), include_credentialed=True)
    with pytest.raises(ValueError, match="format 'slake' is read only"):
        write_records("slake", tmp_path / "x.json", [], tally=Tally())
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        read_records("llava", tmp_path / "nope.json", tally=Tally())
    assert set(FORMATS) >= {"canonical", "llava", "messages", "medmax", "vqa-rad", "slake", "pathvqa",
                            "pmc-vqa", "llava-med-vqa"}
    assert default_image_root("llava", tmp_path / "a" / "b.json") == tmp_path / "a"


# ------------------------------------------------------------------------------------ streaming parser

def test_streaming_json_array_matches_json_load_across_tiny_chunks(tmp_path, monkeypatch):
    records = [{"id": i, "text": "é" * (i % 5) + "x" * i, "n": 10 ** i, "nested": [[i], {"a": None}]}
               for i in range(40)] + [12345, "tail", True]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, indent=1))
    monkeypatch.setattr(records_module, "_CHUNK_CHARS", 7)  # every record spans many chunks
    streamed = list(records_module.iter_records(path))
    assert [where for where, _ in streamed] == [f"[{i}]" for i in range(len(records))]
    assert [value for _, value in streamed] == json.loads(path.read_text())


def test_streaming_json_array_reports_a_syntax_error_with_index_and_line_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(records_module, "_CHUNK_CHARS", 5)
    path = tmp_path / "broken.json"
    path.write_text('[\n{"id": 1},\n{"id": 2},\n{"id": 3 "x": {"y": [1, 2]}},\n{"id": 4}\n]')
    streamed = list(records_module.iter_records(path))
    assert [value for _, value in streamed] == [{"id": 1}, {"id": 2}, streamed[2][1], {"id": 4}]
    error = streamed[2][1]
    assert isinstance(error, RecordError) and not error.tail
    assert str(error) == f"{path}:[2] (id 3): not valid JSON (Expecting ',' delimiter at line 4)"
    truncated = tmp_path / "truncated.json"
    truncated.write_text('[{"id": 1}, {"id": 2')
    streamed = list(records_module.iter_records(truncated))
    assert streamed[0][1] == {"id": 1} and "[1] (id 2): not valid JSON" in str(streamed[1][1])
    assert streamed[1][1].tail and len(streamed) == 2
