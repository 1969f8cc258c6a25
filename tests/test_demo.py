"""End to end: `medtune demo` through the real CLI on the bundled VQA-RAD, shortened to a few steps.

The run uses the shipped recipes/demo.yaml with the tiny preset, two steps per stage and 32 training samples
per stage (recipe overrides, as a user would pass them), and evaluates on all 451 test questions. The tests
check what the demo writes against the raw bundled files, read here without medtune: question counts, leakage
removal, the baselines recomputed independently, the figures, the report's tables, and that a second run
reuses every cache instead of redoing work.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from medtune.cli import main
from medtune.eval import compat, strict
from medtune.paths import bundled_data, shell_command

pytestmark = pytest.mark.slow

# Recipe overrides go last: argparse reads KEY=VALUE words only as one run after the options.
SHORT = ["stages.*.max_steps=2", "stages.*.data.limit=32", "stages.*.eval_data.limit=32", "stages.*.log_steps=1",
         "stages.*.batch_size=2"]


def run_demo(output: Path, *options: str, overrides: tuple[str, ...] = ()) -> int:
    return main(["demo", "--output", str(output), "--preset", "tiny", *options, *overrides, *SHORT])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One shortened demo on the full test split: (output dir, report.json content, report.md text, what it
    printed).

    Later tests run the demo again in the same folder (that is what they test), so the first run's report is
    kept in memory here.
    """
    import contextlib
    import io

    output = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_demo(output) == 0
    return (output, strict_json((output / "report.json").read_text(encoding="utf-8")),
            (output / "report.md").read_text(encoding="utf-8"), printed.getvalue())


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run[:3]


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
    # ... and the cleaned file holds exactly the others; every stage trains on its part outside validation.
    clean = [json.loads(line) for line in (output / "data" / "train-clean.jsonl").read_text().splitlines()]
    assert [c["id"] for c in clean] == [str(r["qid"]) for r in train if str(r["qid"]) not in removed]
    recipe = json.loads((Path(report["recipe"]["run_dir"]) / "recipe.json").read_text())
    assert len(recipe["stages"]) == len(report["training"]["stages"]) == 2
    # the caption-alignment stage (plain template) trains on captions made from train-fit, the other on train-fit
    assert [(s["template"], s["data"]["path"]) for s in recipe["stages"]] == [
        ("plain", str(output / "data" / "captions.jsonl")), (None, str(output / "data" / "train-fit.jsonl"))]
    assert {s["eval_data"]["path"] for s in recipe["stages"]} == {str(output / "data" / "validation.jsonl")}
    # fixed threads (medtune train's default), so that a second run with the same seed gives the same figures
    assert {s["torch_threads"] for s in recipe["stages"]} == {None}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validation_is_carved_from_training_disjoint_from_test_and_from_what_trains(demo):
    output, report, _ = demo
    clean, fit = lines(output / "data" / "train-clean.jsonl"), lines(output / "data" / "train-fit.jsonl")
    validation = lines(output / "data" / "validation.jsonl")
    clean_ids, fit_ids, validation_ids = ({s["id"] for s in rows} for rows in (clean, fit, validation))
    test_ids = {str(r["qid"]) for r in raw("test")}
    assert validation_ids <= clean_ids and not validation_ids & test_ids and not validation_ids & fit_ids
    assert len(validation) == round(0.1 * len(clean)) and fit_ids < clean_ids - validation_ids
    # what was left out of training beside validation is what leaks into it: no exact (image, question, answer)
    by_id = {str(r["qid"]): r for r in raw("train")}
    def pair(sample_id):
        record = by_id[sample_id]
        return record["image_name"], norm(record["question"]), norm(record["answer"])
    validation_pairs = {pair(i) for i in validation_ids}
    assert not {pair(i) for i in fit_ids} & validation_pairs
    dropped = clean_ids - validation_ids - fit_ids
    # ... no validation open question has a training question on its image with its answer (as for the test
    # split after the leakage check), and a question dropped is one of those, an exact pair, a templated
    # rephrasing or a near duplicate on the same image
    open_answers = {(by_id[i]["image_name"], norm(by_id[i]["answer"])) for i in validation_ids
                    if answer_type(by_id[i]) == "open"}
    assert not {(by_id[i]["image_name"], norm(by_id[i]["answer"])) for i in fit_ids} & open_answers

    def words(i):
        return frozenset(re.findall(r"\w+", norm(by_id[i]["question"])))
    held_words = [(by_id[i]["image_name"], words(i)) for i in validation_ids]

    def near(i):
        return any(image == by_id[i]["image_name"] and len(w & words(i)) >= 0.8 * len(w | words(i))
                   for image, w in held_words)
    assert dropped and all(pair(i) in validation_pairs or by_id[i].get("phrase_type") == "frame" or near(i)
                           or (by_id[i]["image_name"], norm(by_id[i]["answer"])) in open_answers for i in dropped)
    section = report["validation"]
    assert section["n"] == len(validation) and section["split"]["fit"] == len(fit)
    assert section["split"]["removed_from_fit"] == len(dropped)
    answered = {p["id"] for p in lines(Path(section["predictions"]))}
    assert answered == validation_ids and not answered & test_ids
    # what trains and validates has its answers lower-cased (VQA-RAD writes "Yes" and "yes"), nothing else
    for row in (*fit, *validation):
        answer = str(by_id[row["id"]]["answer"]).lower()
        replies = [part["text"] for m in row["messages"] if m["role"] == "assistant" for part in m["content"]]
        assert row["meta"]["answer"] == answer and replies == [answer]
    assert {s["id"]: s["messages"][0] for s in clean if s["id"] in fit_ids} == {s["id"]: s["messages"][0] for s in fit}


