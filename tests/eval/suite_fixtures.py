"""Tiny files in each benchmark's released layout (see each reader's docstring for where the layout comes from),
written into a folder with 32 px PNG images, plus what each one must read back as.

The ``*_parquet`` fixtures are the Hugging Face releases' Parquet files: written with pyarrow, images as the
``struct<bytes: binary, path: string>`` that ``datasets.Image`` stores, one picture shared by two rows."""
import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


def png_bytes(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (shade, 255 - shade, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, shade: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(shade))
    return path.name


@dataclass
class Fixture:
    """A benchmark file, its format and task, and what it must read back as, by question id:
    ``{id: (answer, choices or None, image count)}``."""

    task: str
    format: str
    path: Path
    expected: dict


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def quilt(root: Path) -> Fixture:
    folder = root / "quilt"
    for i in range(3):
        write_png(folder / "images" / f"q{i}.png", 40 * i)
    records = [
        {"question_id": "qv-0", "image": "q0.png", "answer_type": "CLOSED",
         "conversations": [{"from": "human", "value": "<image>\nIs there necrosis?"}, {"from": "gpt", "value": "yes"}]},
        {"question_id": "qv-1", "image": "q1.png", "answer_type": "OPEN",
         "conversations": [{"from": "human", "value": "<image>\nWhat tissue is this?"},
                           {"from": "gpt", "value": "lymph node"}]},
        {"question_id": "qv-2", "image": "q2.png", "answer_type": "OPEN",
         "conversations": [{"from": "human", "value": "<image>\nWhat stain is used?"},
                           {"from": "gpt", "value": "h and e"}]},
    ]
    path = folder / "quiltvqa_test_w_ans.json"
    path.write_text(json.dumps(records, indent=1))
    return Fixture("quilt-vqa", "quilt-vqa", path, {"qv-0": ("yes", None, 1), "qv-1": ("lymph node", None, 1),
                                                     "qv-2": ("h and e", None, 1)})


def omnimedvqa(root: Path) -> Fixture:
    base = root / "OmniMedVQA"
    records = []
    for i, (answer, options) in enumerate([("CT", ["MRI", "CT", "X-ray", "PET"]), ("Lung", ["Lung", "Liver"]),
                                           ("Normal", ["Tumour", "Cyst", "Normal"])]):
        write_png(base / "Images" / "Chest" / f"o{i}.png", 60 + 30 * i)
        records.append({"dataset": "Chest", "question_id": f"omni-{i}", "question_type": "Modality Recognition",
                        "question": "What is shown?", "gt_answer": answer, "image_path": f"Images/Chest/o{i}.png",
                        "modality_type": "CT", **{f"option_{'ABCD'[j]}": o for j, o in enumerate(options)}})
    path = base / "QA_information" / "Open-access" / "Chest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(records, indent=2))
    return Fixture("omnimedvqa", "omnimedvqa", path, {"omni-0": ("CT", ["MRI", "CT", "X-ray", "PET"], 1),
                                                       "omni-1": ("Lung", ["Lung", "Liver"], 1),
                                                       "omni-2": ("Normal", ["Tumour", "Cyst", "Normal"], 1)})


def pathmmu(root: Path) -> Fixture:
    folder = root / "PathMMU"
    for i in range(3):
        write_png(folder / "images" / f"p{i}.png", 20 + 50 * i)
    question = {"question": "Which pattern is seen?", "options": ["(A) Glandular", "(B) Solid", "(C) Papillary"]}
    data = {"Atlas": {"val": [{"No": 1, **question, "answer": "B) Solid", "img": "p0.png"}],
                      "test": [{"No": 1, **question, "answer": "C", "img": "p1.png"}]},
            "PubMed": {"test_tiny": [{"No": 7, **question, "answer": "A", "img": "p2.png"}]}}
    path = folder / "data.json"
    path.write_text(json.dumps(data, indent=4))
    choices = ["Glandular", "Solid", "Papillary"]
    return Fixture("pathmmu", "pathmmu", path, {"Atlas_val-1": ("Solid", choices, 1),
                                                "Atlas_test-1": ("Papillary", choices, 1),
                                                "PubMed_test_tiny-7": ("Glandular", choices, 1)})


def probmed(root: Path) -> Fixture:
    folder = root / "ProbMed"
    records = []
    for i, (qa_type, answer) in enumerate([("modality_gt", "yes"), ("modality_hallu", "no"), ("abnormality", "no")]):
        image = write_png(folder / f"img{i // 2}.png", 100 + i)
        records.append({"id": 10 + i // 2, "image": image, "image_type": "x-ray_chest",
                        "question": "Is this an x-ray?", "gt_ans": answer, "qa_type": qa_type})
    path = folder / "probmed.json"
    path.write_text(json.dumps(records, indent=2))
    return Fixture("probmed", "probmed", path, {"10-modality_gt": ("yes", None, 1), "10-modality_hallu": ("no", None, 1),
                                                "11-abnormality": ("no", None, 1)})


def medxpertqa(root: Path) -> Fixture:
    folder = root / "MedXpertQA"
    records = []
    expected = {}
    for i, label in enumerate("ACE"):
        names = [write_png(folder / "images" / f"MM-{i}-{k}.png", 30 * i + k) for k in range(1 + i % 2)]
        options = {letter: f"Diagnosis {letter}{i}" for letter in "ABCDE"}
        choices_text = " ".join(f"({k}) {v}" for k, v in options.items())
        records.append({"id": f"MM-{i}", "question": f"A patient presents. What is it?\nAnswer Choices: {choices_text}",
                        "options": options, "label": label, "images": names, "medical_task": "Diagnosis",
                        "body_system": "Skin", "question_type": "Reasoning"})
        expected[f"MM-{i}"] = (options[label], list(options.values()), len(names))
    return Fixture("medxpertqa-mm", "medxpertqa", _jsonl(folder / "MM" / "test.jsonl", records), expected)


def mmmu(root: Path) -> Fixture:
    folder = root / "MMMU"
    records = []
    for i, subject in enumerate(["Clinical_Medicine", "Pharmacy", "Art", "Clinical_Medicine"]):
        split = "validation" if i < 3 else "test"
        image = write_png(folder / f"m{i}.png", 70 + i)
        records.append({"id": f"{split}_{subject}_{i + 1}", "question": "<image 1> Which structure is marked?",
                        "options": "['Aorta', 'Vena cava', 'Trachea']", "answer": "B" if split != "test" else "?",
                        "image_1": image, "image_2": None, "question_type": "multiple-choice",
                        "subfield": "Anatomy", "img_type": "['Diagrams']", "topic_difficulty": "Easy"})
    choices = ["Aorta", "Vena cava", "Trachea"]
    return Fixture("mmmu-medical", "mmmu", _jsonl(folder / "validation.jsonl", records),
                   {"validation_Clinical_Medicine_1": ("Vena cava", choices, 1),
                    "validation_Pharmacy_2": ("Vena cava", choices, 1)})


def vlmevalkit_rows(folder: Path, extra_column: str = "category") -> tuple[Path, dict]:
    """A VLMEvalKit TSV: base64 images, one row reusing another row's image by index, a hint."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", extra_column, "image"]
    rows, expected = [], {}
    for i in range(3):
        image = base64.b64encode(png_bytes(10 + 80 * i)).decode() if i != 2 else "0"
        options = [f"Finding {i}{k}" for k in range(4 if i else 3)]
        answer = "ABCD"[i]
        rows.append([str(i), f"What is seen {i}?", "Axial CT" if i == 1 else "", *options, *([""] * (4 - len(options))),
                     answer, "Lesion", image])
        expected[str(i)] = (options["ABCD".index(answer)], options, 1)
    path = folder / "Bench_VAL.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path, expected


def vlmevalkit(root: Path) -> Fixture:
    path, expected = vlmevalkit_rows(root / "LMUData")
    return Fixture("vlmevalkit", "vlmevalkit", path, expected)


def gmai(root: Path) -> Fixture:
    path, expected = vlmevalkit_rows(root / "GMAI", extra_column="modality")
    return Fixture("gmai-mmbench", "gmai-mmbench", path, expected)


def medmax_eval(root: Path) -> Fixture:
    folder = root / "medmax_eval_data"
    records, expected = [], {}
    tasks = [("vqa_rad", "closed", "Is there a fracture?", "yes"), ("vqa_rad", "open", "Which organ?", "liver"),
             ("pmc_vqa", "mcq", "Which modality?\nA: CT\nB: MRI\nC: X-ray\nD: PET", "B"),
             ("probmed", "closed", "Is this a brain MRI?", "no")]
    for i, (name, kind, prompt, answer) in enumerate(tasks):
        image = write_png(folder / "images" / f"e{i}.png", 5 + 40 * i)
        records.append({"task_name": name, "question_type": kind, "prompt": prompt, "answer": answer,
                        "image_path": f"images/{image}"})
        choices = ["CT", "MRI", "X-ray", "PET"] if kind == "mcq" else None
        expected[f"{name}-{kind}-{i + 1}"] = ("MRI" if kind == "mcq" else answer, choices, 1)
    return Fixture("medmax-eval", "medmax-eval", _jsonl(folder / "medmax_eval_data.jsonl", records), expected)


def image_cell(data: bytes | None, name: str = "") -> dict | None:
    return None if data is None else {"bytes": data, "path": name}


def write_parquet(path: Path, columns: dict[str, list], image_columns: tuple[str, ...] = (),
                  row_group_size: int | None = None) -> Path:
    """A Parquet file with ``columns`` (strings), the ``image_columns`` typed as ``datasets.Image`` stores them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({name: pa.array(values, type=image_type if name in image_columns else pa.string())
                      for name, values in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def mmmu_parquet(root: Path) -> Fixture:
    """MMMU/MMMU's ``<Subject>/validation-00000-of-00001.parquet``: two images on one question, one picture shared
    by two rows, an open question, image_3..7 null."""
    shared, second, third = png_bytes(11), png_bytes(120), png_bytes(200)
    choices = ["Aorta", "Vena cava", "Trachea"]
    columns = {
        "id": [f"validation_Clinical_Medicine_{i}" for i in (1, 2, 3)],
        "question": ["<image 1> <image 2> Which structure is marked?", "<image 1> Which one?", "<image 1> How many?"],
        "options": [str(choices), str(choices), "[]"], "explanation": ["", "", ""],
        "image_1": [image_cell(shared, "a.png"), image_cell(shared, "a.png"), image_cell(third, "c.png")],
        "image_2": [image_cell(second, "b.png"), None, None],
        **{f"image_{k}": [None, None, None] for k in range(3, 8)},
        "img_type": ["['Diagrams']"] * 3, "answer": ["B", "C", "5"], "topic_difficulty": ["Easy"] * 3,
        "question_type": ["multiple-choice", "multiple-choice", "open"], "subfield": ["Anatomy"] * 3,
    }
    path = write_parquet(root / "MMMU" / "Clinical_Medicine" / "validation-00000-of-00001.parquet", columns,
                         tuple(f"image_{k}" for k in range(1, 8)))
    return Fixture("mmmu-medical", "mmmu", path, {"validation_Clinical_Medicine_1": ("Vena cava", choices, 2),
                                                  "validation_Clinical_Medicine_2": ("Trachea", choices, 1),
                                                  "validation_Clinical_Medicine_3": ("5", None, 1)})


def quilt_parquet(root: Path) -> Fixture:
    """wisdomik/Quilt_VQA's table (image, question, answer, answer_type, context), rows 1 and 3 on one picture; an
    ``images/`` folder beside it (the unpacked zip) must not become the Parquet file's image root."""
    folder = root / "Quilt_VQA"
    (folder / "images").mkdir(parents=True)
    shared = png_bytes(33)
    columns = {"image": [image_cell(shared, "x.jpg"), image_cell(png_bytes(99), "y.jpg"), image_cell(shared, "x.jpg")],
               "question": ["Is there necrosis?", "What tissue is this?", "Is this benign?"],
               "answer": ["yes", "lymph node", "no"], "answer_type": ["CLOSED", "OPEN", "CLOSED"],
               "context": ["narration one", "narration two", "narration three"]}
    path = write_parquet(folder / "quilt_vqa.parquet", columns, ("image",), row_group_size=2)
    return Fixture("quilt-vqa", "quilt-vqa", path, {"quilt_vqa-1": ("yes", None, 1), "quilt_vqa-2": ("lymph node", None, 1),
                                                    "quilt_vqa-3": ("no", None, 1)})


def medmax_eval_parquet(root: Path) -> Fixture:
    """mint-medmax/medmax_eval_data's ``data/train-00000-of-00001.parquet`` (text only: images by path)."""
    jsonl = medmax_eval(root / "jsonl")
    records = [json.loads(line) for line in jsonl.path.read_text().splitlines()]
    folder = root / "medmax_eval_data" / "data"
    for record in records:
        (folder / record["image_path"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / record["image_path"]).write_bytes((jsonl.path.parent / record["image_path"]).read_bytes())
    columns = {key: [r[key] for r in records] for key in records[0]}
    path = write_parquet(folder / "train-00000-of-00001.parquet", columns)
    return Fixture("medmax-eval", "medmax-eval", path, jsonl.expected)


ALL = (quilt, omnimedvqa, pathmmu, probmed, medxpertqa, mmmu, vlmevalkit, gmai, medmax_eval,
       mmmu_parquet, quilt_parquet, medmax_eval_parquet)
