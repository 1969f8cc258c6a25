"""The demo's report: report.json (everything, machine-readable), report.md (what a person reads), and two
figures, loss.png (the loss curve of each training stage) and results.png (model and baselines, headline
metrics with 95% bootstrap intervals).

Design choices:

* Every figure in report.md comes from report.json's content, so the two cannot disagree; report.json keeps
  every scored row (per answer type, per organ, per modality, both metric families) for later comparison.
* The model and the baselines sit in the same table, column by column, so the reader sees at once what the
  model learned beyond answer priors.
* The report says plainly what a randomly initialised small model is (a pipeline demonstration) and gives
  the command that runs the same recipe with pretrained parts.
* Figures are read without the table beside them: every bar carries its value (a 0.0 bar is a visible "0.0",
  an undefined figure "n/a"), and each loss panel draws the logged loss with one marker style and, over it, an
  exponential moving average (TensorBoard's debiased smoothing) so the trend shows through step-to-step noise.
* The report ends with the commands to chat with, serve and score the final model, by its stable path
  ``DIR/model`` (a link the pipeline points at the latest run's final model).
* The learning signal a newcomer can read: train and validation loss per stage (table and figure), the
  validation questions (carved from training, where the recipe's settings were chosen) scored beside the
  baselines as the test split is, and a few test questions with their image (copied to ``DIR/examples/``), the
  model's answer and the truth, picked by a fixed rule (closed and open, right and wrong) rather than by hand.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medtune import __version__
from medtune.data.jsonl import atomic_open, write_json
from medtune.eval.metrics import Row

REPORT_JSON, REPORT_MD, LOSS_PNG, RESULTS_PNG = "report.json", "report.md", "loss.png", "results.png"
EXAMPLES_DIR = "examples"
EXAMPLES_PER_KIND = 2   # per (answer type, right or wrong): up to 8 example questions
VAL_STYLE = {"marker": "s", "markersize": 4, "linewidth": 1.5, "color": "#55A868"}
SYSTEMS = {"model": "model", "model_blank_image": "model, images blanked", "majority": "majority baseline",
           "question_prior": "question-prior baseline", "question_classifier": "question-only classifier"}
MODEL_SYSTEMS = ("model", "model_blank_image")   # the trained model's answers; the others are baselines
ANSWER_PRIORS = ("majority", "question_prior")
LOSS_SMOOTHING = 0.6   # TensorBoard's default weight
RAW_STYLE = {"marker": "o", "markersize": 3, "linewidth": 1, "alpha": 0.45, "color": "#4C72B0"}
SMOOTH_STYLE = {"linewidth": 2, "color": "#C44E52"}
# (family, answer type, metric) shown in the main table, in this order.
HEADLINE = (("compat", "closed", "accuracy"), ("compat", "open", "recall"),
            ("strict", "closed", "accuracy"), ("strict", "closed", "unparsed"), ("strict", "open", "recall"),
            ("strict", "open", "exact"), ("strict", "all", "accuracy"))
ORGAN_METRICS = (("compat", "closed", "accuracy"), ("compat", "open", "recall"),
                 ("strict", "closed", "accuracy"), ("strict", "open", "exact"))
# The same recipe with pretrained parts: LLaVA-1.5's vision tower and language model, bf16 on one GPU. CLIP-336
# gives 576 image tokens, hence the longer rows; Vicuna's own chat template; the tower stays frozen as in LLaVA
# and the LM is LoRA-tuned in stage 2 (a full 7B fine-tune with Adam does not fit one 80 GB GPU) at LLaVA's
# rates rather than the from-scratch rates of the demo.
PRETRAINED_OVERRIDES = (
    "model.vision=openai/clip-vit-large-patch14-336", "model.llm=lmsys/vicuna-7b-v1.5", "model.tokenizer=null",
    "model.template=vicuna", "stages.*.precision=bf16", "stages.*.max_length=1024",
    "stages.*.gradient_checkpointing=true", "stages.0.lr.vision=0", "stages.0.lr.llm=0", "stages.0.lr.projector=1e-3",
    "stages.1.lr.vision=0", "stages.1.lr.llm=0", "stages.1.lr.projector=2e-5",
    "stages.1.lora.r=64", "stages.1.lr.lora=2e-4")
RANDOM_STATEMENT = (
    "This model is randomly initialised: its vision encoder, projector and language model are built from "
    "configs and its tokenizer is trained offline on bundled text, so it starts knowing nothing about images "
    "or language. Trained for a few minutes on a CPU, it demonstrates that the pipeline runs end to end "
    "(conversion, leakage removal, two-stage training, evaluation, baselines, report); it is not a medical "
    "model and its answers must not be used for anything. Read its figures against the baselines, which "
    "measure answer priors and what the question alone gives, and against its own answers with the images "
    "blanked, which measure what it takes from the image.")
SHORT_RUN_NOTE = (
    "This run trained {scale:g} of the recipe's steps (`--quick` is 0.1): it shows that every phase runs (data, "
    "leakage removal, both stages, evaluation, baselines, report) in a few minutes. So few steps learn little "
    "beyond the answer prior: read its figures as a pipeline check, and the full `medtune demo`'s for what the "
    "model learns.")
PRETRAINED_STATEMENT = (
    "This model starts from pretrained parts ({parts}) and is fine-tuned on the {n} questions of the cleaned "
    "VQA-RAD training split. It is a research artefact, not a medical device: its answers must not be used "
    "for patient care. Read its figures against the baselines, which measure what answer priors alone score.")


def statement(model, training_questions: int) -> str:
    """What the reader must know about the model: random parts (a pipeline demonstration) or pretrained ones."""
    if isinstance(model, str):
        parts = f"checkpoint {model}"
    else:
        parts = ", ".join(f"{part}: {model[part]}" for part in ("vision", "llm") if isinstance(model.get(part), str))
    return PRETRAINED_STATEMENT.format(parts=parts, n=training_questions) if parts else RANDOM_STATEMENT


@dataclass
class DemoContext:
    """Everything the pipeline hands to the report."""

    options: object
    command: str
    started: str
    data: object
    recipe: object
    recipe_file: Path
    fingerprint: str
    run_dir: Path
    stages: list[dict]
    final_model: Path
    model_link: Path | None
    task: object
    samples: list
    scored: list
    baselines: dict
    predictions: Path
    predictions_reused: int
    machine: dict
    compat_flavour: str
    validation: dict | None = None   # samples, scored (model, baselines), info, predictions of the validation split


# ---- content ---------------------------------------------------------------------------------------------


def build_content(output: Path, context: DemoContext) -> dict:
    """report.json's content; also draws the figures into ``output``."""
    import dataclasses

    rows = {s.name: s.rows for s in context.scored}
    stages = [{**stage, "loss_curve": loss_points(Path(stage["metrics"])),
               "validation_curve": loss_points(Path(stage["metrics"]), key="eval_loss")} for stage in context.stages]
    write_loss_figure(output / LOSS_PNG, stages)
    headline = compare_rows(rows, HEADLINE)
    write_results_figure(output / RESULTS_PNG, [line for line in headline if line["metric"] != "unparsed"])
    options = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(context.options).items()}
    baseline_files = {name: str(output / "baselines" / f"{name}.jsonl") for name in SYSTEMS
                      if name not in MODEL_SYSTEMS}
    return {
        "title": "medtune demo", "medtune_version": __version__, "started": context.started,
        "command": context.command, "machine": context.machine, "options": options,
        "statement": statement(context.recipe.model, context.data.manifest["records"]["clean_train"]),
        "data": {"train": str(context.data.train), "test": str(context.data.test),
                 "clean_train": str(context.data.clean_train), "image_root": str(context.data.image_root),
                 "records": context.data.manifest["records"], "leakage": context.data.manifest["leakage"]},
        "model": {"spec": context.recipe.model, "final_model": str(context.final_model),
                  "link": str(context.model_link) if context.model_link else None},
        "next_commands": next_commands(context.model_link or context.final_model, output),
        "recipe": {"file": str(context.recipe_file), "fingerprint": context.fingerprint,
                   "run_dir": str(context.run_dir), "overrides": list(context.options.overrides)},
        "training": {"stages": stages},
        "evaluation": evaluation_section(context),
        "baselines": {**context.baselines, "files": baseline_files},
        "headline": headline,
        "model_answers": answer_spread(context.scored[0]),
        "per_organ": organ_rows(rows),
        "validation": validation_section(context),
        "examples": write_examples(output, context),
        "results": {name: [row.to_dict() for row in system_rows] for name, system_rows in rows.items()},
        "figures": {"loss": LOSS_PNG, "results": RESULTS_PNG},
        "gpu_command": gpu_command(),
    }


