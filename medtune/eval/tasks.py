"""Evaluation tasks: where the questions come from, how each becomes a prompt, and how it is generated.

A :class:`Task` is data, not code: a data file read by one of medtune's format readers (the benchmark's
question id is the sample id), an image root, a prompt style, and generation settings per answer type.
Scoring is the same for every task (:mod:`medtune.eval.metrics`); only multiple-choice tasks get option
lists in their prompts. The prompt sent for every question is recorded in the predictions file, so a
reader can see exactly what the model was asked.

Built-in tasks (:data:`TASKS`):

``vqa-rad``   bundled VQA-RAD test split (451 questions, open + closed); needs no arguments.
``slake``     SLAKE English test split; the bundled question file is used when no ``data`` is given, the
              images (``imgs/``) must be supplied with ``image_root`` to generate answers.
``pathvqa``   PathVQA test split; ``data`` is required.
``pmc-vqa``   PMC-VQA style multiple choice; ``data`` is required.
``mcq``       any canonical file of multiple-choice questions (``meta.choices``), e.g. OmniMedVQA converted.
``custom``    any canonical file (or any format with ``data_format``) whose samples carry ``answer_type``.

The benchmark suite's tasks (each reads the file as released; see docs/evaluation.md for sources and rules):
``quilt-vqa`` (open + closed), ``omnimedvqa``, ``pathmmu``, ``gmai-mmbench`` (VAL TSV), ``medxpertqa-mm``,
``mmmu-medical`` (validation), ``vlmevalkit`` (any VLMEvalKit TSV) (multiple choice); ``probmed`` (closed, always
scored with ProbMed's paired accuracy: :mod:`medtune.eval.probmed`);
``medmax-eval`` (MedMax's evaluation release; ``task_name`` / ``question_type`` pick one of its twelve tasks,
whose prompts are sent verbatim). Suites of them: :mod:`medtune.eval.suite`.

Prompts: ``plain`` sends the question alone (the LLaVA-Med protocol, so compatibility numbers compare with
theirs); multiple-choice questions always list their options (once: the bare question ``meta.extra["question"]``
is used when a reader keeps one) and ask for the letter; a sample marked ``prompt_verbatim`` (MedMax's release)
is sent exactly as written. ``circular`` asks every multiple-choice question once per rotation of its options
(:mod:`medtune.eval.circular`).

Generation protocols: ``medtune`` (:data:`DEFAULT_SETTINGS`) or ``medmax``, MedMax's budgets (one token for
closed and multiple-choice answers, 60 for open ones; :mod:`medtune.eval.medmax`). Under ``medmax`` the
one-token budget is set per question from :attr:`Task.tokenizer`, the evaluated model's tokenizer, when the
runner knows it, and is MedMax's literal 1 when it does not (an HTTP endpoint).
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medtune.data.jsonl import RecordError, Tally
from medtune.data.schema import Sample
from medtune.eval import circular as circular_eval
from medtune.eval import medmax

# Closed and multiple-choice answers are short; the open budget leaves room for a sentence. Greedy decoding
# keeps runs reproducible.
DEFAULT_SETTINGS = {
    "open": {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0},
    "closed": {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0},
    "mcq": {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0},
}
PROMPT_STYLES = ("plain", "short", "llava-med", "med-moe")
# The seeds' evaluation scripts send the question alone, after the image, in the conversation mode the model was
# imported with (LLaVA-Med's llava/eval/model_vqa.py --conv-mode; Med-MoE's moellava/eval/model_vqa_med.py with
# phi / stablelm; their answer instructions are commented out): the templates each style may be rendered in.
SEED_PROMPT_TEMPLATES = {"llava-med": ("mistral_instruct", "vicuna_v1", "vicuna", "llava_llama_2"),
                         "med-moe": ("phi", "stablelm")}
PROTOCOLS = ("medtune", "medmax")
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."


class TaskDataMissing(FileNotFoundError):
    """A task's data is not where it should be; the message says what to pass."""


