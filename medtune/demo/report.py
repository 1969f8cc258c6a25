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
SYSTEMS = {"model": "model", "majority": "majority baseline", "question_prior": "question-prior baseline"}
# (family, answer type, metric) shown in the main table, in this order.
HEADLINE = (("compat", "closed", "accuracy"), ("compat", "open", "recall"),
            ("strict", "closed", "accuracy"), ("strict", "closed", "unparsed"), ("strict", "open", "recall"),
            ("strict", "open", "exact"), ("strict", "all", "accuracy"))
ORGAN_METRICS = (("compat", "closed", "accuracy"), ("compat", "open", "recall"),
                 ("strict", "closed", "accuracy"), ("strict", "open", "exact"))
# The same recipe with pretrained parts: LLaVA-1.5's vision tower and language model, bf16 on one GPU. CLIP-336
# gives 576 image tokens, hence the longer rows; the LM is LoRA-tuned in stage 2 (a full 7B fine-tune with Adam
# does not fit one 80 GB GPU) at LLaVA's rates rather than the from-scratch rates of the demo.
PRETRAINED_OVERRIDES = (
    "model.vision=openai/clip-vit-large-patch14-336", "model.llm=lmsys/vicuna-7b-v1.5", "model.tokenizer=null",
    "stages.*.precision=bf16", "stages.*.max_length=1024", "stages.*.gradient_checkpointing=true",
    "stages.1.lr.llm=0", "stages.1.lr.projector=2e-5", "stages.1.lora.r=64", "stages.1.lr.lora=2e-4")
RANDOM_STATEMENT = (
    "This model is randomly initialised: its vision encoder, projector and language model are built from "
    "configs and its tokenizer is trained offline on bundled text, so it starts knowing nothing about images "
    "or language. Trained for a few minutes on a CPU, it demonstrates that the pipeline runs end to end "
    "(conversion, leakage removal, two-stage training, evaluation, baselines, report); it is not a medical "
    "model and its answers must not be used for anything. Read its figures against the baselines: a model "
    "this small mostly learns answer priors, which the baselines measure directly.")
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
    task: object
    samples: list
    scored: list
    baselines: dict
    predictions: Path
    predictions_reused: int
    machine: dict
    compat_flavour: str


# ---- content ---------------------------------------------------------------------------------------------


def build_content(output: Path, context: DemoContext) -> dict:
    """report.json's content; also draws the figures into ``output``."""
    import dataclasses

    rows = {s.name: s.rows for s in context.scored}
    stages = [{**stage, "loss_curve": loss_points(Path(stage["metrics"]))} for stage in context.stages]
    write_loss_figure(output / LOSS_PNG, stages)
    headline = compare_rows(rows, HEADLINE)
    write_results_figure(output / RESULTS_PNG, [line for line in headline if line["metric"] != "unparsed"])
    options = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(context.options).items()}
    baseline_files = {name: str(output / "baselines" / f"{name}.jsonl") for name in SYSTEMS if name != "model"}
    return {
        "title": "medtune demo", "medtune_version": __version__, "started": context.started,
        "command": context.command, "machine": context.machine, "options": options,
        "statement": statement(context.recipe.model, context.data.manifest["records"]["clean_train"]),
        "data": {"train": str(context.data.train), "test": str(context.data.test),
                 "clean_train": str(context.data.clean_train), "image_root": str(context.data.image_root),
                 "records": context.data.manifest["records"], "leakage": context.data.manifest["leakage"]},
        "model": {"spec": context.recipe.model, "final_model": str(context.final_model)},
        "recipe": {"file": str(context.recipe_file), "fingerprint": context.fingerprint,
                   "run_dir": str(context.run_dir), "overrides": list(context.options.overrides)},
        "training": {"stages": stages},
        "evaluation": evaluation_section(context),
        "baselines": {**context.baselines, "files": baseline_files},
        "headline": headline,
        "model_answers": answer_spread(context.scored[0]),
        "per_organ": organ_rows(rows),
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


def gpu_command() -> str:
    """The same demo with pretrained parts: recipe overrides only (the preset's parts are all replaced)."""
    return " ".join(["medtune demo --output medtune-output/demo-pretrained", *PRETRAINED_OVERRIDES])


def answer_spread(scored) -> dict:
    """How varied the model's answers are: a model that learned only a prior answers the same thing."""
    answers = Counter(" ".join(item.prediction.lower().split()) for item in scored.items)
    text, count = answers.most_common(1)[0]
    return {"distinct": len(answers), "most_common": text, "most_common_count": count}


def loss_points(metrics_file: Path) -> list[list[float]]:
    """``[[step, loss], ...]`` from a stage's metrics.jsonl (lines with a training loss)."""
    if not metrics_file.is_file():
        return []
    points = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if "loss" in record:
                points.append([record["step"], record["loss"]])
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


def write_loss_figure(path: Path, stages: list[dict]) -> None:
    """One panel per stage: training loss against optimizer step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        points = stage["loss_curve"]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 20 else None,
                    color="#4C72B0")
        else:
            ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"stage {stage['name']}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _drawable(cell: dict | None) -> dict:
    """Undefined figures are drawn as empty bars (the table says "-")."""
    if cell is None or cell["value"] is None:
        return {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    return cell


def write_results_figure(path: Path, headline: list[dict]) -> None:
    """Grouped bars: each headline metric, one bar per system, 95% bootstrap intervals as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(headline) + 2), 3.8))
    width = 0.8 / len(SYSTEMS)
    colours = ("#4C72B0", "#DD8452", "#55A868")
    for offset, (name, label) in enumerate(SYSTEMS.items()):
        cells = [_drawable(line.get(name)) for line in headline]
        values = [c["value"] for c in cells]
        errors = [[c["value"] - c["ci_low"] for c in cells], [c["ci_high"] - c["value"] for c in cells]]
        ax.bar([i + (offset - 1) * width for i in range(len(headline))], values, width, yerr=errors, capsize=3,
               label=label, color=colours[offset])
    ax.set_xticks(range(len(headline)),
                  [f"{l['family']}\n{l['answer_type']} {l['metric']}" for l in headline], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("% (95% bootstrap CI)")
    ax.set_title("VQA-RAD test: model and baselines")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


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
        *_results_section(content), *_data_section(content), *_training_section(content),
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
        "Baselines (learned from the same cleaned training split): **majority** answers every question with "
        f"the most frequent training answer of its type ({_majority(content)}); **question prior** answers "
        "with the most frequent training answer to the same (normalised) question, falling back to the "
        f"majority answer; it knew {content['baselines']['question_prior_coverage']} of the {evaluation['n']} "
        "test questions.", "",
        "### Per organ", "",
        *_comparison_table(content["per_organ"], first=("organ",)), "",
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
        f"so images are kept and only question-answer leakage is removed. Training uses "
        f"{data['records']['clean_train']} questions.", "",
    ]