def evaluation_section(context: DemoContext) -> dict:
    """What was asked and how: the questions by answer type and organ, decoding, predictions, bootstrap."""
    samples = context.samples
    return {"task": context.task.name, "n": len(samples),
            "answer_types": dict(Counter(s.meta.answer_type for s in samples)),
            "organs": dict(Counter(s.meta.organ or "unknown" for s in samples)),
            "compat_flavour": context.compat_flavour, "decoding": "greedy", "settings": context.task.settings,
            "predictions": str(context.predictions), "predictions_reused": context.predictions_reused,
            "bootstrap": {"method": "percentile", "resamples": 1000, "seed": context.recipe.seed, "level": 0.95}}


def validation_section(context: DemoContext) -> dict | None:
    """The validation split (held out of the training set): what it is, and model and baselines scored on it."""
    if context.validation is None:
        return None
    split = {k: v for k, v in context.data.manifest.get("validation", {}).items() if not k.endswith("ids")}
    samples = context.validation["samples"]
    rows = {s.name: s.rows for s in context.validation["scored"]}
    return {"split": split, "n": len(samples), "answer_types": dict(Counter(s.meta.answer_type for s in samples)),
            "predictions": str(context.validation["predictions"]),
            "question_prior_coverage": context.validation["info"]["question_prior_coverage"],
            "headline": compare_rows(rows, HEADLINE),
            "model_answers": answer_spread(context.validation["scored"][0]),
            "results": {name: [row.to_dict() for row in system_rows] for name, system_rows in rows.items()}}