@dataclass
class Task:
    """One benchmark: its questions, prompts and generation settings."""

    name: str
    data_path: Path
    data_format: str
    image_root: Path | None = None
    prompt_style: str = "plain"
    settings: dict[str, dict] | None = None
    """Per answer type; default: the protocol's."""
    reader_options: dict = field(default_factory=dict)
    protocol: str = "medtune"
    tokenizer: Any = field(default=None, repr=False, compare=False)
    """The evaluated model's tokenizer, for the ``medmax`` protocol's per-tokenizer answer budget."""
    circular: bool = False
    """Ask each multiple-choice question once per rotation of its options (ids ``<id>@circular<r>``)."""
    scoring_families: tuple[str, ...] = ()
    """Metric families this benchmark is always scored with, besides those asked for (its paper's own rule)."""

    def __post_init__(self):
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt style {self.prompt_style!r} (expected one of {PROMPT_STYLES})")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown generation protocol {self.protocol!r} (expected one of {PROTOCOLS})")
        if self.settings is None:
            chosen = medmax.SETTINGS if self.protocol == "medmax" else DEFAULT_SETTINGS
            self.settings = {k: dict(v) for k, v in chosen.items()}

    def samples(self, *, tally: Tally | None = None, strict: bool = False) -> list[Sample]:
        """The task's questions with ground truth; samples without answer or answer type are skipped and
        counted (raised when ``strict``)."""
        tally = tally if tally is not None else Tally()
        out = []
        for index, sample in enumerate(read_task_records(self.data_format, self.data_path, tally=tally,
                                                         strict=strict, **self.reader_options)):
            reason = _unscorable(sample)
            if reason is None:
                out.extend(circular_eval.rotations(sample) if self.circular else [sample])
                continue
            error = RecordError(self.data_path, sample.id, reason)
            if strict:
                raise error
            tally.skip_error(error, reason)
        return out

    def prompt(self, sample: Sample) -> str:
        """The text sent with the image(s): the question, plus options and an instruction for MCQ."""
        if sample.meta.extra.get("prompt_verbatim"):
            return sample.question
        question = sample.question.strip()
        if sample.meta.answer_type == "mcq":
            question = str(sample.meta.extra.get("question") or question).strip()
            options = "\n".join(f"{letter}. {choice}" for letter, choice in
                                zip(string.ascii_uppercase, sample.meta.choices or []))
            return f"{question}\n{options}\n{MCQ_INSTRUCTION}"
        if self.prompt_style == "short":
            return f"{question}\n{SHORT_INSTRUCTION}"
        return question

    def messages(self, sample: Sample) -> list[dict]:
        """OpenAI-style user message: image parts (``{"type": "image", "image": ImageRef}``, resolved against
        :attr:`image_root` by the runner) then the prompt."""
        parts = [{"type": "image", "image": image} for image in sample.images]
        return [{"role": "user", "content": parts + [{"type": "text", "text": self.prompt(sample)}]}]

    def settings_for(self, sample: Sample) -> dict:
        answer_type = sample.meta.answer_type
        settings = dict(self.settings[answer_type])
        if self.protocol == "medmax" and self.tokenizer is not None and answer_type in ("closed", "mcq"):
            settings["max_new_tokens"] = medmax.answer_token_budget(self.tokenizer, answer_type, sample.meta.choices)
        return settings

    def describe(self) -> dict:
        """What a report records about the task."""
        return {"name": self.name, "data": str(self.data_path), "format": self.data_format,
                "image_root": str(self.image_root) if self.image_root else None,
                "prompt_style": self.prompt_style, "settings": self.settings, **self._protocol_info(),
                **({"reader_options": self.reader_options} if self.reader_options else {}),
                **({"circular": True} if self.circular else {})}

    def _protocol_info(self) -> dict:
        if self.protocol != "medmax":
            return {}
        return {"protocol": self.protocol, "answer_token_budget": medmax.describe_budget(self.tokenizer)}


def _unscorable(sample: Sample) -> str | None:
    meta = sample.meta
    if meta.answer_type is None:
        return "no answer_type"
    if meta.answer is None:
        return "no ground-truth answer"
    if meta.answer_type == "mcq" and not meta.choices:
        return "multiple-choice question without choices"
    return None


def read_task_records(fmt: str, path: Path, *, tally: Tally, strict: bool = False, **options) -> Iterator[Sample]:
    """Read through the format registry (``medtune.data.formats``), so tasks accept every format it knows."""
    from medtune.data.formats import read_records
    return read_records(fmt, path, tally=tally, strict=strict, **options)


def _image_root(fmt: str, path: Path, given: Path | None) -> Path:
    from medtune.data.formats import default_image_root
    return Path(given) if given else default_image_root(fmt, path)


def _bundled(*parts: str) -> Path | None:
    from medtune.paths import bundled_data
    try:
        return bundled_data(*parts)
    except FileNotFoundError:
        return None


