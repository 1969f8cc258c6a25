"""Answer files for the compatibility-flavour fixtures, built from the bundled VQA-RAD test split.

``python tests/eval/compat_answer_files.py`` rewrites the two answer files in ``tests/eval/fixtures/compat/``;
with ``--reference-inputs DIR`` it also writes what the reference scripts read besides the answers (their
ground-truth JSON and a ``{"0": [...]}`` candidate file), so their printed tables can be produced again. The
printouts themselves (``*.printed.txt``) come from running the reference scripts, never from this module.

The files are LLaVA-Med answer files (``question_id``, ``prompt``, ``text``, ...) in ground-truth order, because
the reference scripts pair answers with questions by position. Both are deterministic:

``awkward``    one seeded pick per question among answers that separate the flavours: the truth, the truth
               with capitals and extra words, "normal" for "no", "abnormal" for "yes", both "yes" and "no",
               the wrong yes/no (alone and with words), "cannot tell" (which contains "no"), neither yes nor
               no, empty, and for open questions punctuation, number words and another question's answer.
``always-yes`` "Yes." for every question: the initial LLaVA-Med release leaves every closed question whose
               truth is not "yes" out of its yes/no accuracy, so this file scores 100 there.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "compat"
ANSWER_FILES = ("awkward", "always-yes")
SEED = 20  # any fixed value; changing it changes every stored printout

_YES_NO = {"yes": "no", "no": "yes"}


def _bundled(name: str) -> list[dict]:
    from medtune.paths import bundled_data

    return json.loads(bundled_data("vqa_rad", name).read_text(encoding="utf-8"))


def _closed_answer(truth: str, rng: random.Random) -> str:
    if truth in _YES_NO:
        wrong = _YES_NO[truth]
        return rng.choice([
            truth, f"{truth.capitalize()}.", f"I think the answer is {truth}, as the image shows.",
            "Normal.", "abnormal", "yes and no", "No, yes.",
            wrong, f"{wrong.capitalize()}, definitely.", f"The answer is {wrong}.",
            "Cannot tell.", "unclear", "",
        ])
    # Closed questions with a named answer ("mri", "left"): with or without a yes/no word.
    return rng.choice([truth, f"It is {truth}.", f"No, {truth}.", "yes", "unclear"])


def _open_answer(truth: str, other: str, rng: random.Random) -> str:
    return rng.choice([
        truth, f"{truth.upper()}.", f"The answer is {truth}.", f"{truth} and (maybe) something else",
        f"{truth}-like, two of them", other, "", "None", "1,000 cells", "dont know - maybe the liver?",
    ])


def answer_texts(name: str) -> list[tuple[dict, str]]:
    """``(ground-truth record, answer text)`` for every VQA-RAD test question, in file order."""
    records = _bundled("testset.json")
    if name == "always-yes":
        return [(record, "Yes.") for record in records]
    if name != "awkward":
        raise ValueError(f"unknown answer file {name!r} (expected one of {', '.join(ANSWER_FILES)})")
    rng = random.Random(SEED)
    open_truths = [str(r["answer"]) for r in records if r["answer_type"] == "OPEN"]
    out = []
    for record in records:
        truth = str(record["answer"])
        if record["answer_type"] == "CLOSED":
            out.append((record, _closed_answer(truth.lower(), rng)))
        else:
            out.append((record, _open_answer(truth, rng.choice(open_truths), rng)))
    return out


def answer_lines(name: str) -> list[str]:
    """The answer file's JSON lines (LLaVA-Med answer-file fields)."""
    return [json.dumps({"question_id": record["qid"], "prompt": record["question"], "text": text,
                        "answer_id": "fixture", "model_id": name, "metadata": {}})
            for record, text in answer_texts(name)]


def answer_path(name: str) -> Path:
    return FIXTURES / f"{name}.answers.jsonl"


def printed_path(name: str, flavour: str) -> Path:
    return FIXTURES / f"{name}.{flavour}.printed.txt"


def candidates() -> list[str]:
    """Every training and test answer, sorted: the candidate list given to LLaVA-Med's "open accuracy"."""
    return sorted({str(r["answer"]) for name in ("trainset.json", "testset.json") for r in _bundled(name)})


def reference_ground_truth() -> list[dict]:
    """The test split as the reference scripts read it: ``id``, ``conversations`` and ``answer_type``."""
    return [{"id": r["qid"], "image": r["image_name"], "answer_type": r["answer_type"],
             "conversations": [{"from": "human", "value": r["question"]}, {"from": "gpt", "value": str(r["answer"])}]}
            for r in _bundled("testset.json")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-inputs", type=Path, metavar="DIR",
                        help="also write test.json and candidate.json for running the reference scripts")
    args = parser.parse_args(argv)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name in ANSWER_FILES:
        answer_path(name).write_text("\n".join(answer_lines(name)) + "\n", encoding="utf-8")
    if args.reference_inputs:
        args.reference_inputs.mkdir(parents=True, exist_ok=True)
        (args.reference_inputs / "test.json").write_text(json.dumps(reference_ground_truth()), encoding="utf-8")
        (args.reference_inputs / "candidate.json").write_text(json.dumps({"0": candidates()}), encoding="utf-8")


if __name__ == "__main__":
    main()