def test_captions_are_made_from_the_training_questions_alone(demo):
    """Recomputed from the raw file: one caption per image of train-fit, its organ and then the distinct answers
    of the open modality, plane and organ questions train-fit asks about it, in that order."""
    output, report, _ = demo
    fit_ids = {row["id"] for row in lines(output / "data" / "train-fit.jsonl")}
    first = {"MODALITY": 0, "PLANE": 1, "ORGAN": 2}
    records = [r for r in raw("train") if str(r["qid"]) in fit_ids]
    records.sort(key=lambda r: first.get(r["question_type"].split(",")[0].strip(), 3))
    expected: dict[str, list[str]] = {}
    for record in records:
        facts = expected.setdefault(record["image_name"], [{"ABD": "abdomen", "CHEST": "chest",
                                                            "HEAD": "head"}[record["image_organ"]]])
        answer = " ".join(str(record["answer"]).lower().split())
        kind = record["question_type"].split(",")[0].strip()
        if answer_type(record) == "open" and kind in first and answer not in facts:
            facts.append(answer)
    captions = lines(output / "data" / "captions.jsonl")
    assert [c["messages"][0]["content"] for c in captions] == [
        [{"type": "image", "image": {"path": image}}] for image in sorted(expected)]
    assert [c["messages"][1]["content"][0]["text"] for c in captions] == [
        ", ".join(expected[image]) for image in sorted(expected)]
    assert report["data"]["records"]["captions"] == len(captions) == len(expected) > 300


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
    # learned from what the model trained on: the cleaned set less the validation split and its leakage
    split = json.loads((output / "data" / "manifest.json").read_text())["validation"]
    answers = independent_baselines({*report["data"]["leakage"]["removed_ids"], *split["ids"],
                                     *split["removed_ids"]})
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
    assert ("| family | answer type | metric | n | model | model, images blanked | majority baseline | "
            "question-prior baseline | question-only classifier |") in text
    assert "| organ | family | answer type | metric | n | model |" in text
    for organ in report["evaluation"]["organs"]:
        assert f"| {organ} | strict | closed | accuracy |" in text
    assert "| exact pairs (same image, question and answer as a test question) | 22 |" in text
    assert "of 1267 frame records) | 283 |" in text
    assert "pipeline demonstration, not a medical model" in text
    # the 2-step tiny model
    assert "on strict all accuracy the model does not beat the better answer-prior baseline" in text
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
        logged = lines(Path(stage["metrics"]))
        assert stage["loss_curve"] == [[line["step"], line["loss"]] for line in logged if "loss" in line]
        assert [step for step, _ in stage["loss_curve"]] == [1, 2]
        # the validation loss, logged by the trainer on the held-out split, at the stage's end included
        assert stage["validation_curve"] == [[line["step"], line["eval_loss"]] for line in logged
                                             if "eval_loss" in line]
        assert stage["validation_curve"][-1][0] == 2


