"""`medtune eval run` on the bundled VQA-RAD test split with a tiny model: shards, resume, bad images, the CLI.

Every run is compared with one reference run (one shard, batch 8, uninterrupted): the same questions must get
the same answers by id, the same prompts and settings, and the same report rows. The tiny model is random but
"answering" (see :func:`answering_model`), so answers differ from question to question and the metrics are not
all zero; a mix-up of ids or a lost answer would show.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.data.jsonl import RecordError, write_samples
from medtune.data.schema import ImageRef, Metadata, qa_sample
from medtune.eval.backends import LocalBackend
from medtune.eval.run import run_task
from medtune.eval.tasks import get_task
from run_helpers import LIMIT, RecordingBackend, answering_model, line_count, predictions, report_rows

torch = pytest.importorskip("torch")

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # the subprocess below computes with one thread too
    return answering_model(tmp_path_factory.mktemp("models") / "answering-tiny")


@pytest.fixture(scope="module")
def vlm(model_dir):
    from medtune.models.build import load_vlm

    return load_vlm(model_dir)


@pytest.fixture(scope="module")
def reference(vlm, tmp_path_factory) -> Path:
    """One shard, batch 8, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    result = run_task(get_task("vqa-rad"), LocalBackend(vlm), out, batch_size=8, limit=LIMIT, progress=False)
    assert result.answered == LIMIT and result.score is not None
    answers = {r["prediction"] for r in predictions(out).values()}
    assert len(answers) > LIMIT // 4, "the answering model should answer questions differently"
    assert any(r["value"] > 0 for r in report_rows(out)), "some metric should be above zero"
    return out


def test_reference_run_records_prompt_settings_and_task_order(reference):
    task = get_task("vqa-rad")
    samples = task.samples()[:LIMIT]
    records = predictions(reference)
    assert list(records) == [s.id for s in samples if s.meta.answer_type == "closed"] + \
        [s.id for s in samples if s.meta.answer_type == "open"]  # grouped by settings, task order within
    for sample in samples:
        record = records[sample.id]
        assert record["prompt"] == sample.question.strip()
        assert record["settings"]["max_new_tokens"] == task.settings[sample.meta.answer_type]["max_new_tokens"]
        assert record["images"] == [image.to_dict() for image in sample.images]
    results = json.loads((reference / "results.json").read_text())
    assert results["task"]["limit"] == LIMIT and results["counts"]["questions"] == LIMIT


def test_two_shards_merged_equal_one_shard(model_dir, reference, tmp_path, monkeypatch, capsys):
    """Shard 0 through --num-shards/--shard-index, shard 1 as torchrun's rank 1; the last one merges."""
    common = ["eval", "run", "--model", str(model_dir), "--device", "cpu", "--limit", str(LIMIT),
              "--out", str(tmp_path), "--batch-size", "3"]
    assert main([*common, "--num-shards", "2", "--shard-index", "0"]) == 0
    assert "the last shard to finish merges" in capsys.readouterr().out
    first = tmp_path / "predictions.shard000-of-002.jsonl"
    ids = [s.id for s in get_task("vqa-rad").samples()[:LIMIT]]
    assert set(predictions(tmp_path, first.name)) == set(ids[0::2])
    assert not (tmp_path / "predictions.jsonl").exists() and not (tmp_path / "results.json").exists()

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(common) == 0
    assert set(predictions(tmp_path, "predictions.shard001-of-002.jsonl")) == set(ids[1::2])
    merged = predictions(tmp_path)
    assert list(merged) == ids  # the merged file is in task order
    assert merged == predictions(reference)
    assert report_rows(tmp_path) == report_rows(reference)


def test_failure_half_way_resumes_without_asking_again(vlm, reference, tmp_path):
    task = get_task("vqa-rad")
    failing = RecordingBackend(LocalBackend(vlm), fail_after=16)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_task(task, failing, tmp_path, batch_size=8, limit=LIMIT, progress=False)
    answered_before = set(predictions(tmp_path))
    assert answered_before == set(failing.asked) and len(answered_before) == 16
    assert not (tmp_path / "results.json").exists()

    resumed = RecordingBackend(LocalBackend(vlm))
    result = run_task(task, resumed, tmp_path, batch_size=8, limit=LIMIT, progress=False)
    assert result.already_answered == 16 and result.answered == LIMIT - 16
    assert not answered_before & set(resumed.asked)
    assert predictions(tmp_path) == predictions(reference)
    assert report_rows(tmp_path) == report_rows(reference)


