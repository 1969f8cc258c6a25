"""`eval run` + `eval score` on every benchmark reader's fixture through a tiny model, and `eval suite medmax-12`
writing one report with a row per task (n, score, interval) and the macro average."""
import json

import pytest
import suite_fixtures
from run_helpers import answering_model, predictions, report_rows

from medtune.cli import main
from medtune.eval.backends import LocalBackend
from medtune.eval.run import run_task
from medtune.eval.tasks import get_task

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return answering_model(tmp_path_factory.mktemp("models") / "answering-tiny")


@pytest.fixture(scope="module")
def backend(model_dir):
    from medtune.models.build import load_vlm
    return LocalBackend(load_vlm(model_dir))


@pytest.mark.parametrize("make", suite_fixtures.ALL, ids=lambda make: make.__name__)
def test_run_then_score_each_benchmark(make, backend, tmp_path, capsys):
    fixture = make(tmp_path / "data")
    families = ("vlmevalkit", "letter", "strict")
    task = get_task(fixture.task, data=fixture.path)
    result = run_task(task, backend, tmp_path / "run", batch_size=4, families=families, progress=False)
    answered = predictions(tmp_path / "run")
    assert set(answered) == set(fixture.expected) and result.score is not None
    assert main(["eval", "score", str(tmp_path / "run" / "predictions.jsonl"), "--task", fixture.task,
                 "--data", str(fixture.path), "--metrics", ",".join(families), "--out", str(tmp_path / "score")]) == 0
    rows = {(r["family"], r["answer_type"], r["metric"]): r for r in report_rows(tmp_path / "score")
            if r["group_by"] == "all"}
    assert rows == {(r["family"], r["answer_type"], r["metric"]): r for r in report_rows(tmp_path / "run")
                    if r["group_by"] == "all"}  # a run's report equals its rescoring
    n_mcq = sum(1 for answer, choices, _ in fixture.expected.values() if choices)
    if n_mcq:
        assert rows[("vlmevalkit", "mcq", "accuracy")]["n"] == n_mcq
        assert rows[("letter", "mcq", "accuracy")]["n"] == n_mcq
        routes = json.loads((tmp_path / "score" / "results.json").read_text())["mcq_routes"]
        assert sum(routes.values()) == n_mcq
    else:
        assert sum(r["n"] for k, r in rows.items() if k[0] == "strict" and k[1] != "all" and
                   k[2] in ("accuracy", "exact")) == len(fixture.expected)


def test_medmax_12_suite_report_lists_every_task(model_dir, tmp_path, capsys):
    from medtune.data.formats.medmax_eval import TASKS

    folder = tmp_path / "medmax_eval_data"
    records = []
    for i, (name, kind) in enumerate(TASKS):
        image = suite_fixtures.write_png(folder / "images" / f"e{i}.png", 20 * i)
        prompt = "Which one?\nA: CT\nB: MRI\nC: X-ray\nD: PET" if kind == "mcq" else f"Question {i}?"
        answer = {"mcq": "B", "closed": "yes" if i % 2 else "no", "open": "liver"}[kind]
        for copy in range(2):
            records.append({"task_name": name, "question_type": kind, "prompt": prompt, "answer": answer,
                            "image_path": f"images/{image}"})
    data = folder / "medmax_eval_data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "suite"
    assert main(["eval", "suite", "medmax-12", "--model", str(model_dir), "--device", "cpu", "--data", str(data),
                 "--out", str(out), "--batch-size", "4"]) == 0
    report = json.loads((out / "suite.json").read_text())
    rows = {r["task"]: r for r in report["rows"]}
    assert list(rows) == [f"{name}-{kind}" for name, kind in TASKS] + ["macro average"]
    for name, kind in TASKS:
        row = rows[f"{name}-{kind}"]
        assert {"n", "value", "ci_low", "ci_high"} <= set(row)
        if kind == "open":  # no judge: MedMax's open answers are not judged, and say so
            assert row["n"] == 0 and row["excluded"] == 2 and row["value"] is None
        else:
            assert row["n"] == 2 and 0 <= row["ci_low"] <= row["value"] <= row["ci_high"] <= 100
            assert (out / f"{name}-{kind}" / "predictions.jsonl").is_file()
    macro = rows["macro average"]
    scored = [r["value"] for r in report["rows"][:-1] if r["value"] is not None]
    assert macro["n"] == 8 and macro["value"] == pytest.approx(sum(scored) / len(scored))
    assert macro["ci_low"] <= macro["value"] <= macro["ci_high"]
    markdown = (out / "suite.md").read_text()
    assert all(f"| {name}-{kind} |" in markdown for name, kind in TASKS) and "| macro average |" in markdown


def test_suite_without_its_data_names_the_tasks(model_dir, tmp_path, capsys):
    assert main(["eval", "suite", "gmai", "--model", str(model_dir), "--out", str(tmp_path)]) == 2
    assert "gmai-mmbench, omnimedvqa, mmmu-medical" in capsys.readouterr().err


@pytest.mark.parametrize("make", [suite_fixtures.mmmu_parquet, suite_fixtures.quilt_parquet],
                         ids=lambda make: make.__name__)
def test_eval_run_cli_reads_the_parquet_release_as_downloaded(make, model_dir, tmp_path, capsys):
    fixture = make(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["eval", "run", "--task", fixture.task, "--data", str(fixture.path), "--model", str(model_dir),
                 "--device", "cpu", "--out", str(out), "--metrics", "strict"]) == 0
    assert set(predictions(out)) == set(fixture.expected)
    assert main(["eval", "score", str(out / "predictions.jsonl"), "--task", fixture.task, "--data", str(fixture.path),
                 "--metrics", "strict", "--out", str(tmp_path / "score")]) == 0
    assert report_rows(tmp_path / "score") == report_rows(out)