def test_report_shows_validation_losses_and_scores_and_says_settings_were_chosen_there(demo):
    _, report, text = demo
    assert "were chosen on this split, never on the test split" in text
    for stage in report["training"]["stages"]:
        first, last = stage["validation_curve"][0][1], stage["validation_curve"][-1][1]
        assert f"| {first:.3f} → {last:.3f} |" in text
    strict_all = next(h for h in report["validation"]["headline"]
                      if (h["family"], h["answer_type"], h["metric"]) == ("strict", "all", "accuracy"))
    assert strict_all["model"]["n"] == report["validation"]["n"]
    assert f"| strict | all | accuracy | {report['validation']['n']} |" in text


def test_the_model_is_also_asked_every_question_with_its_image_blanked(demo):
    output, report, _ = demo
    for split, predictions, section in (("test", report["evaluation"]["predictions"], report),
                                        ("validation", report["validation"]["predictions"], report["validation"])):
        asked = lines(Path(predictions))
        blanked = lines(Path(predictions).parent.with_name(Path(predictions).parent.name + "-blank-image")
                        / "predictions.jsonl")
        # the same questions in the same order, each with the one black image instead of its own
        assert [(p["id"], p["prompt"]) for p in blanked] == [(p["id"], p["prompt"]) for p in asked]
        assert {json.dumps(p["images"]) for p in blanked} == {json.dumps([{"path": "black.png"}])}
        assert {p["images"][0]["path"] for p in asked} <= {r["image_name"] for r in raw("test") + raw("train")}
        with Image.open(output / "data" / "blank-image" / "black.png") as image:
            assert image.getextrema() == ((0, 0), (0, 0), (0, 0))
        results = section["results"]["model_blank_image"]
        closed = next(r for r in results if (r["family"], r["answer_type"], r["metric"])
                      == ("strict", "closed", "accuracy"))
        if split == "test":   # the column scores the blanked answers, by the model's rule
            truth = {str(r["qid"]): r for r in raw("test")}
            hits = [strict.score_item(p["prediction"], str(truth[p["id"]]["answer"]), "closed")["accuracy"]
                    for p in blanked if answer_type(truth[p["id"]]) == "closed"]
            assert closed["n"] == len(hits) == 272 and closed["value"] == pytest.approx(mean_percent(hits))


def test_report_shows_example_questions_with_image_answer_and_truth(demo):
    output, report, text = demo
    examples = report["examples"]
    truth = {str(r["qid"]): r for r in raw("test")}
    predictions = {p["id"]: p["prediction"] for p in lines(Path(report["evaluation"]["predictions"]))}
    assert 2 <= len(examples) <= 8 and {e["answer_type"] for e in examples} == {"closed", "open"}
    for example in examples:
        record = truth[example["id"]]
        assert example["truth"] == str(record["answer"]) and example["model"] == predictions[example["id"]]
        assert example["image"] == f"examples/{record['image_name']}" and (output / example["image"]).is_file()
        assert f"![{example['id']}]({example['image']})" in text


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table of a Markdown text as rows of cells (the separator row left out)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-: ") for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_report_tables_have_no_empty_columns(demo):
    _, _, text = demo
    tables = markdown_tables(text)
    assert len(tables) >= 5
    for table in tables:
        header, *rows = table
        assert all(len(row) == len(header) for row in rows), header
        for column, name in enumerate(header):
            assert name, f"a column without a header in {header}"
            assert any(row[column] for row in rows), f"column {name!r} of {header} is empty"