def _training_section(content: dict) -> list[str]:
    machine = content["machine"]
    gpu = f"; GPU {machine['cuda']}" if machine.get("cuda") else "; no GPU"
    return [
        "## Training", "",
        *_training_table(content), "",
        f"![loss curves]({content['figures']['loss']})", "",
        f"Recipe `{content['recipe']['file']}`, run directory `{content['recipe']['run_dir']}`; final model "
        f"`{content['model']['final_model']}` (loads with `transformers` alone).", "",
        "## Timings", "",
        *_timings_table(content), "",
        f"Machine: {machine['usable_cores']} usable CPU cores (of {machine['cpu_count']}), "
        f"{machine['processor']}, {machine['platform']}; torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine.get('transformers', '?')}, Python "
        f"{machine['python']}{gpu}.", "",
    ]


def _exclusion_note(flavour: str) -> str:
    return "; its yes/no quirk leaves some closed items out, counted as 'excl.'" if flavour == "llava-med-init" else ""


def _caveats(content: dict) -> list[str]:
    """Plain statements a reader needs before comparing the numbers above."""
    spread, n = content["model_answers"], content["evaluation"]["n"]
    distinct = f"{spread['distinct']} distinct answer" + ("s" if spread["distinct"] != 1 else "")
    lines = [f"The model gave {distinct} to the {n} questions; its most frequent answer, "
             f"\"{spread['most_common']}\", appears {spread['most_common_count']} times."]
    compat_closed = next((h["model"] for h in content["headline"] if (h["family"], h["answer_type"], h["metric"])
                          == ("compat", "closed", "accuracy")), None)
    if compat_closed and compat_closed.get("excluded"):
        lines.append(f"The compat closed accuracy leaves out {compat_closed['excluded']} of the model's closed "
                     "answers (an answer containing yes/no but not the truth drops out of the script's "
                     "denominator), so a constant answer can reach 100%: compare systems on strict closed "
                     "accuracy.")
    return [" ".join(lines)]


def _majority(content: dict) -> str:
    return ", ".join(f"{t}: \"{a}\"" for t, a in content["baselines"]["majority"].items())


def _training_table(content: dict) -> list[str]:
    out = ["| stage | steps | samples | batch | learning rates | first loss | last loss | train loss | seconds | |",
           "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for stage in content["training"]["stages"]:
        curve = stage["loss_curve"]
        rates = ", ".join(f"{part} {lr:g}" for part, lr in stage["lr"].items() if lr)
        first, last = (f"{curve[0][1]:.3f}", f"{curve[-1][1]:.3f}") if curve else ("-", "-")
        loss = f"{stage['train_loss']:.3f}" if stage.get("train_loss") is not None else "-"
        seconds = f"{stage['seconds']:.0f}" if stage.get("seconds") is not None else "-"
        out.append(f"| {stage['name']} | {stage.get('steps') or '-'} | {stage.get('samples') or '-'} | "
                   f"{stage['batch_size']} | {rates} | {first} | {last} | {loss} | {seconds} | "
                   f"{'reused' if stage['reused'] else ''} |")
    return out


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
    out = ["| phase | seconds | |", "| --- | ---: | --- |"]
    for t in timings["phases"]:
        note = t["status"] + (f" (ran in {t['first_run_seconds']:.1f} s)" if "first_run_seconds" in t else "")
        out.append(f"| {t['title']} | {t['seconds']:.1f} | {note} |")
    out.append(f"| **total** | **{timings['total_seconds']:.1f}** | |")
    return out


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