def pick_examples(scored, per_kind: int = EXAMPLES_PER_KIND) -> list:
    """Test items to show: the first ``per_kind`` right and wrong (strict) of each answer type, in test order."""
    strict = scored.scores["strict"]
    picked, counts = [], Counter()
    for item in scored.items:
        right = bool(strict[item.id].get("accuracy" if item.answer_type == "closed" else "exact"))
        kind = (item.answer_type, right)
        if counts[kind] < per_kind:
            counts[kind] += 1
            picked.append((item, right))
    return sorted(picked, key=lambda pair: (pair[0].answer_type, not pair[1]))


def write_examples(output: Path, context: DemoContext) -> list[dict]:
    """A few test questions with the model's answer and the truth; their images copied beside the report."""
    import shutil

    samples = {s.id: s for s in context.samples}
    root = Path(context.data.image_root)
    examples = []
    for item, right in pick_examples(context.scored[0]):
        images = samples[item.id].images if item.id in samples else []
        shown = None
        if images and (root / images[0].path).is_file():
            shown = f"{EXAMPLES_DIR}/{Path(images[0].path).name}"
            (output / EXAMPLES_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / images[0].path, output / shown)
        examples.append({"id": item.id, "question": item.question, "answer_type": item.answer_type,
                         "organ": item.organ, "truth": item.answer, "model": item.prediction,
                         "strict_correct": right, "image": shown})
    return examples


def next_commands(model: Path, output: Path) -> list[str]:
    """Chat with, serve and score the final model (``model``: its stable link), as they run from the shell that
    ran the demo (:func:`medtune.paths.shell_command`: ``.venv/bin/medtune`` where the venv is not active),
    with paths relative to the current folder when they are below it."""
    from medtune.paths import bundled_data, shell_command, shown_path

    medtune, where = shell_command(), shown_path(model)
    image = shown_path(bundled_data("vqa_rad", "images", "synpic100132.jpg"))
    return [f"{medtune} chat {where} --image {image}",
            f"{medtune} serve {where}",
            f"{medtune} eval run --task vqa-rad --model {where} --out {shown_path(Path(output) / 'eval')}"]


def gpu_command() -> str:
    """The same demo with pretrained parts: recipe overrides only (the preset's parts are all replaced)."""
    return " ".join(["medtune demo --output medtune-output/demo-pretrained", *PRETRAINED_OVERRIDES])


def answer_spread(scored) -> dict:
    """How varied the model's answers are: a model that learned only a prior answers the same thing."""
    answers = Counter(" ".join(item.prediction.lower().split()) for item in scored.items)
    text, count = answers.most_common(1)[0]
    return {"distinct": len(answers), "most_common": text, "most_common_count": count}


def loss_points(metrics_file: Path, key: str = "loss") -> list[list[float]]:
    """``[[step, value], ...]`` from a stage's metrics.jsonl: the training loss, or ``eval_loss`` (validation)."""
    if not metrics_file.is_file():
        return []
    points = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if key in record:
                points.append([record["step"], record[key]])
    return points