def test_results_figure_labels_every_bar_and_a_zero_bar_reads_0_0(demo):
    from medtune.demo.report import SYSTEMS, results_figure

    _, report, _ = demo
    headline = [line for line in report["headline"] if line["metric"] != "unparsed"]
    labels = [text.get_text() for text in results_figure(headline).axes[0].texts]
    assert len(labels) == len(headline) * len(SYSTEMS)
    expected = [f"{line[name]['value']:.1f}" if line.get(name) and line[name]["value"] is not None else "n/a"
                for name in SYSTEMS for line in headline]
    assert labels == expected
    zero = [line for line in headline if line["model"]["value"] == 0.0]
    assert zero and "0.0" in labels   # the tiny model scores 0 on open questions: its bar still says so


def test_loss_panels_share_one_marker_style_and_draw_a_smoothed_line(demo):
    from medtune.demo.report import loss_figure, smoothed

    _, report, _ = demo
    long_stage = {"name": "long", "loss_curve": [[step, 5.0 - step / 40] for step in range(1, 61)]}
    figure = loss_figure([*report["training"]["stages"], long_stage])   # a short and a long panel
    markers = set()
    for ax, stage in zip(figure.axes, [*report["training"]["stages"], long_stage]):
        raw, smooth, *validation = ax.get_lines()
        assert [list(line.get_ydata()) for line in validation] == (
            [[loss for _, loss in stage["validation_curve"]]] if stage.get("validation_curve") else [])
        markers.add((raw.get_marker(), raw.get_markersize()))
        losses = [loss for _, loss in stage["loss_curve"]]
        assert list(raw.get_ydata()) == losses
        assert list(smooth.get_ydata()) == pytest.approx(smoothed(losses))
    assert len(markers) == 1
    assert smoothed([4.0, 2.0]) == pytest.approx([4.0, (0.6 * 0.4 * 4.0 + 0.4 * 2.0) / (1 - 0.36)])


def test_final_model_has_a_stable_path_and_the_next_commands_use_it(demo_run):
    import shlex

    output, report, text, printed = demo_run
    link = output / "model"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()   # the folder can move as a whole
    assert link.resolve() == Path(report["model"]["final_model"]).resolve()
    assert (link / "config.json").is_file() and report["model"]["link"] == str(link)
    medtune = shlex.split(shell_command())
    chat, serve, score = (shlex.split(command) for command in report["next_commands"])
    n = len(medtune)
    assert chat[:n + 2] == [*medtune, "chat", str(link)] and Path(chat[chat.index("--image") + 1]).is_file()
    assert serve == [*medtune, "serve", str(link)]
    assert score[:n + 2] == [*medtune, "eval", "run"] and score[score.index("--model") + 1] == str(link)
    for command in report["next_commands"]:
        assert command in text and f"  {command}" in printed
    assert f"final model: {link} (-> {report['model']['final_model']})" in printed


def test_next_commands_run_as_printed_from_the_shell_that_ran_the_demo(demo, tmp_path):
    """The chat and score commands, pasted into a shell (this process's PATH, where the venv may not be
    active), run; chat reads one question and leaves at the end of its input."""
    import os
    import subprocess

    _, report, _ = demo
    chat, _, score = report["next_commands"]
    env = {**os.environ, "MEDTUNE_CACHE": os.environ.get("MEDTUNE_CACHE", str(tmp_path / "cache"))}
    talked = subprocess.run(chat, shell=True, input="What organ is shown?\n/quit\n", capture_output=True,
                            text=True, timeout=300, env=env)
    assert talked.returncode == 0, talked.stderr
    # a second --out (the last one wins) keeps the demo's folder as the fixture left it
    scored = subprocess.run(f"{score} --out {tmp_path / 'eval'} --limit 4", shell=True, capture_output=True,
                            text=True, timeout=300, env=env)
    assert scored.returncode == 0, scored.stderr
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 4


