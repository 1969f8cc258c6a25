"""Crafted, awkward inputs on which medtune's reference-rule families are compared with the reference scripts.

Each benchmark below is written as the file its reference script reads, plus the answers a model is said to
have given; ``fixtures/reference/`` holds what the reference scripts made of them (see its README for how).
Deterministic: ``python tests/eval/reference_cases.py DIR`` writes every input file into ``DIR``.

* ``VLMEVALKIT``: three VLMEvalKit TSVs (option cells, the answer letter, a prediction per row). Several files,
  because pandas infers a type per column: a column of numbers becomes int or float, of True/False bool.
* ``PROBMED``: a ProbMed response file (``probmed.json`` rows with a ``response``) over several image types,
  with images lacking entity or grounding questions (the script weights by all images of a type).
* ``MEDMAX``: MedMax evaluation rows (closed and mcq) with truths as the release file might write them.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

LETTERS = "ABCDE"
FINDINGS = ["pleural effusion", "pneumothorax", "cardiomegaly", "normal"]

# (options A..E, as cells; "" is an empty cell), truth letter, prediction
TEXT_CASES: list[tuple[list[str], str, str]] = [
    (FINDINGS, "B", "B"),
    (FINDINGS, "B", "(B)"),
    (FINDINGS, "B", "Answer: B"),
    (FINDINGS, "B", "Answer:B"),
    (FINDINGS, "B", "**B**"),
    (FINDINGS, "B", "The answer is B because the lung edge is visible."),
    (FINDINGS, "B", "b"),
    (FINDINGS, "B", "(b)"),
    (FINDINGS, "B", " B "),
    (FINDINGS, "B", "A or B"),
    (FINDINGS, "B", "B\nC"),
    (FINDINGS, "B", "Answer: A, B"),
    (FINDINGS, "A", "A lesion is visible"),
    (FINDINGS, "B", "A lesion is visible"),
    (FINDINGS, "B", "It shows a pneumothorax"),
    (FINDINGS, "B", "PNEUMOTHORAX"),
    (FINDINGS, "B", "pneumothorax or cardiomegaly"),
    (FINDINGS, "B", "Cannot determine the answer, maybe pneumothorax"),
    (FINDINGS, "B", "Cannot determine the answer. B"),
    (FINDINGS, "B", "Sorry, I can't help with images of people yet. B"),
    (FINDINGS, "B", "I'm sorry, but without the image provided I would guess pneumothorax"),
    (FINDINGS, "B", "I can't process this file."),
    (FINDINGS, "B", "Z pneumothorax"),
    (FINDINGS, "B", "Z. None of them; maybe pneumothorax"),
    (FINDINGS, "B", "Z"),
    (FINDINGS, "B", "Z B"),
    (FINDINGS, "B", "Failed to obtain answer via API. B"),
    (FINDINGS, "B", "Failed to obtain answer via API, pneumothorax"),
    (FINDINGS, "B", ""),
    (FINDINGS, "B", "None"),
    (FINDINGS, "B", "N/A"),
    (FINDINGS, "B", "nan"),
    (FINDINGS, "B", "=1+1"),
    (FINDINGS, "D", "normal"),
    (["None", "pneumothorax", "normal", "cardiomegaly"], "A", "None"),
    (["None", "pneumothorax", "normal", "cardiomegaly"], "A", "A"),
    (["None", "pneumothorax", "normal", "cardiomegaly"], "B", "B"),
    (["NA", "lung", "liver", "spleen"], "B", "B"),
    (["NA", "lung", "liver", "spleen"], "A", "A"),
    (["lung", "N/A", "liver", "spleen"], "C", "liver"),
    (["lung", "liver", "null", "#N/A"], "B", "B"),
    (["lung", "liver", "null", "#N/A"], "B", "C"),
    (["na", "lung", "liver", "spleen"], "A", "N/A"),
    (["na", "lung", "liver", "spleen"], "A", "NA"),
    (["pneumothorax", "cardiomegaly", "normal", "normal"], "D", "D"),
    (["pneumothorax", "cardiomegaly", "normal", "normal"], "D", "C"),
    (["pneumothorax", "cardiomegaly", "normal", "normal"], "C", "C"),
    (["pneumothorax", "cardiomegaly", "normal", "normal"], "C", "normal"),
    (["effusion", "pleural effusion", "atelectasis", "mass"], "B", "pleural effusion"),
    (["effusion", "pleural effusion", "atelectasis", "mass"], "A", "an effusion"),
    (["yes", "no", "", ""], "B", "no"),
    (["yes", "no", "", ""], "B", "I don't know"),
    (["yes", "no", "", ""], "A", "Yes."),
    (["C. difficile colitis", "(a) left lobe", "T2-weighted MRI", "3+ edema"], "A", "c. difficile colitis"),
    (["C. difficile colitis", "(a) left lobe", "T2-weighted MRI", "3+ edema"], "B", "(a) left lobe"),
    (["C. difficile colitis", "(a) left lobe", "T2-weighted MRI", "3+ edema"], "C", "t2-weighted mri"),
    (["épanchement pleural", "pneumothorax", "肺结节", "Ödem"], "A", "ÉPANCHEMENT PLEURAL"),
    (["épanchement pleural", "pneumothorax", "肺结节", "Ödem"], "C", "可见肺结节"),
    (["épanchement pleural", "pneumothorax", "肺结节", "Ödem"], "D", "ödem"),
    ([" pneumothorax", "cardiomegaly", "normal", "mass"], "A", "pneumothorax"),
    ([" pneumothorax", "cardiomegaly", "normal", "mass"], "A", "a pneumothorax"),
    (["He said \"yes\"", "it's 'no'", "tab\tinside", "x"], "A", "he said \"yes\""),
    (["1", "2", "3", "4"], "C", "3"),
    (["10", "2.5", "0", "-1"], "B", "2.5"),
    (FINDINGS + ["none of the above"], "E", "E"),
    (FINDINGS + ["none of the above"], "E", "none of the above"),
    (FINDINGS + ["none of the above"], "D", "E. none of the above, D"),
    (["lung", "liver", "", "spleen"], "D", "D"),
    (["lung", "liver", "", "spleen"], "D", "spleen"),
]

# Whole columns of numbers: pandas reads them as int (no gaps) or float (a gap, or a decimal somewhere).
NUMBER_CASES: list[tuple[list[str], str, str]] = [
    (["1", "2", "3", "4"], "A", "1"),
    (["1", "2", "3", "4"], "B", "2"),
    (["01", "20", "30", "40"], "A", "01"),
    (["01", "20", "30", "40"], "A", "1"),
    (["0.5", "1.5", "4", ""], "B", "1.5"),
    (["3", "7", "8", ""], "A", "3"),
    (["3", "7", "8", ""], "C", "8"),
    (["2", "3", "5", "NA"], "D", "NA"),
    (["1e3", "5", "6", "9"], "A", "1000"),
    (["1e3", "5", "6", "9"], "A", "1e3"),
    (["2", "3", "5", "7"], "C", "5"),
    (["2", "3", "5", "7"], "C", "C"),
]

# Whole columns of True/False: pandas reads them as bool.
BOOL_CASES: list[tuple[list[str], str, str]] = [
    (["True", "False", "", ""], "A", "true"),
    (["TRUE", "FALSE", "", ""], "B", "FALSE"),
    (["true", "false", "", ""], "A", "It is True"),
    (["True", "False", "", ""], "B", "B"),
]

VLMEVALKIT = {"text": TEXT_CASES, "numbers": NUMBER_CASES, "bools": BOOL_CASES}

# ProbMed rows: (image id, image_type, qa_type, gt_ans, response). Image types differ in how many images lack
# entity / grounding questions, which is what the script's weighting depends on.
PROBMED: list[tuple[str, str, str, str, str]] = [
    ("1", "x-ray_chest", "modality", "yes", "Yes"), ("1", "x-ray_chest", "modality_hallu", "no", "No."),
    ("1", "x-ray_chest", "body_part", "yes", "yes"), ("1", "x-ray_chest", "body_part_hallu", "no", "Yes"),
    ("1", "x-ray_chest", "abnormality", "yes", "Yes, there is."),
    ("1", "x-ray_chest", "entity_gt_1", "yes", "Yes"), ("1", "x-ray_chest", "entity_hallu_1", "no", "No"),
    ("1", "x-ray_chest", "entity_gt_2", "yes", "Yes"), ("1", "x-ray_chest", "entity_hallu_2", "no", "yes"),
    ("1", "x-ray_chest", "grounding_gt_1", "yes", "Yes"), ("1", "x-ray_chest", "grounding_hallu_1", "no", "No"),
    ("2", "x-ray_chest", "modality", "yes", "No"), ("2", "x-ray_chest", "modality_hallu", "no", "No"),
    ("2", "x-ray_chest", "body_part", "yes", "Yes"), ("2", "x-ray_chest", "body_part_hallu", "no", "No"),
    ("2", "x-ray_chest", "abnormality", "no", "no."),
    ("3", "x-ray_chest", "modality", "yes", "Yes"), ("3", "x-ray_chest", "modality_hallu", "no", "no"),
    ("3", "x-ray_chest", "abnormality", "no", "No"),
    ("3", "x-ray_chest", "entity_hallu", "no", "No"),
    ("4", "ct_scan_brain", "modality", "yes", "YES"), ("4", "ct_scan_brain", "modality_hallu", "no", "NO"),
    ("4", "ct_scan_brain", "body_part", "yes", "Yes."), ("4", "ct_scan_brain", "body_part_hallu", "no", "No, it is not"),
    ("4", "ct_scan_brain", "abnormality", "yes", "No"),
    ("4", "ct_scan_brain", "entity_gt_1", "yes", "Yes"), ("4", "ct_scan_brain", "entity_hallu_1", "no", "No"),
    ("4", "ct_scan_brain", "grounding_gt_1", "yes", "Yes"), ("4", "ct_scan_brain", "grounding_hallu_1", "no", "Yes"),
    ("4", "ct_scan_brain", "grounding_gt_2", "yes", "Yes"), ("4", "ct_scan_brain", "grounding_hallu_2", "no", "No"),
    ("5", "ct_scan_brain", "modality", "yes", "yes."), ("5", "ct_scan_brain", "modality_hallu", "no", "No"),
    ("5", "ct_scan_brain", "body_part", "yes", "Yes"), ("5", "ct_scan_brain", "body_part_hallu", "no", "No"),
    ("5", "ct_scan_brain", "abnormality", "yes", "Yes"),
    ("5", "ct_scan_brain", "entity_gt_3", "yes", "No"), ("5", "ct_scan_brain", "entity_hallu_3", "no", "No"),
    ("5", "ct_scan_brain", "grounding_gt_1", "yes", "Yes"), ("5", "ct_scan_brain", "grounding_hallu_1", "no", "No"),
    ("6", "ct_scan_brain", "modality", "yes", "Yes"), ("6", "ct_scan_brain", "modality_hallu", "no", "No"),
    ("6", "ct_scan_brain", "abnormality", "no", "No"),
    ("7", "ct_scan_brain", "modality", "yes", "Yes"), ("7", "ct_scan_brain", "modality_hallu", "no", "No"),
    ("7", "ct_scan_brain", "body_part", "yes", "Yes"),
    ("7", "ct_scan_brain", "abnormality", "no", "No"),
    ("8", "mri_knee", "modality", "yes", "Yes"), ("8", "mri_knee", "modality_hallu", "no", "No"),
    ("8", "mri_knee", "body_part", "yes", "Yes"), ("8", "mri_knee", "body_part_hallu", "no", "No"),
    ("8", "mri_knee", "abnormality", "yes", "Yes"),
    ("8", "mri_knee", "entity_gt_1", "yes", "Yes"), ("8", "mri_knee", "entity_hallu_1", "no", "No"),
    ("8", "mri_knee", "grounding_gt_1", "yes", "Yes"), ("8", "mri_knee", "grounding_hallu_1", "no", "No"),
    ("9", "mri_knee", "modality", "yes", "Yes"), ("9", "mri_knee", "modality_hallu", "no", "Yes"),
    ("9", "mri_knee", "body_part", "yes", "Yes"), ("9", "mri_knee", "body_part_hallu", "no", "No"),
    ("9", "mri_knee", "abnormality", "yes", "Yes"),
    ("9", "mri_knee", "entity_gt_1", "yes", "Yes"), ("9", "mri_knee", "entity_hallu_1", "no", "Yes"),
    ("9", "mri_knee", "grounding_gt_2", "yes", "No"), ("9", "mri_knee", "grounding_hallu_2", "no", "No"),
    ("10", "mri_knee", "modality", "yes", "Yes"), ("10", "mri_knee", "modality_hallu", "no", "No"),
    ("10", "mri_knee", "abnormality", "no", "No"),
    ("11", "mri_knee", "modality", "yes", "Yes"), ("11", "mri_knee", "modality_hallu", "no", "No"),
    ("11", "mri_knee", "abnormality", "no", "No"),
    ("11", "mri_knee", "entity_hallu", "no", "Yes"),
    ("12", "mri_knee", "modality", "Yes", "Yes"), ("12", "mri_knee", "modality_hallu", "No", "No"),
    ("12", "mri_knee", "abnormality", "No", "No"),
    ("12", "mri_knee", "entity_gt_1", "yes", "Yes"), ("12", "mri_knee", "entity_hallu_1", "no", "No"),
    ("13", "mri_knee", "modality", "yes", ""), ("13", "mri_knee", "modality_hallu", "no", "Yes, no"),
    ("13", "mri_knee", "body_part", "yes", "yes."), ("13", "mri_knee", "body_part_hallu", "no", "NO."),
    ("13", "mri_knee", "abnormality", "yes", "  Yes  "),
    ("13", "mri_knee", "grounding_gt_4", "yes", "Yes"), ("13", "mri_knee", "grounding_hallu_4", "no", "No"),
]

# MedMax rows: (question_type, answer as the release file writes it, generated text)
MEDMAX: list[tuple[str, str, str]] = [
    ("closed", "yes", "yes"), ("closed", "yes", "Yes"), ("closed", "no", "no"), ("closed", "no", "not"),
    ("closed", "no", "normal"), ("closed", "yes", "yesno"), ("closed", "Yes", "yes"), ("closed", "No", "no"),
    ("closed", " yes", "yes"), ("closed", "no ", "no"), ("closed", "yes", ""), ("closed", "left", "left"),
    ("mcq", "A", "A"), ("mcq", "A", "a"), ("mcq", "A", " A "), ("mcq", "A", "A."), ("mcq", "B", "(B"),
    ("mcq", "a", "A"), ("mcq", "a", "a"), ("mcq", " B", "B"), ("mcq", "(C)", "C"), ("mcq", "C", "C"),
    ("mcq", "D", "d"), ("mcq", "D", ""),
]
MEDMAX_OPTIONS = ["pleural effusion", "pneumothorax", "cardiomegaly", "normal"]


def vlmevalkit_rows(name: str) -> list[dict]:
    """The TSV rows of one crafted VLMEvalKit benchmark, with the columns GMAI-MMBench's evaluation reads."""
    rows = []
    for i, (options, truth, _) in enumerate(VLMEVALKIT[name]):
        row = {"index": str(i + 1), "question": f"Which option? ({name} {i + 1})"}
        row.update({LETTERS[k]: options[k] if k < len(options) else "" for k in range(len(LETTERS))})
        row.update({"answer": truth, "image_path": "x.png", "split": "VAL", "category": name,
                    "clinical vqa task": "crafted", "department": "radiology", "perceptual granularity": "image"})
        rows.append(row)
    return rows