def test_killed_process_resumes_to_the_same_results(model_dir, vlm, reference, tmp_path):
    """SIGKILL a real `medtune eval run` after a few answers (possibly mid-line), then run again."""
    out = tmp_path / "run"
    command = [sys.executable, "-c", "import sys; from medtune.cli import main; sys.exit(main())", "eval", "run",
               "--model", str(model_dir), "--device", "cpu", "--limit", str(LIMIT), "--batch-size", "1",
               "--out", str(out)]
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    file = out / "predictions.jsonl"
    deadline = time.monotonic() + 240
    while line_count(file) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    written = line_count(file)
    assert 4 <= written < LIMIT
    answered_before = set(predictions(out)) if file.read_bytes().endswith(b"\n") else \
        {json.loads(line)["id"] for line in file.read_text().splitlines()[:-1]}

    resumed = RecordingBackend(LocalBackend(vlm))
    result = run_task(get_task("vqa-rad"), resumed, out, batch_size=8, limit=LIMIT, progress=False)
    assert not answered_before & set(resumed.asked)
    assert result.already_answered == len(answered_before)
    assert predictions(out) == predictions(reference)
    assert report_rows(out) == report_rows(reference)


def test_cli_end_to_end_writes_predictions_and_report(model_dir, reference, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["eval", "run", "--task", "vqa-rad", "--model", str(model_dir), "--limit", str(LIMIT),
                 "--out", str(out), "--device", "cpu"]) == 0
    summary = capsys.readouterr().out
    assert f"vqa-rad: {LIMIT} questions, 0 answered before, {LIMIT} answered now" in summary
    assert f"report in {out}" in summary
    assert predictions(out) == predictions(reference)
    assert report_rows(out) == report_rows(reference)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    closed = next(r for r in report_rows(out) if r["family"] == "compat" and r["answer_type"] == "closed"
                  and r["group_by"] == "all")
    assert f"{closed['value']:.2f}" in markdown and "| vqa-rad |" in markdown

    # running again into the same folder asks nothing and rewrites the same report
    assert main(["eval", "run", "--task", "vqa-rad", "--model", str(model_dir), "--limit", str(LIMIT),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert f"{LIMIT} answered before, 0 answered now" in capsys.readouterr().out
    assert report_rows(out) == report_rows(reference)


@pytest.mark.parametrize("args, message", [
    (["--num-shards", "2", "--shard-index", "2"], "--shard-index 2 is not in 0..1"),
    (["--metrics", "compat,judge"], "does not call a judge"),
])
def test_cli_refuses_bad_options_before_loading_anything(tmp_path, capsys, args, message):
    assert main(["eval", "run", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def custom_task(tmp_path: Path):
    """Three closed questions on three images, the second image missing."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "c.png"):
        Image.new("RGB", (40, 40), (200, 30, 30) if name == "a.png" else (20, 20, 220)).save(images / name)
    samples = [qa_sample(qid, f"Is image {qid} red?", answer, [ImageRef(f"{qid}.png")],
                         meta=Metadata(answer_type="closed"))
               for qid, answer in (("a", "yes"), ("b", "no"), ("c", "no"))]
    data = tmp_path / "questions.jsonl"
    write_samples(data, samples)
    return get_task("custom", data=data, image_root=images), images


def test_unreadable_image_is_skipped_counted_and_retried_on_resume(vlm, tmp_path):
    task, images = custom_task(tmp_path)
    out = tmp_path / "out"
    backend = RecordingBackend(LocalBackend(vlm))
    result = run_task(task, backend, out, progress=False)
    assert backend.asked == ["a", "c"]
    assert result.skipped.skipped == {"image cannot be loaded": 1}
    assert "b.png: file not found" in result.skipped.examples["image cannot be loaded"]
    assert result.score is None and not (out / "results.json").exists()  # no report leaves a question out

    with pytest.raises(RecordError, match=r"questions.jsonl:b: image .*b.png: file not found"):
        run_task(task, backend, out, strict=True, progress=False)

    from PIL import Image
    Image.new("RGB", (40, 40), (10, 200, 10)).save(images / "b.png")
    result = run_task(task, backend, out, progress=False)
    assert backend.asked == ["a", "c", "b"] and result.score is not None
    assert json.loads((out / "results.json").read_text())["counts"]["questions"] == 3


def test_resume_refuses_answers_asked_differently(vlm, tmp_path):
    """A folder answered with the plain prompt is not continued with the short-answer prompt."""
    from medtune.eval.run import ResumeMismatch

    run_task(get_task("vqa-rad"), LocalBackend(vlm), tmp_path, limit=2, progress=False)
    backend = RecordingBackend(LocalBackend(vlm))
    with pytest.raises(ResumeMismatch, match=r"question '11' was answered with prompt 'Is there evidence"):
        run_task(get_task("vqa-rad", prompt_style="short"), backend, tmp_path, limit=4, progress=False)
    assert backend.asked == []


def test_score_of_a_limited_run_scores_the_questions_it_asked(reference, tmp_path, capsys, caplog):
    """`eval score` on the predictions of `eval run --limit 48` scores those 48 and says so; a question
    missing among them is still missing (refused, or wrong with --allow-missing)."""
    import logging

    caplog.set_level(logging.INFO, logger="medtune.eval.score")
    out = tmp_path / "rescored"
    assert main(["eval", "score", str(reference / "predictions.jsonl"), "--task", "vqa-rad", "--out", str(out)]) == 0
    said = caplog.text + (out / "results.md").read_text()
    assert f"scored {LIMIT} of 451 questions (the run was limited to {LIMIT})" in said
    assert f"{LIMIT} questions scored, 0 without prediction" in capsys.readouterr().out
    assert report_rows(out) == report_rows(reference)
    counts = json.loads((out / "results.json").read_text())["counts"]
    assert (counts["questions"], counts["limit"], counts["task_questions"]) == (LIMIT, LIMIT, 451)

    lines = (reference / "predictions.jsonl").read_text().splitlines()
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(line + "\n" for line in lines[1:]))
    missing = json.loads(lines[0])["id"]
    assert main(["eval", "score", str(partial), "--task", "vqa-rad"]) == 2
    assert f"1 of {LIMIT} questions have no prediction (ids: {missing})" in capsys.readouterr().err
    assert main(["eval", "score", str(partial), "--task", "vqa-rad", "--allow-missing"]) == 0
    assert f"{LIMIT} questions scored, 1 without prediction" in capsys.readouterr().out


def test_samples_with_several_images_are_answered_with_all_of_them_in_order(model_dir, vlm, tmp_path):
    """`medtune eval run --data` on canonical samples holding two or three images (a current and a prior study):
    each is asked with all its images, in their order (the record keeps them), and answered as the Generator
    answers that prompt."""
    from medtune.data.images import load_image
    from medtune.models.generation import GenerationSettings, Generator

    root = Path(__file__).parents[2] / "data" / "vqa_rad" / "images"
    names = sorted(p.name for p in root.iterdir())[:3]
    meta = Metadata(answer="yes", answer_type="closed")
    samples = [qa_sample("pair-1", "Has it changed since the prior study?", "yes", images=[ImageRef(names[0]),
                                                                                          ImageRef(names[1])], meta=meta),
               qa_sample("pair-2", "Has it changed since the prior study?", "yes", images=[ImageRef(names[1]),
                                                                                          ImageRef(names[0])], meta=meta),
               qa_sample("three", "Which view shows it best?", "yes", images=[ImageRef(n) for n in names], meta=meta)]
    data = tmp_path / "studies.jsonl"
    write_samples(data, samples)
    assert main(["eval", "run", "--data", str(data), "--gt-format", "canonical", "--image-root", str(root),
                 "--model", str(model_dir), "--device", "cpu", "--metrics", "strict", "--out", str(tmp_path / "out")]) == 0
    records = predictions(tmp_path / "out")
    generator = Generator(vlm)
    for sample in samples:
        record = records[sample.id]
        assert record["images"] == [image.to_dict() for image in sample.images]
        images = [load_image(ref, root) for ref in sample.images]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": sample.question}]
        expected = generator.complete([[{"role": "user", "content": content}]], [images],
                                      GenerationSettings(max_new_tokens=record["settings"]["max_new_tokens"]))[0]
        assert record["prediction"] == expected.text