def test_two_runs_with_one_seed_give_the_same_figures(demo, tmp_path):
    """Same seed, same (fixed) thread count, another folder: every figure and loss equal, not just close."""
    _, first, _ = demo
    assert run_demo(tmp_path / "again") == 0
    again = strict_json((tmp_path / "again" / "report.json").read_text(encoding="utf-8"))
    assert again["headline"] == first["headline"]
    assert again["validation"]["headline"] == first["validation"]["headline"]
    assert ([s["loss_curve"] for s in again["training"]["stages"]]
            == [s["loss_curve"] for s in first["training"]["stages"]])


@pytest.mark.parametrize("argv0, on_path, expected", [
    ("venv/bin/medtune", True, "medtune"),                 # the venv is active: the plain name runs it
    ("venv/bin/medtune", False, "venv/bin/medtune"),       # make demo's shell: the venv is not on PATH
    ("-m", False, "PYTHON -m medtune"),                    # python -m medtune, no entry script beside python
])
def test_the_printed_medtune_command_is_the_one_this_shell_runs(tmp_path, monkeypatch, argv0, on_path, expected):
    import shlex
    import sys

    entry = tmp_path / "venv" / "bin" / "medtune"
    entry.parent.mkdir(parents=True)
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python" if argv0 == "-m" else entry.parent / "python"))
    search = str(entry.parent) if on_path else str(tmp_path / "empty")
    got = shell_command(argv0=str(entry) if argv0 != "-m" else "/x/__main__.py", search_path=search)
    assert got == expected.replace("PYTHON", shlex.quote(sys.executable))


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
    assert [b.split("]")[0] for b in banners] == [f"== medtune demo [{i}/7" for i in range(1, 8)]
    assert "reusing converted data" in printed
    assert printed.count("reusing stage") == 2
    assert "reusing 451 answers" in printed and f"reusing {first['validation']['n']} answers" in printed
    assert {path: path.stat().st_mtime_ns for path in before} == before
    second = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert second["headline"] == first["headline"] and second["per_organ"] == first["per_organ"]
    assert [t["status"] for t in second["timings"]["phases"]][:4] == ["reused"] * 4
    # the report still says how long each reused phase took when it ran
    ran = {t["phase"]: t["seconds"] for t in first["timings"]["phases"]}
    assert all(t["first_run_seconds"] == ran[t["phase"]] for t in second["timings"]["phases"][:4])


def test_other_settings_train_their_own_model_and_max_test_subsets(demo, monkeypatch):
    import medtune.eval.backends as backends

    loads = []
    local_backend = backends.LocalBackend
    monkeypatch.setattr(backends, "LocalBackend", lambda *a, **k: loads.append(a) or local_backend(*a, **k))
    output, first, _ = demo
    token_cache = sorted((output / "cache" / "tokens").iterdir())
    assert token_cache   # under --output, like everything else
    assert run_demo(output, "--steps-scale", "0.5", "--max-test", "16") == 0
    assert sorted((output / "cache" / "tokens").iterdir()) == token_cache   # same data: encoded data reused
    report = strict_json((output / "report.json").read_text(encoding="utf-8"))
    assert report["recipe"]["run_dir"] != first["recipe"]["run_dir"]
    assert [s["steps"] for s in report["training"]["stages"]] == [1, 1]
    # DIR/model now names this run's final model
    assert (output / "model").resolve() == Path(report["model"]["final_model"]).resolve()
    first16 = raw("test")[:16]
    assert report["evaluation"]["n"] == 16
    assert report["evaluation"]["answer_types"] == dict(Counter(answer_type(r) for r in first16))
    assert report["validation"]["n"] == 16   # --max-test caps the validation questions too
    # validation and test, each with and without images: four answer files, one model load
    assert len(loads) == 1 and report["results"]["model_blank_image"]
    # a shortened run says what it shows; the full run (the fixture's, scale 1) does not carry the note
    text = (output / "report.md").read_text(encoding="utf-8")
    assert "This run trained 0.5 of the recipe's steps" in text and "pipeline check" in text
    assert "of the recipe's steps" not in demo[2]
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