def _find(rows: list[Row], family: str, answer_type: str, metric: str, group_by: str = "all",
          group: str = "all") -> Row | None:
    return next((r for r in rows if (r.family, r.answer_type, r.metric, r.group_by, r.group)
                 == (family, answer_type, metric, group_by, group)), None)


def _cell(row: Row | None) -> dict | None:
    if row is None:
        return None
    cell = row.estimate.to_dict()   # JSON-ready: an undefined figure (every item excluded) is None
    if row.excluded:
        cell["excluded"] = row.excluded
    return cell


def compare_rows(rows: dict[str, list[Row]], wanted, group_by: str = "all", group: str = "all") -> list[dict]:
    """One line per wanted (family, answer type, metric), one cell per system."""
    out = []
    for family, answer_type, metric in wanted:
        cells = {name: _cell(_find(system, family, answer_type, metric, group_by, group))
                 for name, system in rows.items()}
        if any(cells.values()):
            out.append({"family": family, "answer_type": answer_type, "metric": metric,
                        **({"organ": group} if group_by == "organ" else {}), **cells})
    return out


def organ_rows(rows: dict[str, list[Row]]) -> list[dict]:
    organs = sorted({r.group for r in rows["model"] if r.group_by == "organ"})
    return [line for organ in organs for line in compare_rows(rows, ORGAN_METRICS, "organ", organ)]


# ---- figures ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    _pyplot().close(fig)


def smoothed(values: list[float], weight: float = LOSS_SMOOTHING) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards zero (TensorBoard's)."""
    out, average = [], 0.0
    for count, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return out


def loss_figure(stages: list[dict]):
    """One panel per stage: the logged training loss against optimizer step, its moving average, and the
    validation loss."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        points = stage["loss_curve"]
        if points:
            steps, losses = [p[0] for p in points], [p[1] for p in points]
            ax.plot(steps, losses, label="logged", **RAW_STYLE)
            ax.plot(steps, smoothed(losses), label=f"smoothed (EMA {LOSS_SMOOTHING})", **SMOOTH_STYLE)
            validation = stage.get("validation_curve") or []
            if validation:
                ax.plot([p[0] for p in validation], [p[1] for p in validation], label="validation", **VAL_STYLE)
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"stage {stage['name']}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_loss_figure(path: Path, stages: list[dict]) -> None:
    _save(loss_figure(stages), path)


def _drawable(cell: dict | None) -> dict:
    """Undefined figures are drawn as empty bars labelled "n/a" (the table says "-")."""
    if cell is None or cell["value"] is None:
        return {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "label": "n/a"}
    return {**cell, "label": f"{cell['value']:.1f}"}


def results_figure(headline: list[dict]):
    """Grouped bars: each headline metric, one bar per system with its value on top, 95% bootstrap intervals
    as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(headline) + 2), 3.8))
    width = 0.8 / len(SYSTEMS)
    colours = ("#4C72B0", "#A6BDDB", "#DD8452", "#55A868", "#8172B3")   # the blanked model: the model's, paler
    for offset, (name, label) in enumerate(SYSTEMS.items()):
        cells = [_drawable(line.get(name)) for line in headline]
        values = [c["value"] for c in cells]
        errors = [[c["value"] - c["ci_low"] for c in cells], [c["ci_high"] - c["value"] for c in cells]]
        bars = ax.bar([i + (offset - (len(SYSTEMS) - 1) / 2) * width for i in range(len(headline))], values,
                      width, yerr=errors, capsize=3, label=label, color=colours[offset])
        # above the interval's top, so the error bar does not cross the number
        for bar, cell in zip(bars, cells):
            ax.annotate(cell["label"], (bar.get_x() + bar.get_width() / 2, cell["ci_high"]), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(headline)),
                  [f"{l['family']}\n{l['answer_type']} {l['metric']}" for l in headline], fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel("% (95% bootstrap CI)")
    ax.set_title("VQA-RAD test: model and baselines")
    ax.legend(fontsize=8, loc="upper left", ncols=len(SYSTEMS))
    fig.tight_layout()
    return fig


def write_results_figure(path: Path, headline: list[dict]) -> None:
    _save(results_figure(headline), path)


# ---- Markdown --------------------------------------------------------------------------------------------


