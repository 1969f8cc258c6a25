"""End to end: `medtune demo` through the real CLI on the bundled VQA-RAD, shortened to a few steps.

The run uses the shipped recipes/demo.yaml with the tiny preset, two steps per stage and 32 training samples
per stage (recipe overrides, as a user would pass them), and evaluates on all 451 test questions. The tests
check what the demo writes against the raw bundled files, read here without medtune: question counts, leakage
removal, the baselines recomputed independently, the figures, the report's tables, and that a second run
reuses every cache instead of redoing work.
"""
from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from medtune.cli import main
from medtune.eval import compat, strict
from medtune.paths import bundled_data

pytestmark = pytest.mark.slow

# Recipe overrides go last: argparse reads KEY=VALUE words only as one run after the options.
SHORT = ["stages.*.max_steps=2", "stages.*.data.limit=32", "stages.*.log_steps=1", "stages.*.batch_size=2"]


def run_demo(output: Path, *options: str, overrides: tuple[str, ...] = ()) -> int:
    return main(["demo", "--output", str(output), "--preset", "tiny", *options, *overrides, *SHORT])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One shortened demo on the full test split: (output dir, report.json content, report.md text).

    Later tests run the demo again in the same folder (that is what they test), so the first run's report is
    kept in memory here.
    """
    output = tmp_path_factory.mktemp("demo")
    assert run_demo(output) == 0
    return (output, strict_json((output / "report.json").read_text(encoding="utf-8")),
            (output / "report.md").read_text(encoding="utf-8"))


def strict_json(text: str):
    """JSON as the standard has it: NaN or Infinity (which Python would write for an empty metric) fail."""
    def refuse(constant):
        raise ValueError(f"report.json holds {constant}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


def raw(split: str) -> list[dict]:
    return json.loads(bundled_data("vqa_rad", f"{split}set.json").read_text(encoding="utf-8"))


def norm(text) -> str:
    """Leakage/baseline normalisation, written out: NFKC, case folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


def answer_type(record: dict) -> str:
    return record["answer_type"].strip().lower()


# ---- data and leakage ------------------------------------------------------------------------------------


def test_counts_match_the_bundled_test_split(demo):
    _, report, _ = demo
    test = raw("test")
    assert report["evaluation"]["n"] == len(test) == 451
    assert report["evaluation"]["answer_types"] == dict(Counter(answer_type(r) for r in test))
    assert report["evaluation"]["answer_types"] == {"closed": 272, "open": 179}
    assert report["evaluation"]["organs"] == dict(Counter(r["image_organ"] for r in test))
    predictions = [json.loads(line) for line in Path(report["evaluation"]["predictions"]).read_text().splitlines()]
    assert sorted(p["id"] for p in predictions) == sorted(str(r["qid"]) for r in test)


def test_leaking_training_pairs_are_removed_before_training(demo):
    output, report, _ = demo
    leakage, records = report["data"]["leakage"], report["data"]["records"]
    assert (leakage["exact"], leakage["rephrasing"]) == (22, 283)
    train, test = raw("train"), raw("test")
    removed = set(leakage["removed_ids"])
    assert len(removed) == leakage["removed"] == records["train"] - records["clean_train"]
    assert records["train"] == len(train)
    # Exact pairs recomputed from the raw files are among the removed records ...
    test_pairs = {(r["image_name"], norm(r["question"]), norm(r["answer"])) for r in test}
    exact = {str(r["qid"]) for r in train if (r["image_name"], norm(r["question"]), norm(r["answer"])) in test_pairs}
    assert len(exact) == 22 and exact <= removed
    # ... and the cleaned file, which every stage trained on, holds exactly the others.
    clean = [json.loads(line) for line in (output / "data" / "train-clean.jsonl").read_text().splitlines()]
    assert [c["id"] for c in clean] == [str(r["qid"]) for r in train if str(r["qid"]) not in removed]
    recipe = json.loads((Path(report["recipe"]["run_dir"]) / "recipe.json").read_text())
    assert len(recipe["stages"]) == len(report["training"]["stages"]) == 2
    assert {s["data"]["path"] for s in recipe["stages"]} == {str(output / "data" / "train-clean.jsonl")}


# ---- baselines -------------------------------------------------------------------------------------------


