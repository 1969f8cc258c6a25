"""The demo pipeline: bundled VQA-RAD -> leakage-cleaned training set -> two-stage training -> evaluation
on the 451-question test split -> baselines -> report, with every intermediate kept for re-runs.

Layout of ``--output DIR``::

    DIR/data/             train.jsonl, test.jsonl (canonical), train-clean.jsonl, manifest.json (+ leakage),
                          validation.jsonl and train-fit.jsonl (the cleaned set split: held out / trained on),
                          captions.jsonl (one caption per training image, from train-fit.jsonl's answers),
                          blank-image/ (the test and validation questions with every image one black image)
    DIR/runs/NAME-HASH/   the training run of one resolved recipe (stages, checkpoints, metrics.jsonl) and
                          eval-vqa-rad/predictions.jsonl, its final model's answers (-validation: on the
                          validation split; -blank-image: with the images blanked)
    DIR/cache/tokens/     the token cache of the training stages (keyed by data, tokenizer and settings)
    DIR/baselines/        the baselines' answers, as predictions files `medtune eval score` reads
    DIR/model             a link to the latest run's final model: the path to chat with, serve and score
    DIR/report.md, report.json, loss.png, results.png

Design choices:

* Each phase reuses what an earlier run left when it is provably the same: converted data when the bundled
  files' SHA-256 match the manifest; a training stage when its ``model/`` exists (Trainer's run resumes an
  unfinished stage from its last complete checkpoint); predictions already in the file. The run directory is
  named by a hash of the resolved recipe and of the cleaned data, so a run with other settings (``--quick``,
  another preset, overrides) trains its own model instead of reusing a different one.
* The recipe is ``recipes/demo.yaml`` as shipped; the demo only points its stages at the cleaned data,
  sets the preset and seed, and scales step counts (``--steps-scale``). Anything else is a ``key=value``
  override, exactly as for ``medtune train``, which is how the same run is made with pretrained parts.
* Phases print a banner; long phases show a bar with an ETA (plain lines when the output is not a terminal).
* ``DIR/model`` is a relative symlink into ``runs/``, re-pointed atomically after every run, so the commands
  that use the model do not change with the run's hash; a real folder of that name is left alone.
* A validation split is carved out of the cleaned training set, never out of the test split: a fixed-seed
  random 10% of its questions (the same split whatever ``--seed``), and the training questions that leak into
  it are removed from training by the same check, with the same categories, as for the test split, and so are
  near duplicates and the training questions on a validation question's image with that open question's
  answer, so that validation relates to training as the test split does (see :func:`split_validation`).
  Every stage trains on the rest (``train-fit.jsonl``), or on captions made from it (a stage with the ``plain``
  template: ``captions.jsonl``, see :func:`image_captions`), and logs its validation loss; the model and the
  baselines (learned from ``train-fit.jsonl``) are also scored on the validation questions. The recipe's
  settings were chosen on these validation figures.
* The model answers every test and validation question twice: with its image, and with one black image in
  its place. The difference is what the model takes from the image; the question-only classifier says what
  reading the question alone can give.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from medtune.data.files import file_digest
from medtune.data.jsonl import Tally, write_json
from medtune.data.schema import Sample
from medtune.distributed import process_device
from medtune.errors import UserError

log = logging.getLogger(__name__)

TASK = "vqa-rad"
# The Med-MoE script (`eval score`'s default): every closed item counts, a hit when the answer string is inside the
# prediction. The LLaVA-Med v1.0 flavour drops wrong yes/no answers from its denominator, which lets a constant
# answer score 100%: a poor headline for a demo whose model may well answer constantly.
COMPAT_FLAVOUR = "med-moe"
REMOVED_CATEGORIES = ("exact", "rephrasing")
# Validation also drops near duplicates: the test split has 3 left in training after the check, a random
# validation split 29 (see split_validation).
VALIDATION_REMOVED = (*REMOVED_CATEGORIES, "near")
QUICK_SCALE = 0.1
MODEL_LINK = "model"
BLANK_IMAGE = "black.png"   # what every image becomes when the model is asked without its images
MANIFEST_VERSION = 5   # 3: answers lower-cased (fold_answer_case); 4: validation's open answers not on its
                       # images; 5: captions.jsonl
CAPTION_TYPES = ("MODALITY", "PLANE", "ORGAN")   # the questions whose open answers describe an image as a whole
ORGAN_WORDS = {"ABD": "abdomen", "CHEST": "chest", "HEAD": "head"}
VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 0        # fixed: the held-out questions do not change with --seed
EVALS_PER_STAGE = 4        # validation-loss points per stage (a stage without eval_steps of its own)


@dataclass
class DemoOptions:
    """What `medtune demo` was asked to do (see ``medtune demo --help``)."""

    output: Path
    preset: str = "small"
    steps_scale: float = 1.0
    seed: int | None = None            # None: the recipe's seed
    max_test: int | None = None
    eval_batch_size: int = 16
    recipe: str = "demo"
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self):
        # Checked before any work: a typo should not cost a training run.
        if self.steps_scale <= 0:
            raise UserError(f"--steps-scale must be positive, got {self.steps_scale}")
        if self.max_test is not None and self.max_test < 1:
            raise UserError(f"--max-test must be at least 1, got {self.max_test}")
        if self.eval_batch_size < 1:
            raise UserError(f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")


class Phases:
    """Phase banners and wall-clock timings ("ran" or "reused") in the order the phases ran."""

    def __init__(self, total: int):
        self.total = total
        self.timings: list[dict] = []

    @contextlib.contextmanager
    def phase(self, key: str, title: str) -> Iterator[dict]:
        number = len(self.timings) + 1
        print(f"\n== medtune demo [{number}/{self.total}] {title} ==", flush=True)
        entry = {"phase": key, "title": title, "status": "ran"}
        started = time.monotonic()
        yield entry
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.timings.append(entry)

    @property
    def total_seconds(self) -> float:
        return round(sum(t["seconds"] for t in self.timings), 2)


# ---- data ------------------------------------------------------------------------------------------------


@dataclass
class DemoData:
    """The converted and cleaned VQA-RAD files, and what the leakage check found."""

    directory: Path
    image_root: Path
    manifest: dict

    @classmethod
    def at(cls, output: Path) -> "DemoData":
        """Where the demo in ``output`` keeps its data (nothing is read or written here)."""
        from medtune.paths import bundled_data

        return cls(output / "data", bundled_data("vqa_rad", "images"), {})

    @property
    def train(self) -> Path:
        return self.directory / "train.jsonl"

    @property
    def test(self) -> Path:
        return self.directory / "test.jsonl"

    @property
    def clean_train(self) -> Path:
        return self.directory / "train-clean.jsonl"

    @property
    def fit(self) -> Path:
        """What the stages train on: the cleaned set without the validation questions and their leakage."""
        return self.directory / "train-fit.jsonl"

    @property
    def validation(self) -> Path:
        return self.directory / "validation.jsonl"

    @property
    def captions(self) -> Path:
        """What a caption-alignment stage (``plain`` template) trains on: :func:`image_captions` of the fit set."""
        return self.directory / "captions.jsonl"

    def questions(self, split: str) -> Path:
        """The questions the model is asked: the test split, or the validation split carved from training."""
        return self.test if split == "test" else self.validation


def prepare_data(output: Path) -> tuple[DemoData, bool]:
    """Convert the bundled VQA-RAD and write the leakage-cleaned training set; (data, reused)."""
    from medtune.paths import bundled_data

    sources = {"train": bundled_data("vqa_rad", "trainset.json"), "test": bundled_data("vqa_rad", "testset.json")}
    data = DemoData.at(output)
    directory = data.directory
    hashes = {split: file_digest(path) for split, path in sources.items()}
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = (data.train, data.test, data.clean_train, data.fit, data.validation, data.captions)
        if (manifest.get("version") == MANIFEST_VERSION and manifest.get("source_sha256") == hashes
                and all(p.is_file() for p in files)
                and manifest.get("clean_train_sha256") == file_digest(data.clean_train)
                and manifest.get("fit_sha256") == file_digest(data.fit)
                and manifest.get("captions_sha256") == file_digest(data.captions)):
            data.manifest = manifest
            print(f"reusing converted data in {directory} (bundled files unchanged)")
            return data, True
    data.manifest = _convert_and_clean(sources, hashes, data)
    write_json(manifest_path, data.manifest)
    return data, False


def _read(path: Path, tally: Tally) -> list[Sample]:
    from medtune.data.formats import read_records

    return list(read_records("vqa-rad", path, tally=tally))


def _convert_and_clean(sources: dict[str, Path], hashes: dict[str, str], data: DemoData) -> dict:
    from medtune.data.jsonl import write_samples
    from medtune.data.leakage import find_leakage, write_clean

    tallies = {split: Tally() for split in sources}
    train, test = _read(sources["train"], tallies["train"]), _read(sources["test"], tallies["test"])
    write_samples(data.train, train, Tally())
    write_samples(data.test, test, Tally())
    print(f"converted {len(train)} training and {len(test)} test questions to canonical JSONL in {data.directory}")
    report = find_leakage(((s, data.image_root) for s in train), ((s, data.image_root) for s in test))
    for line in report.lines():
        print(f"  {line}")
    drop = report.positions(REMOVED_CATEGORIES)
    clean_tally = Tally()
    write_clean(train, data.clean_train, drop, clean_tally)
    print(f"cleaned training set: {clean_tally.written} of {len(train)} questions kept "
          f"({len(drop)} removed: {len(report.exact)} exact pairs, {len(report.rephrasing)} rephrasings)")
    validation = split_validation([s for position, s in enumerate(train) if position not in drop], data)
    return {
        "version": MANIFEST_VERSION, "source_sha256": hashes, "clean_train_sha256": file_digest(data.clean_train),
        "fit_sha256": file_digest(data.fit), "captions_sha256": file_digest(data.captions),
        "validation": validation,
        "sources": {split: str(path) for split, path in sources.items()}, "image_root": str(data.image_root),
        "records": {"train": len(train), "test": len(test), "clean_train": clean_tally.written,
                    "fit": validation["fit"], "validation": validation["questions"],
                    "captions": validation["captions"]},
        "tallies": {split: tally.to_dict() for split, tally in tallies.items()},
        "leakage": {"removed_categories": list(REMOVED_CATEGORIES), "removed": len(drop),
                    "exact": len(report.exact), "rephrasing": len(report.rephrasing), "near": len(report.near),
                    "frame_records": report.frame_records, "test_images": report.test_images,
                    "test_images_in_train": report.test_images_in_train,
                    "train_records_on_test_images": report.train_records_on_test_images,
                    "removed_ids": [train[position].id for position in sorted(drop)]},
    }


def split_validation(clean: list[Sample], data: DemoData, *, fraction: float = VALIDATION_FRACTION,
                     seed: int = VALIDATION_SEED) -> dict:
    """Write validation.jsonl (a seeded random ``fraction`` of the cleaned questions) and train-fit.jsonl (the
    others, less those that leak into validation: exact pairs and rephrasings, as for the test split; near
    duplicates on the same image; and the questions on a validation question's image whose answer is that open
    question's answer).

    The last two rules make validation relate to training as the test split does. After the leakage check, 1%
    of the VQA-RAD test split's open questions have a training question on the same image with the same answer
    (the training rephrasings of test questions were the ones that had) and 3 test questions a near duplicate in
    training, while a random validation split keeps paraphrases on both sides (62% of its open questions had
    such a training question, and 29 of its questions a near duplicate). Validation then rewarded recalling what
    training said about an image, which the test split does not.

    It also writes captions.jsonl (:func:`image_captions` of train-fit.jsonl)."""
    import random

    from medtune.data.jsonl import write_samples
    from medtune.data.leakage import find_leakage

    held = set(random.Random(seed).sample(range(len(clean)), round(fraction * len(clean))))
    validation = [s for position, s in enumerate(clean) if position in held]
    rest = [s for position, s in enumerate(clean) if position not in held]
    report = find_leakage(((s, data.image_root) for s in rest), ((s, data.image_root) for s in validation))
    answered = same_image_answers(rest, validation)
    leaking = report.positions(VALIDATION_REMOVED) | answered
    fit = [fold_answer_case(s) for position, s in enumerate(rest) if position not in leaking]
    # folded too, so that the validation loss measures the answers as training writes them
    write_samples(data.validation, [fold_answer_case(s) for s in validation], Tally())
    write_samples(data.fit, fit, Tally())
    captions = image_captions(fit)
    write_samples(data.captions, captions, Tally())
    print(f"validation split (from the cleaned training set, seed {seed}): {len(validation)} questions held out; "
          f"{len(leaking)} training questions that leak into them removed ({len(report.exact)} exact pairs, "
          f"{len(report.rephrasing)} rephrasings, {len(report.near)} near duplicates, {len(answered)} on a "
          f"validation image with its open answer); training on {len(fit)}, and on {len(captions)} captions of "
          "their images")
    return {"fraction": fraction, "seed": seed, "questions": len(validation), "fit": len(fit),
            "captions": len(captions),
            "removed_from_fit": len(leaking), "exact": len(report.exact), "rephrasing": len(report.rephrasing),
            "near": len(report.near), "same_image_answer": len(answered),
            "ids": [s.id for s in validation], "removed_ids": [rest[position].id for position in sorted(leaking)]}


def same_image_answers(rest: list[Sample], held: list[Sample]) -> set[int]:
    """Positions in ``rest`` of the questions on the image of an open question of ``held`` whose answer is that
    question's answer (normalised as the leakage check compares text)."""
    from medtune.data.leakage import normalise

    def key(sample: Sample) -> tuple:
        return next((image.path for image in sample.images), None), normalise(str(sample.meta.answer))

    open_answers = {key(s) for s in held if s.meta.answer_type == "open"}
    return {position for position, sample in enumerate(rest) if key(sample) in open_answers}


def image_captions(fit: list[Sample]) -> list[Sample]:
    """One caption per image of ``fit`` (sorted by image path), for the stage that aligns image and text: the
    image's organ, then the distinct answers of the open modality, plane and organ questions ``fit`` asks about
    it, in that order (e.g. "head, mri, axial"; most images have only their organ).

    Why: a random tower trained only through question answering learns little the question does not already
    say (asked with every image blanked, such a model scored almost the same). A caption can be written only by
    looking at the image, so the stage that trains on captions makes the tower tell organs, modalities and
    planes apart, which every image shows. Only what describes the image as a whole goes in: a caption of every
    answer given about an image (findings, locations) taught recall of what training said about that image,
    which the validation split rewarded before it was made to relate to training as the test split does, and
    the test split did not (docs/demo.md, trial K). Made from the training questions alone: no validation or
    test question or answer is in a caption."""
    def rank(sample: Sample) -> int:
        """The place of the sample's question type in CAPTION_TYPES; len(CAPTION_TYPES) for any other."""
        kind = str(sample.meta.extra.get("question_type", "")).split(",")[0].strip()
        return CAPTION_TYPES.index(kind) if kind in CAPTION_TYPES else len(CAPTION_TYPES)

    images: dict[str, tuple[str | None, list[str]]] = {}
    # modality answers first, then plane, then organ; file order within each (sorted is stable)
    for sample in sorted(fit, key=rank):
        if not sample.images:
            continue
        organ, facts = images.setdefault(sample.images[0].path,
                                         (ORGAN_WORDS.get(str(sample.meta.organ).upper()), []))
        answer = " ".join(str(sample.meta.answer or "").split())
        if (sample.meta.answer_type == "open" and rank(sample) < len(CAPTION_TYPES) and answer and answer != organ
                and answer not in facts):
            facts.append(answer)
    return [_caption(image, organ, facts) for image, (organ, facts) in sorted(images.items())]


def _caption(image: str, organ: str | None, facts: list[str]) -> Sample:
    from medtune.data.schema import Message, Metadata, Part

    text = ", ".join([organ] * (organ is not None) + facts)
    return Sample(id=f"caption:{image}", messages=[
        Message("user", (Part.of_image(image),)), Message("assistant", (Part.of_text(text),))],
        meta=Metadata(source="vqa-rad", task="caption", split="train", answer=text))


def fold_answer_case(sample: Sample) -> Sample:
    """``sample`` with its answer lower-cased (the assistant turns and ``meta.answer``).

    VQA-RAD's annotators wrote the same answer in several cases ("Yes" 513 times and "yes" 315 in the training
    file, "No" 738 and "no" 146). A model trained on them spends probability on the case, and greedy decoding
    then picks the largest single spelling: a question that is 55% likely "yes" (34% "Yes" + 21% "yes") is
    answered "No" at 38%. Both metric families fold case, so the training and validation answers are folded
    too; the questions and the test file keep their text."""
    messages = [dataclasses.replace(m, content=tuple(
        dataclasses.replace(part, text=part.text.lower()) if part.type == "text" else part for part in m.content))
        if m.role == "assistant" else m for m in sample.messages]
    answer = sample.meta.answer.lower() if isinstance(sample.meta.answer, str) else sample.meta.answer
    return dataclasses.replace(sample, messages=messages, meta=dataclasses.replace(sample.meta, answer=answer))


# ---- training --------------------------------------------------------------------------------------------


def resolve_recipe(options: DemoOptions, data: DemoData):
    """``recipes/demo.yaml`` pointed at the training part of the cleaned data (a stage with the ``plain``
    template, which trains on captions alone, at the captions of its images), with the validation split as
    every stage's eval data (token cache under the output folder), with the preset, seed, step scale, bf16
    where the machine computes it natively, and the overrides (which win). Torch threads are ``medtune train``'s
    fixed default (every usable core), so that two runs with the same seed on one machine give the same
    figures; ``stages.*.torch_threads=free`` follows the free cores instead (faster beside other work, but
    the thread count, and with it the arithmetic, may change during the run)."""
    import yaml

    from medtune.paths import recipe_path
    from medtune.train.recipe import load_recipe

    path = recipe_path(options.recipe)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    # Values are JSON strings, which YAML reads back verbatim whatever the path contains.
    validation = {"path": str(data.validation), "format": "canonical", "image_root": str(data.image_root)}
    captioning = [index for index, stage in enumerate(raw.get("stages") or [])
                  if isinstance(stage, dict) and stage.get("template") == "plain"]
    overrides = [f"stages.*.data.path={json.dumps(str(data.fit))}", "stages.*.data.format=canonical",
                 *(f"stages.{index}.data.path={json.dumps(str(data.captions))}" for index in captioning),
                 f"stages.*.data.image_root={json.dumps(str(data.image_root))}",
                 f"stages.*.eval_data={json.dumps(validation)}",
                 f"cache_dir={json.dumps(str(data.directory.parent / 'cache' / 'tokens'))}"]
    if fast_bf16():
        overrides.append("stages.*.precision=bf16")
    if options.seed is not None:
        overrides.append(f"seed={options.seed}")
    if isinstance(raw.get("model"), dict) and "preset" in raw["model"]:
        overrides.append(f"model.preset={options.preset}")
    elif options.preset != "small":
        raise UserError(f"--preset {options.preset}: recipe {path} does not build its model from a preset")
    recipe = load_recipe(path, overrides + list(options.overrides))
    for stage in recipe.stages:
        if stage.max_steps is not None:
            stage.max_steps = max(1, round(stage.max_steps * options.steps_scale))
            if stage.eval_steps is None:   # a validation loss a few times per stage, at its end included
                stage.eval_steps = max(1, -(-stage.max_steps // EVALS_PER_STAGE))
        else:
            stage.epochs *= options.steps_scale
    return recipe, path


def fast_bf16() -> bool:
    """Whether training in bf16 autocast is faster here and supported: a GPU with bf16, or a CPU with native
    bf16 (benchmarks/train_speed.py: 1.9x the samples/s of fp32 on AVX512-BF16, the same loss to 1e-4)."""
    import torch

    from medtune.train.machine import bf16_native
    from medtune.train.recipe import bf16_supported

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return bf16_supported(device) and (device == "cuda" or bf16_native())


def recipe_fingerprint(recipe, output: Path, clean_sha256: str) -> str:
    """A short hash of what determines the trained model: the resolved recipe and the training data."""
    settings = dataclasses.asdict(recipe)
    settings.pop("output_dir", None)
    text = json.dumps(settings, sort_keys=True, default=str).replace(str(output.resolve()), "$OUTPUT")
    return hashlib.sha256(f"{text}\n{clean_sha256}".encode()).hexdigest()[:10]


def stage_summary(recipe, index: int) -> dict:
    """What stage ``index`` did (its summary.json), with its metrics file and directory."""
    from medtune.train.run import stage_dir

    stage = recipe.stages[index]
    directory = stage_dir(recipe.output_dir, index, stage)
    summary_file = directory / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    return {"name": stage.name, "directory": str(directory), "metrics": str(directory / "metrics.jsonl"),
            "max_steps": stage.max_steps, "epochs": stage.epochs, "batch_size": stage.batch_size,
            "precision": stage.precision, "group_by_length": stage.group_by_length,
            "data": stage.data.path or stage.data.mixture,
            "eval_data": stage.eval_data.path if stage.eval_data else None,
            "lr": dataclasses.asdict(stage.lr), **{k: summary.get(k) for k in (
                "steps", "samples", "tokens", "seconds", "train_loss", "skipped", "trainable")}}


def train_stage(recipe, index: int) -> tuple[dict, bool]:
    """Run one stage unless its model is already complete; (summary, reused)."""
    from medtune.train.run import MODEL_DIR, run_stage, stage_dir

    stage = recipe.stages[index]
    model_dir = stage_dir(recipe.output_dir, index, stage) / MODEL_DIR
    if model_dir.is_dir():
        print(f"reusing stage {stage.name}: its model is complete in {model_dir}")
        return stage_summary(recipe, index), True
    run_stage(recipe, index, resume=True)
    return stage_summary(recipe, index), False


def link_final_model(output: Path, final_model: Path) -> Path | None:
    """Point ``output/model`` at ``final_model`` (a relative symlink, replaced atomically); its path, or None
    when a real file or folder already has that name."""
    link = output / MODEL_LINK
    if link.exists() and not link.is_symlink():
        log.warning("%s exists and is not a link; the final model stays at %s", link, final_model)
        return None
    staging = output / f".{MODEL_LINK}.{os.getpid()}.link"
    staging.unlink(missing_ok=True)
    staging.symlink_to(os.path.relpath(final_model, output), target_is_directory=True)
    os.replace(staging, link)
    return link


# ---- evaluation and baselines ----------------------------------------------------------------------------


def load_test_questions(data: DemoData, max_test: int | None, *, split: str = "test", blank_images: bool = False):
    """The VQA-RAD task over the converted ``split`` file (test, or the validation split carved from training),
    and its questions (the first ``max_test`` if given); with ``blank_images``, every image black."""
    from medtune.eval.tasks import get_task

    path, image_root = blank_image_questions(data, split) if blank_images else (data.questions(split),
                                                                                 data.image_root)
    task = get_task(TASK, data=path, data_format="canonical", image_root=image_root)
    tally = Tally()
    samples = task.samples(tally=tally)
    if tally.n_skipped:
        raise UserError(f"{path}: {tally.summary()}; every {split} question needs an answer and answer type")
    if max_test is not None:
        samples = samples[:max_test]
    return task, samples


def blank_image_questions(data: DemoData, split: str) -> tuple[Path, Path]:
    """The ``split`` questions with every image replaced by one black image, and that image's folder:
    ``DIR/data/blank-image/`` (``SPLIT.jsonl`` and ``black.png``), written once."""
    from PIL import Image

    from medtune.data.jsonl import read_samples, write_samples
    from medtune.data.schema import ImageRef

    folder = data.directory / "blank-image"
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / BLANK_IMAGE).is_file():
            Image.new("RGB", (64, 64)).save(folder / BLANK_IMAGE)
        black = ImageRef(BLANK_IMAGE)

        def blanked(message):
            return dataclasses.replace(message, content=tuple(
                dataclasses.replace(part, image=black) if part.type == "image" else part for part in message.content))

        write_samples(path, [dataclasses.replace(sample, messages=[blanked(m) for m in sample.messages])
                             for sample in read_samples(data.questions(split), strict=True)])
    return path, folder


def evaluate_model(data: DemoData, backend, run_dir: Path, options: DemoOptions, *, seed: int,
                   split: str = "test", blank_images: bool = False) -> dict:
    """Answer the ``split`` questions with the trained model (``backend``: one
    :class:`~medtune.demo.evaluate.LazyLocalBackend` for every call, so the model loads once, and only when a
    question is not answered yet) and score them, resuming earlier answers; with ``blank_images``, the same
    questions with every image black (scored as ``model_blank_image``): what the model answers from the question
    alone, so the difference is what it takes from the image."""
    from medtune.demo import evaluate

    limit = options.max_test   # the first N questions of either split
    task, samples = load_test_questions(data, limit, split=split, blank_images=blank_images)
    out_dir = run_dir / (f"eval-{TASK}" if split == "test" else f"eval-{TASK}-{split}")
    out_dir = out_dir.with_name(out_dir.name + "-blank-image") if blank_images else out_dir
    result, predictions = evaluate.answer_questions(task, backend, out_dir, limit=limit)
    if result.already_answered:
        print(f"reusing {result.already_answered} answers already in {result.predictions_path}")
    name = "model_blank_image" if blank_images else "model"
    scored = evaluate.score(TASK, name, samples, predictions, compat_flavour=COMPAT_FLAVOUR, seed=seed)
    return {"task": task, "samples": samples, "scored": scored, "predictions": result.predictions_path,
            "reused": result.already_answered, "answered_now": result.answered}


def learn_baselines(data: DemoData):
    """The baselines' answer priors and question classifier, learned from the questions the model trained on
    (once per run: fitting the classifier takes about 15 s on 2 cores)."""
    from medtune.data.jsonl import read_samples
    from medtune.demo.baselines import AnswerPriors

    return AnswerPriors.learn(read_samples(data.fit, strict=True))


def score_baselines(priors, samples: list[Sample], out_dir: Path, *, seed: int, split: str = "test") -> dict:
    """The baselines (``priors``: :func:`learn_baselines`) answered (files in ``out_dir``) and scored."""
    from medtune.demo import evaluate
    from medtune.demo.baselines import BASELINES

    scored = []
    for name in BASELINES:
        answers = priors.predict(name, samples)
        evaluate.write_answers(out_dir / f"{name}.jsonl", answers, samples, f"baseline:{name}")
        scored.append(evaluate.score(TASK, name, samples, answers, compat_flavour=COMPAT_FLAVOUR, seed=seed))
    info = {**priors.describe(), "question_prior_coverage": priors.coverage(samples)}
    print(f"majority answers: {info['majority']}; the question prior knows {info['question_prior_coverage']} "
          f"of {len(samples)} {split} questions from training")
    return {"scored": scored, "info": info}


def machine_info() -> dict:
    import os
    import platform

    import torch

    from medtune.train.machine import bf16_native, cpu_flags, isa_caps, usable_cores

    info = {"cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "bf16_native": bf16_native(),
            "cpu_flags": cpu_flags(), "isa_caps": isa_caps(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# ---- the whole demo --------------------------------------------------------------------------------------


def run_demo(options: DemoOptions) -> dict:
    """Run every phase (reusing what is already done) and write the report; returns report.json's content."""
    import datetime

    from medtune.demo import evaluate, report
    from medtune.train.progress import quiet_libraries
    from medtune.train.recipe import check_environment
    from medtune.train.run import MODEL_DIR

    quiet_libraries()   # the model loads for evaluation without transformers' "Loading weights" bar
    output = options.output.resolve()   # recipes and reports name absolute paths; the hash does not
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    recipe, recipe_file = resolve_recipe(options, DemoData.at(output))   # a bad override fails before any work
    check_environment(recipe)
    output.mkdir(parents=True, exist_ok=True)
    phases = Phases(total=len(recipe.stages) + 5)
    with phases.phase("data", "data: convert bundled VQA-RAD, remove train/test leakage") as entry:
        data, reused = prepare_data(output)
        entry["status"] = "reused" if reused else "ran"
    fingerprint = recipe_fingerprint(recipe, output, data.manifest["fit_sha256"])
    run_dir = output / "runs" / f"{options.preset}-{fingerprint}"
    recipe.output_dir = str(run_dir)
    write_json(run_dir / "recipe.json", dataclasses.asdict(recipe))
    print(f"training run: {run_dir}")
    stages = []
    for index, stage in enumerate(recipe.stages):
        with phases.phase(f"stage-{index}-{stage.name}",
                          f"training stage {index + 1}/{len(recipe.stages)}: {stage.name}") as entry:
            summary, reused = train_stage(recipe, index)
            entry["status"] = "reused" if reused else "ran"
            stages.append({**summary, "reused": reused})
    final_model = Path(stages[-1]["directory"]) / MODEL_DIR
    model_link = link_final_model(output, final_model)
    backend = evaluate.LazyLocalBackend(final_model, batch_size=options.eval_batch_size, device=process_device())
    with phases.phase("validate", f"validation: the {TASK} questions held out of training, model and "
                                  "baselines") as entry:
        validation = evaluate_model(data, backend, run_dir, options, seed=recipe.seed, split="validation")
        validation["blank"] = evaluate_model(data, backend, run_dir, options, seed=recipe.seed, split="validation",
                                             blank_images=True)
        priors = learn_baselines(data)
        validation["baselines"] = score_baselines(priors, validation["samples"],
                                                  output / "baselines" / "validation", seed=recipe.seed,
                                                  split="validation")
        entry["status"] = "reused" if not validation["answered_now"] + validation["blank"]["answered_now"] else "ran"
    with phases.phase("evaluate", f"evaluation: {TASK} test split, local model, greedy, with and without its "
                                  "images") as entry:
        evaluation = evaluate_model(data, backend, run_dir, options, seed=recipe.seed)
        blank = evaluate_model(data, backend, run_dir, options, seed=recipe.seed, blank_images=True)
        entry["status"] = "reused" if not evaluation["answered_now"] + blank["answered_now"] else "ran"
    with phases.phase("baselines", "baselines: majority answer per type, most frequent answer per question, "
                                   "question-only classifier"):
        baselines = score_baselines(priors, evaluation["samples"], output / "baselines", seed=recipe.seed)
    with phases.phase("report", "report: tables, loss curves, results chart"):
        context = report.DemoContext(
            options=options, command=command_line(options), started=started, data=data, recipe=recipe,
            recipe_file=recipe_file, fingerprint=fingerprint, run_dir=run_dir, stages=stages,
            final_model=final_model, model_link=model_link, task=evaluation["task"], samples=evaluation["samples"],
            scored=[evaluation["scored"], blank["scored"], *baselines["scored"]], baselines=baselines["info"],
            predictions=evaluation["predictions"], predictions_reused=evaluation["reused"],
            machine=machine_info(), compat_flavour=COMPAT_FLAVOUR,
            validation={"samples": validation["samples"], "info": validation["baselines"]["info"],
                        "scored": [validation["scored"], validation["blank"]["scored"],
                                   *validation["baselines"]["scored"]],
                        "predictions": validation["predictions"]})
        content = report.build_content(output, context)
    # Written after the last phase so that the timings table is complete.
    report.add_first_run_timings(phases.timings, output, str(run_dir))
    content["timings"] = {"phases": phases.timings, "total_seconds": phases.total_seconds}
    report.write_files(output, content)
    report.print_summary(content, output)
    return content


def command_line(options: DemoOptions) -> str:
    """The `medtune demo` command that reproduces this run."""
    parts = ["medtune", "demo", "--output", str(options.output)]
    defaults = DemoOptions(options.output)
    for name in ("preset", "steps_scale", "seed", "max_test", "eval_batch_size", "recipe"):
        value = getattr(options, name)
        if value != getattr(defaults, name):
            parts += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(parts + list(options.overrides))