def _fmt(cell: dict | None) -> str:
    if cell is None or cell["value"] is None:
        return "-" + (f" ({cell['excluded']} excl.)" if cell and cell.get("excluded") else "")
    text = f"{cell['value']:.1f} [{cell['ci_low']:.1f}, {cell['ci_high']:.1f}]"
    return text + (f" ({cell['excluded']} excl.)" if cell.get("excluded") else "")


def _comparison_table(lines: list[dict], first: tuple[str, ...] = ()) -> list[str]:
    header = [*first, "family", "answer type", "metric", "n", *SYSTEMS.values()]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for line in lines:
        n = (line.get("model") or {}).get("n", "-")
        out.append("| " + " | ".join([*(str(line[k]) for k in ("organ",) if k in first), line["family"],
                                       line["answer_type"], line["metric"], str(n),
                                       *(_fmt(line.get(name)) for name in SYSTEMS)]) + " |")
    return out


def markdown(content: dict) -> str:
    """report.md: results first, then data, training, timings and machine, then the pretrained command."""
    lines = [
        "# medtune demo: VQA-RAD end to end", "",
        f"Run {content['started']} with `{content['command']}` (medtune {content['medtune_version']}).", "",
        f"> **{_statement_title(content)}** {content['statement']}", "",
        *_results_section(content), *_examples_section(content), *_validation_section(content),
        *_data_section(content), *_training_section(content),
        "## Next: chat with the model, serve it, score it", "",
        "```bash", *content["next_commands"], "```", "",
        "## The same recipe with pretrained parts", "",
        "On a GPU with access to the Hugging Face Hub, the same two stages with LLaVA-1.5's vision tower and "
        "language model (stage 2 LoRA-tunes the LM) are recipe overrides only:", "",
        "```bash", content["gpu_command"], "```", "",
    ]
    return "\n".join(lines)


def _statement_title(content: dict) -> str:
    if content["statement"] == RANDOM_STATEMENT:
        return "A pipeline demonstration, not a medical model."
    return "Not a medical device."


def _results_section(content: dict) -> list[str]:
    evaluation = content["evaluation"]
    types = ", ".join(f"{n} {t}" for t, n in sorted(evaluation["answer_types"].items()))
    return [
        f"## Results on the VQA-RAD test split ({evaluation['n']} questions: {types})", "",
        "Percentages with 95% percentile-bootstrap intervals (1,000 resamples). `compat` reproduces the "
        f"{evaluation['compat_flavour']} evaluation script (closed: the answer string inside the prediction, so "
        "\"no\" also matches \"normal\"" + _exclusion_note(evaluation['compat_flavour'])
        + "); `strict` counts a closed answer "
        "right only when it says exactly the right yes/no (or the exact answer), and an open answer on exact "
        "match after normalisation (recall: share of the answer's words in the prediction).", "",
        *_comparison_table(content["headline"]), "",
        *_caveats(content), "",
        f"![model and baselines]({content['figures']['results']})", "",
        "Baselines (learned from the questions the model trained on): **majority** answers every question with "
        f"the most frequent training answer of its type ({_majority(content)}); **question prior** answers "
        "with the most frequent training answer to the same (normalised) question, falling back to the "
        f"majority answer; it knew {content['baselines']['question_prior_coverage']} of the {evaluation['n']} "
        "test questions; the **question-only classifier** (TF-IDF of the question's words and word pairs, "
        "logistic regression over the training answers) generalises across rephrasings and never sees an "
        "image: a model that beats it uses the image, one that does not may be reading the question only.", "",
        "### Per organ", "",
        *_comparison_table(content["per_organ"], first=("organ",)), "",
    ]


def _examples_section(content: dict) -> list[str]:
    examples = content.get("examples") or []
    if not examples:
        return []
    out = ["### Example test questions", "",
           "The first right and wrong answers (strict) of each answer type, in test order:", "",
           "| image | question | model | truth | strict |", "| --- | --- | --- | --- | --- |"]
    for example in examples:
        image = f"![{example['id']}]({example['image']})" if example["image"] else "-"
        mark = "right" if example["strict_correct"] else "wrong"
        out.append(f"| {image} | {_md(example['question'])} ({example['answer_type']}, {example['organ'] or '-'}) | "
                   f"{_md(example['model'])} | {_md(example['truth'])} | {mark} |")
    return [*out, ""]