def vlmevalkit_predictions(name: str) -> dict[str, str]:
    return {str(i + 1): prediction for i, (_, _, prediction) in enumerate(VLMEVALKIT[name])}


def write_tsv(path: Path, rows: list[dict]) -> None:
    """As pandas' ``to_csv(sep="\\t")`` writes a benchmark TSV: a cell is quoted only when it must be."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def probmed_rows() -> list[dict]:
    return [{"id": image, "image": f"{image}.png", "image_type": image_type, "question": f"{qa_type}?",
             "gt_ans": truth, "qa_type": qa_type, "response": response}
            for image, image_type, qa_type, truth, response in PROBMED]


def medmax_rows() -> list[dict]:
    rows = []
    for i, (kind, answer, _) in enumerate(MEDMAX):
        prompt = "Is there an effusion?" if kind == "closed" else (
            "Which finding?" + "".join(f"\n{LETTERS[k]}. {o}" for k, o in enumerate(MEDMAX_OPTIONS)))
        rows.append({"id": f"m{i}", "task_name": "crafted", "question_type": kind, "prompt": prompt,
                     "answer": answer, "image_path": "x.png"})
    return rows


def medmax_predictions() -> dict[str, str]:
    return {f"m{i}": generated for i, (_, _, generated) in enumerate(MEDMAX)}


def write_inputs(folder: Path) -> None:
    """Every input file the reference scripts and medtune read, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in VLMEVALKIT:
        write_tsv(folder / f"{name}.tsv", vlmevalkit_rows(name))
        (folder / f"{name}.predictions.json").write_text(json.dumps(vlmevalkit_predictions(name), indent=1,
                                                                    ensure_ascii=False), encoding="utf-8")
    (folder / "probmed_responses.json").write_text(json.dumps(probmed_rows(), indent=1), encoding="utf-8")
    (folder / "medmax_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in medmax_rows()), encoding="utf-8")
    (folder / "medmax.predictions.json").write_text(json.dumps(medmax_predictions(), indent=1), encoding="utf-8")


if __name__ == "__main__":
    write_inputs(Path(sys.argv[1]))
