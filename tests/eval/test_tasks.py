"""The task registry: bundled VQA-RAD with no arguments, clear errors for missing data, prompts, skips."""
import pytest

from medtune.data.jsonl import RecordError, Tally, write_samples
from medtune.data.schema import ImageRef, Metadata, qa_sample
from medtune.eval.tasks import MCQ_INSTRUCTION, TaskDataMissing, get_task


def test_vqa_rad_runs_with_no_arguments():
    task = get_task("vqa-rad")
    samples = task.samples()
    kinds = [s.meta.answer_type for s in samples]
    assert (len(samples), kinds.count("closed"), kinds.count("open")) == (451, 272, 179)
    assert len({s.id for s in samples}) == 451
    first = samples[0]
    assert (task.image_root / first.images[0].path).is_file()
    assert task.prompt(first) == first.question  # the LLaVA-Med protocol: the question alone
    assert task.settings_for(first)["temperature"] == 0.0


@pytest.mark.parametrize("name, hint", [("pathvqa", "PathVQA test split"), ("pmc-vqa", "PMC-VQA test CSV"),
                                        ("custom", "meta.answer_type")])
def test_tasks_without_data_say_what_to_pass(name, hint):
    with pytest.raises(TaskDataMissing, match=f"task '{name}' needs its data: pass --data PATH .*{hint}"):
        get_task(name)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(TaskDataMissing, match="nope.json does not exist"):
        get_task("slake", data=tmp_path / "nope.json")


def test_mcq_prompt_lists_options_and_messages_carry_the_image(tmp_path):
    path = tmp_path / "mcq.jsonl"
    sample = qa_sample("q1", "Which finding?", "B", [ImageRef("img.png")],
                       Metadata(answer_type="mcq", choices=["mass", "effusion"]))
    write_samples(path, [sample])
    task = get_task("mcq", data=path)
    loaded = task.samples()[0]
    assert task.prompt(loaded) == f"Which finding?\nA. mass\nB. effusion\n{MCQ_INSTRUCTION}"
    content = task.messages(loaded)[0]["content"]
    assert content[0] == {"type": "image", "image": ImageRef("img.png")}
    assert content[1]["text"].startswith("Which finding?")


def test_custom_samples_without_ground_truth_are_skipped_and_counted(tmp_path):
    path = tmp_path / "custom.jsonl"
    write_samples(path, [qa_sample("ok", "Is it?", "yes", meta=Metadata(answer_type="closed")),
                         qa_sample("no-type", "Is it?", "yes"),
                         qa_sample("no-choices", "Which?", "A", meta=Metadata(answer_type="mcq"))])
    tally = Tally()
    assert [s.id for s in get_task("custom", data=path).samples(tally=tally)] == ["ok"]
    assert dict(tally.skipped) == {"no answer_type": 1, "multiple-choice question without choices": 1}
    with pytest.raises(RecordError, match="custom.jsonl:no-type: no answer_type"):
        get_task("custom", data=path).samples(strict=True)


def test_slake_scores_per_organ_and_modality(tmp_path):
    import json

    from medtune.eval.score import score_predictions
    task = get_task("slake")
    samples = task.samples()
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"question_id": s.id, "text": s.meta.answer}) + "\n" for s in samples))
    rows = score_predictions(task, preds, resamples=50).rows
    modalities = {r.group for r in rows if r.group_by == "modality" and r.family == "strict"}
    assert modalities == {s.meta.modality for s in samples}
    # Every answer is the truth itself: every headline row is 100 with a collapsed interval.
    headline = [r for r in rows if r.family == "strict" and r.metric in ("accuracy", "exact")]
    assert headline
    assert all((r.estimate.value, r.estimate.low, r.estimate.high) == (100.0, 100.0, 100.0) for r in headline)