def independent_baselines(removed: set[str]) -> dict[str, dict[str, str]]:
    """Both baselines recomputed from the raw files (training split without the removed records)."""
    train = [r for r in raw("train") if str(r["qid"]) not in removed]
    by_type: dict[str, Counter] = {}
    by_question: dict[str, Counter] = {}
    for record in train:   # insertion order breaks ties, as documented
        by_type.setdefault(answer_type(record), Counter())[norm(record["answer"])] += 1
        by_question.setdefault(norm(record["question"]), Counter())[norm(record["answer"])] += 1
    majority = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    answers = {"majority": {}, "question_prior": {}}
    for record in raw("test"):
        qid, kind = str(record["qid"]), answer_type(record)
        answers["majority"][qid] = majority[kind]
        prior = by_question.get(norm(record["question"]))
        answers["question_prior"][qid] = prior.most_common(1)[0][0] if prior else majority[kind]
    return answers


def mean_percent(values: list[float]) -> float:
    return 100 * sum(values) / len(values)


def test_baselines_equal_an_independent_recomputation(demo):
    output, report, _ = demo
    answers = independent_baselines(set(report["data"]["leakage"]["removed_ids"]))
    test = raw("test")
    closed = [r for r in test if answer_type(r) == "closed"]
    open_ = [r for r in test if answer_type(r) == "open"]
    for name, predicted in answers.items():
        written = {json.loads(line)["id"]: json.loads(line)["prediction"]
                   for line in (output / "baselines" / f"{name}.jsonl").read_text().splitlines()}
        assert written == predicted
        line = {(h["family"], h["answer_type"], h["metric"]): h[name] for h in report["headline"]}
        strict_closed = mean_percent([strict.score_item(predicted[str(r["qid"])], str(r["answer"]), "closed")
                                      ["accuracy"] for r in closed])
        strict_open = mean_percent([strict.normalize(predicted[str(r["qid"])]) == strict.normalize(str(r["answer"]))
                                    for r in open_])
        compat_open = mean_percent([compat.score_item(predicted[str(r["qid"])], str(r["answer"]), "open",
                                                      report["evaluation"]["compat_flavour"])["recall"] for r in open_])
        assert line[("strict", "closed", "accuracy")]["value"] == pytest.approx(strict_closed)
        assert line[("strict", "open", "exact")]["value"] == pytest.approx(strict_open)
        assert line[("compat", "open", "recall")]["value"] == pytest.approx(compat_open)
        assert line[("strict", "closed", "accuracy")]["n"] == 272
        low, high = line[("strict", "closed", "accuracy")]["ci_low"], line[("strict", "closed", "accuracy")]["ci_high"]
        assert low <= strict_closed <= high and low < high
    assert answers["majority"] != answers["question_prior"]   # the question prior is not the fallback alone


# ---- report and figures ----------------------------------------------------------------------------------


def test_report_markdown_has_the_tables_and_the_statement(demo):
    _, report, text = demo
    assert "| family | answer type | metric | n | model | majority baseline | question-prior baseline |" in text
    assert "| organ | family | answer type | metric | n | model |" in text
    for organ in report["evaluation"]["organs"]:
        assert f"| {organ} | strict | closed | accuracy |" in text
    assert "| exact pairs (same image, question and answer as a test question) | 22 |" in text
    assert "of 1267 frame records) | 283 |" in text
    assert "pipeline demonstration, not a medical model" in text
    assert report["gpu_command"] in text and "model.llm=" in report["gpu_command"]
    assert f"{report['machine']['usable_cores']} usable CPU cores" in text
    for phase in report["timings"]["phases"]:
        assert phase["title"] in text
    model_closed = next(h for h in report["headline"] if (h["family"], h["answer_type"], h["metric"])
                        == ("strict", "closed", "accuracy"))["model"]
    assert f"{model_closed['value']:.1f} [{model_closed['ci_low']:.1f}, {model_closed['ci_high']:.1f}]" in text


def test_figures_are_png_images_and_the_loss_curve_is_the_trainers(demo):
    output, report, _ = demo
    for name in ("loss.png", "results.png"):
        with Image.open(output / name) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
            image.verify()
    for stage in report["training"]["stages"]:
        lines = [json.loads(line) for line in Path(stage["metrics"]).read_text().splitlines()]
        assert stage["loss_curve"] == [[line["step"], line["loss"]] for line in lines if "loss" in line]
        assert [step for step, _ in stage["loss_curve"]] == [1, 2]


# ---- caches, options, errors -----------------------------------------------------------------------------