def test_the_report_says_whether_the_model_beats_the_better_baseline():
    from medtune.demo.report import verdict

    def line(answer_type, model, majority, prior, classifier):
        return {"family": "strict", "answer_type": answer_type, "metric": "accuracy",
                **{name: {"value": value} for name, value in (("model", model), ("majority", majority),
                                                               ("question_prior", prior),
                                                               ("question_classifier", classifier))}}
    blanked = line("closed", 52.0, 48.9, 51.1, 60.0) | {"model_blank_image": {"value": 50.5}}
    said = verdict([blanked, line("all", 33.0, 31.9, 33.5, 30.0)])
    assert "with its images blanked it scores 50.5 strict closed (+1.5 points from the images)" in said
    assert "blanked it scores" not in said.split("strict all accuracy the model does not beat")[1]
    assert "strict closed accuracy the model beats the better answer-prior baseline (52.0 vs 51.1)" in said
    assert "strict closed accuracy the model does not beat the question-only classifier (52.0 vs 60.0)" in said
    assert "strict all accuracy the model does not beat the better answer-prior baseline (33.0 vs 33.5)" in said
    assert "strict all accuracy the model beats the question-only classifier (33.0 vs 30.0)" in said
    assert verdict([]) == ""


def test_the_question_classifier_generalises_across_rephrasings_where_the_prior_cannot():
    from medtune.demo.baselines import AnswerPriors
    from medtune.data.schema import Sample

    def sample(sid, question, answer):
        return Sample.from_dict({"id": sid, "messages": [{"role": "user", "content": question},
                                                          {"role": "assistant", "content": answer}],
                                 "meta": {"answer_type": "closed", "answer": answer}})
    train = [sample(str(i), q, a) for i, (q, a) in enumerate(
        [("is there a fracture of the rib", "yes"), ("is a rib fracture present", "yes"),
         ("fracture of the rib seen", "yes"), ("is the liver normal", "no"), ("is the kidney normal", "no"),
         ("is the spleen normal", "no"), ("is the heart normal", "no")])]
    priors = AnswerPriors.learn(train)
    test = [sample("a", "is there a rib fracture", "yes"), sample("b", "is the bladder normal", "no")]
    assert priors.predict("question_prior", test) == {"a": "no", "b": "no"}   # unseen: the majority answer
    assert priors.predict("question_classifier", test) == {"a": "yes", "b": "no"}
    assert priors.predict("question_classifier", test) == AnswerPriors.learn(train).predict(
        "question_classifier", test)   # deterministic


def test_the_report_explains_length_grouped_batches_beside_the_loss_they_shape():
    from medtune.demo.report import batching_notes

    stages = [{"name": "align", "batch_size": 16, "group_by_length": False},
              {"name": "sft", "batch_size": 16, "group_by_length": 4},
              {"name": "more", "batch_size": 8, "group_by_length": True}]
    notes = [note for note in batching_notes({"training": {"stages": stages}}) if note]
    assert len(notes) == 2 and not any("align" in note for note in notes)
    assert notes[0].startswith("Stage sft groups its batches by length (`group_by_length: 4`): each run of 4 "
                               "batches is 64 random samples sorted by length")
    assert "with a period of 4 steps" in notes[0]
    assert "each run of 50 batches is 400 random samples" in notes[1]