def _require(name: str, data: str | os.PathLike | None, what: str, default: Path | None = None) -> Path:
    path = Path(data) if data else default
    if path is None:
        raise TaskDataMissing(f"task {name!r} needs its data: pass --data PATH ({what})")
    if not path.exists():
        raise TaskDataMissing(f"task {name!r}: {path} does not exist ({what})")
    return path


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: what it is, how its data is read, what ``--data`` must be, and any bundled default."""

    description: str
    data_format: str
    needs: str
    bundled: tuple[str, ...] = ()
    reader_options: tuple[tuple[str, Any], ...] = ()
    """Options the task always passes to its reader (those given to :func:`get_task` win)."""
    scoring_families: tuple[str, ...] = ()
    """Metric families always scored for this task, as its paper scores it (with the task's own reader only)."""


TASKS: dict[str, TaskSpec] = {
    "vqa-rad": TaskSpec("bundled VQA-RAD test split (451 questions, open + closed); no arguments needed",
                        "vqa-rad", "VQA-RAD testset.json", ("vqa_rad", "testset.json")),
    "slake": TaskSpec("SLAKE English test split (bundled questions; --image-root imgs/ to generate answers)",
                      "slake", "SLAKE test.json / test_en.json", ("slake", "test_en.json")),
    "pathvqa": TaskSpec("PathVQA test split (--data required)", "pathvqa",
                        "the PathVQA test split, in a layout `medtune data convert --from pathvqa` reads"),
    "pmc-vqa": TaskSpec("PMC-VQA style multiple choice (--data required)", "pmc-vqa",
                        "the PMC-VQA test CSV, e.g. test_clean.csv"),
    "mcq": TaskSpec("any canonical JSONL of multiple-choice questions with meta.choices (--data required)",
                    "canonical", "a canonical JSONL of multiple-choice questions with meta.choices"),
    "custom": TaskSpec("any canonical JSONL with meta.answer and meta.answer_type (--data required)",
                       "canonical", "a canonical JSONL whose samples have meta.answer and meta.answer_type"),
    "quilt-vqa": TaskSpec("Quilt-VQA test set, open + closed (--data required)", "quilt-vqa",
                          "Quilt-VQA quiltvqa_test_w_ans.json (images: quilt_vqa.zip unpacked beside it) or the "
                          "Hub's Parquet file"),
    "omnimedvqa": TaskSpec("OmniMedVQA multiple choice (--data required)", "omnimedvqa",
                           "an OmniMedVQA QA_information/<access>/<dataset>.json file"),
    "pathmmu": TaskSpec("PathMMU multiple choice, every subset and split (--data required)", "pathmmu",
                        "PathMMU data.json (images/ beside it)"),
    "probmed": TaskSpec("ProbMed yes/no probes; headline: paired accuracy per category (--data required)",
                        "probmed", "ProbMed probmed.json", scoring_families=("probmed",)),
    "gmai-mmbench": TaskSpec("GMAI-MMBench multiple choice, VLMEvalKit TSV (--data required)", "gmai-mmbench",
                             "GMAI-MMBench_VAL.tsv (the TEST file has no answers)"),
    "medxpertqa-mm": TaskSpec("MedXpertQA MM multiple choice, 5 options (--data required)", "medxpertqa",
                              "MedXpertQA MM/test.jsonl (images/ unpacked from images.zip)"),
    "mmmu-medical": TaskSpec("MMMU Health & Medicine subjects, validation split (--data required)", "mmmu",
                             "an MMMU/MMMU subject file, e.g. Clinical_Medicine/validation-00000-of-00001.parquet "
                             "(or its rows as JSON/JSONL with image_k paths)"),
    "vlmevalkit": TaskSpec("any VLMEvalKit benchmark TSV (base64 images) (--data required)", "vlmevalkit",
                           "a VLMEvalKit TSV (index, question, A.., answer, image)"),
    "medmax-eval": TaskSpec("MedMax's evaluation release, prompts verbatim (--data required)", "medmax-eval",
                            "MedMax's medmax_eval_data table (its Parquet file, or a JSON, JSONL or CSV export)"),
}


def get_task(name: str, *, data: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None,
             data_format: str | None = None, prompt_style: str = "plain", protocol: str = "medtune",
             tokenizer=None, circular: bool = False, **reader_options) -> Task:
    """A built-in task by name; ``data`` overrides where its questions come from; ``protocol`` and
    ``tokenizer`` set the generation budgets (see the module docstring)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (built in: {', '.join(TASKS)})")
    spec = TASKS[name]
    path = _require(name, data, spec.needs, _bundled(*spec.bundled) if spec.bundled else None)
    fmt = data_format or spec.data_format
    own = fmt == spec.data_format
    options = {**dict(spec.reader_options), **reader_options} if own else reader_options
    return Task(name, path, fmt, _image_root(fmt, path, Path(image_root) if image_root else None),
                prompt_style=prompt_style, reader_options=options, protocol=protocol, tokenizer=tokenizer,
                circular=circular, scoring_families=spec.scoring_families if own else ())
