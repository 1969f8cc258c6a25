"""Each compat flavour against the table its reference script printed on the same answer file.

The printouts in ``fixtures/compat/`` were produced once by running each flavour's reference script at the
commit its :class:`medtune.eval.compat.Reference` names (see ``fixtures/compat/README.md``); the answer files
come from ``compat_answer_files.py``. Scoring here matches by question id, so the answers are shuffled first.
"""
import json
import random
import re

import pytest

from compat_answer_files import ANSWER_FILES, answer_lines, answer_path, candidates, printed_path
from medtune.cli import main
from medtune.eval import compat
from medtune.eval.score import score_predictions
from medtune.eval.tasks import get_task

CASES = [(name, flavour) for name in ANSWER_FILES for flavour in compat.FLAVOURS]
CLOSED, OPEN = 272, 179  # VQA-RAD test split
_COUNTS = re.compile(r"num_open (\d+) \|\| num_close (\d+)")


def reference_printout(name: str, flavour: str) -> tuple[list[tuple[str, float]], tuple[int, int] | None]:
    """The table's ``(label, value)`` lines, and LLaVA-Med's ``(num_open, num_close)`` as printed."""
    text = printed_path(name, flavour).read_text(encoding="utf-8")
    table = text[text.index("\n-") + 1:].splitlines()[1:]  # the lines below tabulate's dashed rule
    lines = [(label.strip(), float(value)) for label, value in (line.rsplit(maxsplit=1) for line in table if line)]
    counts = _COUNTS.search(text)
    return lines, (int(counts[1]), int(counts[2])) if counts else None


def shuffled_answers(name: str, tmp_path):
    lines = answer_path(name).read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def score(name: str, flavour: str, tmp_path, **options):
    wants_candidates = compat.get_flavour(flavour).open_accuracy
    return score_predictions(get_task("vqa-rad"), shuffled_answers(name, tmp_path), compat_flavour=flavour,
                             candidates=candidates() if wants_candidates else None, **options)


def test_answer_files_are_what_the_generator_writes():
    for name in ANSWER_FILES:
        assert answer_path(name).read_text(encoding="utf-8").splitlines() == answer_lines(name)


@pytest.mark.parametrize("name, flavour", CASES)
def test_figures_match_the_reference_printout(name, flavour, tmp_path):
    expected, _ = reference_printout(name, flavour)
    table = score(name, flavour, tmp_path).compat_table
    assert [line.label for line in table.lines] == [label for label, _ in expected]
    for line, (label, value) in zip(table.lines, expected):
        assert line.value == pytest.approx(value, abs=0.01), label


@pytest.mark.parametrize("name, flavour", CASES)
def test_denominators_match_the_reference_counts(name, flavour, tmp_path):
    lines = {line.label: line for line in score(name, flavour, tmp_path).compat_table.lines}
    _, counts = reference_printout(name, flavour)
    closed = lines["yes/no accuracy"]
    if counts is None:  # Med-MoE prints no counts and counts every closed question
        assert (closed.n, closed.excluded) == (CLOSED, 0)
        return
    # LLaVA-Med prints the counts swapped: "num_open" is the closed denominator, "num_close" the open one.
    num_open, num_close = counts
    assert closed.n == num_open
    assert closed.n + closed.excluded == CLOSED
    assert {line.n for label, line in lines.items() if label != "yes/no accuracy"} == {num_close} == {OPEN}


def test_only_the_initial_release_drops_wrong_yes_no_answers(tmp_path):
    v1 = {line.label: line for line in score("awkward", "llava-med", tmp_path).compat_table.lines}
    init = {line.label: line for line in score("awkward", "llava-med-init", tmp_path).compat_table.lines}
    assert (v1["yes/no accuracy"].n, v1["yes/no accuracy"].excluded) == (CLOSED, 0)
    assert init["yes/no accuracy"].excluded > 0  # the file has wrong yes/no answers
    hits = round(v1["yes/no accuracy"].value * CLOSED / 100)
    assert init["yes/no accuracy"].value == pytest.approx(100 * hits / init["yes/no accuracy"].n)
    assert all(v1[label].value == init[label].value for label in v1 if label != "yes/no accuracy")


@pytest.mark.parametrize("flavour", list(compat.FLAVOURS))
def test_cli_reports_record_the_reference_and_each_denominator(flavour, tmp_path):
    out = tmp_path / "report"
    argv = ["eval", "score", str(shuffled_answers("awkward", tmp_path)), "--task", "vqa-rad",
            "--compat-flavour", flavour, "--out", str(out)]
    if flavour == "llava-med":
        (tmp_path / "candidate.json").write_text(json.dumps({"0": candidates()}))
        argv += ["--candidates", str(tmp_path / "candidate.json")]
    assert main(argv) == 0
    reference = compat.get_flavour(flavour).reference
    table = json.loads((out / "results.json").read_text())["compat_table"]
    assert table["reference"]["commit"] == reference.commit
    assert table["reference"]["repository"] == reference.repository
    expected = dict(reference_printout("awkward", flavour)[0])
    answer_type = {label: kind for kind, _, label in compat.get_flavour(flavour).labels}
    for line in table["lines"]:
        assert line["value"] == pytest.approx(expected[line["label"]], abs=0.01)
        assert line["n"] + line["excluded"] == {"closed": CLOSED, "open": OPEN}[answer_type[line["label"]]]
    markdown = (out / "results.md").read_text()
    assert f"`{reference.commit}`" in markdown
    closed = next(line for line in table["lines"] if line["label"] == "yes/no accuracy")
    excluded = f" ({closed['excluded']} excluded)" if closed["excluded"] else ""
    assert f"| yes/no accuracy | {closed['printed']} | {closed['n']}{excluded} |" in markdown