def test_second_run_reuses_data_stages_and_answers(demo, capsys):
    output, first, _ = demo
    run_dir = Path(first["recipe"]["run_dir"])
    weights = sorted(run_dir.glob("stage-*/model/*.safetensors"))
    assert len(weights) == 2
    before = {path: path.stat().st_mtime_ns for path in [*weights, output / "data" / "train-clean.jsonl",
                                                        Path(first["evaluation"]["predictions"])]}
    capsys.readouterr()
    assert run_demo(output) == 0
    printed = capsys.readouterr().out
    banners = [line for line in printed.splitlines() if line.startswith("== medtune demo [")]
    assert [b.split("]")[0] for b in banners] == [f"== medtune demo [{i}/6" for i in range(1, 7)]
    assert "reusing converted data" in printed
    assert printed.count("reusing stage") == 2
    assert "reusing 451 answers" in printed
    assert {path: path.stat().st_mtime_ns for path in before} == before
    second = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert second["headline"] == first["headline"] and second["per_organ"] == first["per_organ"]
    assert [t["status"] for t in second["timings"]["phases"]][:4] == ["reused"] * 4
    # the report still says how long each reused phase took when it ran
    ran = {t["phase"]: t["seconds"] for t in first["timings"]["phases"]}
    assert all(t["first_run_seconds"] == ran[t["phase"]] for t in second["timings"]["phases"][:4])


def test_other_settings_train_their_own_model_and_max_test_subsets(demo):
    output, first, _ = demo
    token_cache = sorted((output / "cache" / "tokens").iterdir())
    assert token_cache   # under --output, like everything else
    assert run_demo(output, "--steps-scale", "0.5", "--max-test", "16") == 0
    assert sorted((output / "cache" / "tokens").iterdir()) == token_cache   # same data: encoded data reused
    report = strict_json((output / "report.json").read_text(encoding="utf-8"))
    assert report["recipe"]["run_dir"] != first["recipe"]["run_dir"]
    assert [s["steps"] for s in report["training"]["stages"]] == [1, 1]
    first16 = raw("test")[:16]
    assert report["evaluation"]["n"] == 16
    assert report["evaluation"]["answer_types"] == dict(Counter(answer_type(r) for r in first16))
    assert Path(first["recipe"]["run_dir"], "stage-1-" + first["training"]["stages"][1]["name"], "model").is_dir()


@pytest.mark.parametrize("arguments, message", [
    (["stages.0.lr.projectr=1"], "stages[0].lr.projectr: unknown key (did you mean projector?)"),
    (["--max-test", "0"], "--max-test must be at least 1, got 0"),
    (["--steps-scale", "-1"], "--steps-scale must be positive, got -1.0"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, capsys, arguments, message):
    assert main(["demo", "--output", str(tmp_path / "out"), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- the report's GPU command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_parts(tmp_path_factory) -> dict[str, Path]:
    """Tiny "pretrained" parts saved as checkpoints, to stand in for the hub names of the GPU command."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from medtune.models.tokenizer import offline_tokenizer

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(7)
    tokenizer = offline_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
                     ).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(root / "vision")
    return {"vision": root / "vision", "llm": root / "llm"}


def test_gpu_command_runs_the_recipe_with_pretrained_parts_by_overrides_only(demo, local_parts, tmp_path):
    """The report's command, with local checkpoints for its hub names and fp32 (this is a CPU)."""
    import shlex

    import torch
    from transformers import AutoModelForImageTextToText, CLIPVisionModel

    _, report, _ = demo
    words = shlex.split(report["gpu_command"])
    assert words[:4] == ["medtune", "demo", "--output", "medtune-output/demo-pretrained"]
    overrides = [w for w in words[4:] if w != "stages.*.precision=bf16"]
    assert len(overrides) == len(words) - 5 and all("=" in w for w in overrides)
    hub = {"model.vision": local_parts["vision"], "model.llm": local_parts["llm"]}
    overrides = [f"{w.split('=')[0]}={hub[w.split('=')[0]]}" if w.split("=")[0] in hub else w for w in overrides]
    output = tmp_path / "pretrained"
    assert run_demo(output, "--max-test", "8", overrides=tuple(overrides)) == 0
    pretrained = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert pretrained["evaluation"]["n"] == 8
    assert f"vision: {local_parts['vision']}" in pretrained["statement"]   # not called a random model
    assert "pipeline demonstration" not in (output / "report.md").read_text(encoding="utf-8")
    final = Path(pretrained["model"]["final_model"])
    assert (final.parent / "adapter" / "adapter_config.json").is_file()   # stage 2 trained LoRA adapters
    model = AutoModelForImageTextToText.from_pretrained(final)   # merged: plain transformers loads it
    tower = CLIPVisionModel.from_pretrained(local_parts["vision"])
    # Neither stage trains the vision tower: the final model carries the pretrained tower unchanged.
    mine, theirs = model.model.vision_tower.state_dict(), tower.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