def _md(text) -> str:
    """Text for a Markdown table cell: one line, pipes escaped, long answers cut."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 80 else text[:77] + "..."


def _validation_section(content: dict) -> list[str]:
    validation = content.get("validation")
    if not validation:
        return []
    split, types = validation["split"], ", ".join(f"{n} {t}" for t, n in sorted(validation["answer_types"].items()))
    spread = validation["model_answers"]
    return [
        f"## Validation: {validation['n']} questions held out of the training set ({types})", "",
        f"The recipe's settings (model size, steps, learning rates) were chosen on this split, never on the test "
        f"split. It is a random {split.get('fraction', 0):.0%} of the cleaned training questions (seed "
        f"{split.get('seed')}, the same whatever `--seed`); the {split.get('removed_from_fit', 0)} training "
        f"questions that leak into it ({split.get('exact', 0)} exact pairs, {split.get('rephrasing', 0)} "
        f"rephrasings, as for the test split; {split.get('near', 0)} near duplicates and "
        f"{split.get('same_image_answer', 0)} questions on a validation image with that open question's answer, "
        "which the test split's construction leaves almost none of) were removed from training, so "
        f"{split.get('fit', '?')} questions trained the model and the baselines. The validation loss of every "
        f"stage is in the training table and loss figure. The model gave {spread['distinct']} distinct answers "
        "here.", "",
        *_comparison_table(validation["headline"]), "",
    ]


def _data_section(content: dict) -> list[str]:
    data, leakage = content["data"], content["data"]["leakage"]
    return [
        "## Data and leakage", "",
        f"Bundled VQA-RAD (MEVF split): {data['records']['train']} training and {data['records']['test']} test "
        f"questions, converted to canonical JSONL in `{Path(data['train']).parent}`. The leakage check removed "
        f"{leakage['removed']} training questions before training:", "",
        "| leakage | training questions |", "| --- | ---: |",
        f"| exact pairs (same image, question and answer as a test question) | {leakage['exact']} |",
        f"| templated rephrasings of test questions (of {leakage['frame_records']} frame records) | "
        f"{leakage['rephrasing']} |",
        f"| near-duplicate questions on the same image (kept, reported) | {leakage['near']} |",
        f"| **removed** | **{leakage['removed']}** |", "",
        f"{leakage['test_images_in_train']} of the {leakage['test_images']} test images also appear in training "
        f"({leakage['train_records_on_test_images']} training questions use them); VQA-RAD is built that way, "
        f"so images are kept and only question-answer leakage is removed. Of the {data['records']['clean_train']} "
        f"cleaned training questions, {data['records'].get('validation', 0)} are held out for validation (below) "
        f"and {data['records'].get('fit', data['records']['clean_train'])} train the model.", "",
    ]


def _training_section(content: dict) -> list[str]:
    machine = content["machine"]
    gpu = f"; GPU {machine['cuda']}" if machine.get("cuda") else "; no GPU"
    return [
        "## Training", "",
        *_training_table(content), "",
        *batching_notes(content),
        _what_training_saw(content), "",
        f"Precision: {_precisions(content)}.", "",
        f"![loss curves]({content['figures']['loss']})", "",
        f"Recipe `{content['recipe']['file']}`, run directory `{content['recipe']['run_dir']}`; final model "
        f"`{content['model']['final_model']}` (loads with `transformers` alone)"
        + (f", also at `{content['model']['link']}` (a link to the latest run's final model)."
           if content["model"].get("link") else "."), "",
        "## Timings", "",
        *_timings_table(content), "",
        f"Machine: {machine['usable_cores']} usable CPU cores (of {machine['cpu_count']}), "
        f"{machine['processor']}, {machine['platform']}; CPU flags {_flags(machine)}; torch {machine['torch']} "
        f"({machine['torch_threads']} threads; training keeps every usable core unless a stage sets "
        "`torch_threads`), "
        f"transformers {machine.get('transformers', '?')}, Python {machine['python']}{gpu}"
        + (f"; load average {', '.join(map(str, machine['load_average']))} (1, 5, 15 min) when the report was "
           "written" if machine.get("load_average") else "") + ".", "",
    ]


def _what_training_saw(content: dict) -> str:
    """Which questions each stage trained and was validated on, and that none is a test question."""
    records = content["data"]["records"]
    captions = (f" A stage with the `plain` template (caption alignment) trained on `captions.jsonl` instead: one "
                f"caption for each of the {records['captions']:,} images of `train-fit.jsonl`, its organ and the "
                "answers of the open modality, plane and organ questions `train-fit.jsonl` asks about it, so that "
                "the model learns to tell the images apart; no validation or test answer is in a caption."
                if records.get("captions") else "")
    return (f"The stages trained on `train-fit.jsonl` ({records['fit']:,} questions of the VQA-RAD training split: "
            f"the {records['clean_train']:,} left by the leakage check less the {records['validation']:,} "
            "validation questions and the training questions that leak into them; answers lower-cased, as both "
            f"metric families compare them).{captions} Every stage measured its validation loss on "
            "`validation.jsonl` (answers lower-cased too). No stage saw a test question or a test answer; the "
            "offline tokenizer's word pieces are learned from the text of all bundled VQA-RAD files (test "
            "questions included), which tells it which words exist, not which answer goes with which question.")


def _flags(machine: dict) -> str:
    """The SIMD flags that decide the precision and speed, and any cap on the instruction sets torch uses."""
    flags = ", ".join(machine.get("cpu_flags") or []) or "none of avx2, avx512f, avx512_bf16, amx_bf16"
    caps = machine.get("isa_caps") or {}
    return flags + (f" (capped: {', '.join(f'{k}={v}' for k, v in caps.items())})" if caps else "")


def _precisions(content: dict) -> str:
    names = {"fp32": "fp32", "bf16": "bf16 autocast (fp32 weights; chosen where the machine computes bf16 natively)"}
    used = dict.fromkeys(stage.get("precision", "fp32") for stage in content["training"]["stages"])
    return "; ".join(names.get(p, p) for p in used)


def _exclusion_note(flavour: str) -> str:
    return "; its yes/no quirk leaves some closed items out, counted as 'excl.'" if flavour == "llava-med-init" else ""


def _caveats(content: dict) -> list[str]:
    """Plain statements a reader needs before comparing the numbers above."""
    spread, n = content["model_answers"], content["evaluation"]["n"]
    distinct = f"{spread['distinct']} distinct answer" + ("s" if spread["distinct"] != 1 else "")
    lines = [f"The model gave {distinct} to the {n} questions; its most frequent answer, "
             f"\"{spread['most_common']}\", appears {spread['most_common_count']} times."]
    lines.append(verdict(content["headline"]))
    scale = content["options"].get("steps_scale", 1.0)
    if scale < 1:
        lines.append(SHORT_RUN_NOTE.format(scale=scale))
    compat_closed = next((h["model"] for h in content["headline"] if (h["family"], h["answer_type"], h["metric"])
                          == ("compat", "closed", "accuracy")), None)
    if compat_closed and compat_closed.get("excluded"):
        lines.append(f"The compat closed accuracy leaves out {compat_closed['excluded']} of the model's closed "
                     "answers (an answer containing yes/no but not the truth drops out of the script's "
                     "denominator), so a constant answer can reach 100%: compare systems on strict closed "
                     "accuracy.")
    return [" ".join(lines)]


def verdict(headline: list[dict]) -> str:
    """Whether the model beats the better answer-prior baseline and the question-only classifier on strict
    closed and strict all accuracy, said plainly, and what it scores with its images blanked. The first says
    whether it learned more than answer counts; the second whether it does better than reading the question
    alone; the third how much of its score comes from the image."""
    said = []
    for answer_type in ("closed", "all"):
        line = next((h for h in headline if (h["family"], h["answer_type"], h["metric"])
                     == ("strict", answer_type, "accuracy")), None)
        if line is None or not line.get("model") or line["model"]["value"] is None:
            continue
        model = line["model"]["value"]
        for names, what in ((ANSWER_PRIORS, "the better answer-prior baseline"),
                            (("question_classifier",), "the question-only classifier")):
            best = max((line[name]["value"] for name in names if line.get(name)
                        and line[name]["value"] is not None), default=None)
            if best is not None:
                beats = "beats" if model > best else "does not beat"
                said.append(f"on strict {answer_type} accuracy the model {beats} {what} ({model:.1f} vs {best:.1f})")
        blank = (line.get("model_blank_image") or {}).get("value")
        if blank is not None:
            said.append(f"with its images blanked it scores {blank:.1f} strict {answer_type} "
                        f"({model - blank:+.1f} points from the images)")
    return ("Point estimates: " + "; ".join(said) + ".") if said else ""


def _majority(content: dict) -> str:
    return ", ".join(f"{t}: \"{a}\"" for t, a in content["baselines"]["majority"].items())


def _training_table(content: dict) -> list[str]:
    out = ["| stage | trained on | steps | samples | batch | learning rates | first loss | last loss | train loss | "
           "validation loss (first → last) | seconds | run |",
           "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for stage in content["training"]["stages"]:
        curve, validation = stage["loss_curve"], stage.get("validation_curve") or []
        rates = ", ".join(f"{part} {lr:g}" for part, lr in stage["lr"].items() if lr)
        first, last = (f"{curve[0][1]:.3f}", f"{curve[-1][1]:.3f}") if curve else ("-", "-")
        held = f"{validation[0][1]:.3f} → {validation[-1][1]:.3f}" if validation else "-"
        loss = f"{stage['train_loss']:.3f}" if stage.get("train_loss") is not None else "-"
        seconds = f"{stage['seconds']:.0f}" if stage.get("seconds") is not None else "-"
        trained_on = f"`{Path(stage['data']).name}`" if stage.get("data") else "-"
        out.append(f"| {stage['name']} | {trained_on} | {stage.get('steps') or '-'} | {stage.get('samples') or '-'} | "
                   f"{stage['batch_size']} | {rates} | {first} | {last} | {loss} | {held} | {seconds} | "
                   f"{'reused' if stage['reused'] else 'ran'} |")
    return out


def batching_notes(content: dict) -> list[str]:
    """A line per stage whose batches are grouped by length: why its logged loss alternates step to step."""
    from medtune.models.sampler import mega_batch_factor

    notes = []
    for stage in content["training"]["stages"]:
        grouped = stage.get("group_by_length")
        if grouped:
            factor = mega_batch_factor(grouped)
            notes += [f"Stage {stage['name']} groups its batches by length (`group_by_length: {grouped}`): each "
                      f"run of {factor} batches is {factor * stage['batch_size']} random samples sorted by length, "
                      f"so there is less padding to compute, and the logged loss alternates between batches of "
                      f"short questions (mostly closed) and long ones (mostly open) with a period of {factor} "
                      f"steps; the smoothed curve shows the trend.", ""]
    return notes


def add_first_run_timings(timings: list[dict], output: Path, run_dir: str) -> None:
    """Give each reused phase the time it took when it ran, from the previous report of the same run."""
    try:
        previous = json.loads((output / REPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if previous.get("recipe", {}).get("run_dir") != run_dir:
        return
    earlier = {t["phase"]: t.get("first_run_seconds", t["seconds"] if t["status"] == "ran" else None)
               for t in previous.get("timings", {}).get("phases", [])}
    for timing in timings:
        if timing["status"] == "reused" and earlier.get(timing["phase"]) is not None:
            timing["first_run_seconds"] = earlier[timing["phase"]]


def _timings_table(content: dict) -> list[str]:
    timings = content.get("timings", {"phases": [], "total_seconds": 0})
    out = ["| phase | seconds | run |", "| --- | ---: | --- |"]
    for t in timings["phases"]:
        note = t["status"] + (f" (ran in {t['first_run_seconds']:.1f} s)" if "first_run_seconds" in t else "")
        out.append(f"| {t['title']} | {t['seconds']:.1f} | {note} |")
    out.append(f"| **total** | **{timings['total_seconds']:.1f}** | {_runs(timings['phases'])} |")
    return out


def _runs(phases: list[dict]) -> str:
    ran = sum(t["status"] == "ran" for t in phases)
    return f"{ran} ran, {len(phases) - ran} reused"


def write_files(output: Path, content: dict) -> None:
    write_json(output / REPORT_JSON, content)
    with atomic_open(output / REPORT_MD) as handle:
        handle.write(markdown(content))


def print_summary(content: dict, output: Path) -> None:
    """The table a person sees at the end of the run, and where the report is."""
    print()
    for line in content["headline"]:
        cells = "  ".join(f"{name}: {_fmt(line.get(name)):>24}" for name in SYSTEMS)
        print(f"{line['family']:6} {line['answer_type']:6} {line['metric']:8}  {cells}")
    timings = content["timings"]
    print(f"\ndemo finished in {timings['total_seconds'] / 60:.1f} min; report: {output / REPORT_MD} "
          f"(+ {REPORT_JSON}, {LOSS_PNG}, {RESULTS_PNG})")
    model = content["model"]
    print(f"final model: {model['link'] or model['final_model']}"
          + (f" (-> {model['final_model']})" if model["link"] else ""))
    print("next: chat with it, serve it (OpenAI-compatible API), score it:")
    for command in content["next_commands"]:
        print(f"  {command}")
