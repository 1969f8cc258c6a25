"""``medtune eval``: score predictions, compare runs, merge shards, list tasks, and run a model.

    medtune eval score PREDICTIONS (--task T [--data PATH] | --gt FILE [--gt-format F]) [--metrics compat,strict]
                       [--compat-flavour med-moe|llava-med|llava-med-init] [--out DIR] [--allow-missing]
                       [--judge-endpoint URL --judge-model NAME]
    medtune eval compare A B          (also: medtune eval --compare A B)
    medtune eval merge SHARD... --out FILE [--task T [--data PATH] | --gt FILE]
    medtune eval tasks
    medtune eval suite NAME (--model PATH | --endpoint URL) --out DIR --data [TASK=]PATH... [--image-root [TASK=]DIR]
                     [--limit N] [--circular] [--judge-endpoint URL --judge-model NAME]
    medtune eval run --task T (--model PATH | --endpoint URL) --out DIR [--num-shards N --shard-index I]
                     [--limit N] [--batch-size B] [--protocol medtune|medmax] [--metrics ...,medmax]

Nothing heavy is imported here. Paths are checked before any work (a missing, empty, unreadable or binary file, a
folder where a file is expected, a model path with no checkpoint: one line each, exit code 2). ``run`` checks its options and calls ``medtune.eval.run.run_task``,
which answers the task's questions through a backend (local model or OpenAI-compatible endpoint), appends each
answer to the shard's predictions file as it comes, and scores the (merged) file with the same
``score.score_predictions`` that ``eval score`` uses, so a run and a later re-scoring write the same report.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from medtune.distributed import process_device, shard_from_env   # environment only: no torch at import
from medtune.eval.judge import JUDGE_KEY_ENV   # plain Python


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate on medical VQA: score, compare, merge, run",
                                   description="Evaluate models on medical VQA benchmarks.")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare two scoring runs (results.json or their folders)")
    parser.set_defaults(func=_eval_root, eval_parser=parser)
    verbs = parser.add_subparsers(dest="eval_verb", metavar="ACTION")
    _add_score(verbs)
    _add_compare(verbs)
    _add_merge(verbs)
    verbs.add_parser("tasks", help="list the built-in tasks and suites",
                     description="List the built-in tasks (for --task) and suites (for `eval suite`), with what "
                                 "each needs.").set_defaults(func=_tasks)
    _add_run(verbs)
    _add_suite(verbs)


def _add_task_options(parser, *, required: bool) -> None:
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--task", help="a built-in task (see `medtune eval tasks`)")
    source.add_argument("--gt", type=Path, help="ground truth: any file with answers and answer types")
    parser.add_argument("--data", type=Path, help="where the task's questions are (default: bundled, if any)")
    parser.add_argument("--gt-format", default=None,
                        help="format of --gt or --data (default for --gt: canonical for .jsonl, llava-med-vqa "
                             "(LLaVA-Med / Med-MoE test JSON) otherwise; for --data: the task's own)")


def _add_score(verbs) -> None:
    p = verbs.add_parser("score", help="score a predictions file (medtune or LLaVA-Med/Med-MoE answers)",
                         description="Score PREDICTIONS against a task's ground truth with each metric family, "
                                     "with bootstrap 95%% intervals; print the headline figures and the reference "
                                     "script's table, and with --out write the reports (see docs/evaluation.md).")
    p.add_argument("predictions", type=Path, help="JSONL: medtune predictions or LLaVA-Med answer file")
    _add_task_options(p, required=True)
    p.add_argument("--metrics", default="compat,strict",
                   help="families, comma-separated: compat (alias llava-med), strict, judge, medmax "
                        "(MedMax's rules; open answers need --judge-endpoint) (default %(default)s)")
    from medtune.eval import compat  # light: the flavour table, no metric libraries
    p.add_argument("--compat-flavour", choices=compat.FLAVOURS, default="med-moe",
                   help="which reference script the compat family reproduces (default %(default)s)")
    p.add_argument("--candidates", type=Path,
                   help="LLaVA-Med candidate answer file: adds its 'open accuracy' (llava-med flavour)")
    p.add_argument("--medmax-truth", choices=("verbatim", "normalised"), default="verbatim",
                   help="medmax family: compare with the truth as the file writes it, as MedMax does, or stripped "
                        "and lower-cased (for files that write 'Yes') (default %(default)s)")
    p.add_argument("--out", type=Path, help="folder for results.json, results.md, results.png, wrong_answers.jsonl")
    p.add_argument("--allow-missing", action="store_true", help="score questions without a prediction as wrong")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    _add_bootstrap_options(p)
    p.add_argument("--judge-endpoint", help=f"OpenAI-compatible base URL for the LLM judge (key: ${JUDGE_KEY_ENV})")
    p.add_argument("--judge-model", help="model name at the judge endpoint")
    p.add_argument("--circular", action="store_true",
                   help="the predictions answer every option rotation (a run with --circular): add circular_accuracy")
    p.set_defaults(func=_score)


def _add_compare(verbs) -> None:
    p = verbs.add_parser("compare", help="two scoring runs side by side",
                         description="Line up two scoring runs metric by metric and say whether their 95%% "
                                     "intervals overlap (a quick, conservative check, not a test).")
    p.add_argument("a", type=Path, metavar="A", help="first run: its results.json or its folder")
    p.add_argument("b", type=Path, metavar="B", help="second run: its results.json or its folder")
    p.add_argument("--all-groups", action="store_true", help="include the per-organ and per-modality rows")
    p.set_defaults(func=_compare)


def _add_merge(verbs) -> None:
    p = verbs.add_parser("merge", help="merge shard prediction files; every id exactly once",
                         description="Merge the predictions files of a sharded run into one; with --task or --gt, "
                                     "fail naming any question missing, answered twice or unknown.")
    p.add_argument("shards", nargs="+", type=Path, metavar="SHARD", help="a shard's predictions JSONL")
    p.add_argument("--out", type=Path, required=True, help="the merged predictions JSONL to write")
    _add_task_options(p, required=False)
    p.set_defaults(func=_merge)


def _add_run(verbs) -> None:
    p = verbs.add_parser("run", help="answer a task's questions with a model or an endpoint, then score",
                         description="Answer every question of a task with a local model or an OpenAI-compatible "
                                     "endpoint, writing each answer to OUT/predictions.jsonl as it comes (a rerun "
                                     "resumes), then score it as `eval score` does. Shards split the questions "
                                     "between processes, by hand or under torchrun.")
    p.add_argument("--task", default="vqa-rad", help="a built-in task (default: bundled VQA-RAD test split)")
    p.add_argument("--data", type=Path, help="where the task's questions are (default: bundled, if any)")
    p.add_argument("--gt-format", default=None, help="format of --data")
    p.add_argument("--image-root", type=Path, help="folder the questions' image paths are relative to")
    backend = p.add_mutually_exclusive_group(required=True)
    backend.add_argument("--model", help="a local checkpoint (medtune or Hugging Face)")
    backend.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                         "(API key: $MEDTUNE_ENDPOINT_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--endpoint-model", help="model name at the endpoint")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for predictions and the report; running again into it resumes")
    _add_generation_options(p, "the task")
    p.add_argument("--prompt-style", choices=("plain", "short", "llava-med", "med-moe"), default="plain",
                   help="plain: the question alone; short: ask for a word or phrase; llava-med / med-moe: the "
                        "prompt of LLaVA-Med's model_vqa.py / Med-MoE's model_vqa_med.py (the question alone, in "
                        "the conversation mode the checkpoint was imported with, which is checked); "
                        "multiple-choice questions keep their options and letter instruction in every style "
                        "(default %(default)s)")
    p.add_argument("--num-shards", type=_positive_int, default=1, metavar="N",
                   help="split the questions into N shards, each answered by its own run into the same --out; "
                        "the last to finish merges and scores (default %(default)s; under torchrun: WORLD_SIZE)")
    p.add_argument("--shard-index", type=int, default=0, metavar="I",
                   help="the shard this run answers, 0..N-1 (default %(default)s; under torchrun: RANK)")
    p.add_argument("--shard-mode", choices=("modulo", "contiguous"), default="modulo",
                   help="which questions a shard gets: modulo, question i goes to shard i mod N (shards get a "
                        "similar mix and finish together); contiguous, one block of the task order each "
                        "(default %(default)s)")
    from medtune.eval.tasks import PROTOCOLS
    p.add_argument("--protocol", choices=PROTOCOLS, default="medtune",
                   help="generation budgets: medtune's, or MedMax's (1 token for closed/mcq, scaled to the "
                        "model's tokenizer; 60 for open) (default %(default)s)")
    p.add_argument("--metrics", default="compat,strict",
                   help="families, comma-separated: compat, strict, medmax (open answers left unjudged) "
                        "(default %(default)s)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable question or image")
    p.add_argument("--circular", action="store_true",
                   help="ask every multiple-choice question once per rotation of its options (MMBench CircularEval)")
    p.set_defaults(func=_run)


def _add_suite(verbs) -> None:
    from medtune.eval.suite import SUITES
    p = verbs.add_parser("suite", help="run a named list of tasks into one report (medmax-12, gmai)",
                         description="Run every task of suite NAME as `eval run` does, one subfolder each, and "
                                     "write suite.json and suite.md on top. `medtune eval tasks` lists each "
                                     "suite's tasks.")
    p.add_argument("name", choices=list(SUITES), metavar="NAME",
                   help="; ".join(f"{name}: {suite.description}" for name, suite in SUITES.items()))
    backend = p.add_mutually_exclusive_group(required=True)
    backend.add_argument("--model", help="a local checkpoint (medtune or Hugging Face)")
    backend.add_argument("--endpoint", help="OpenAI-compatible base URL (API key: $MEDTUNE_ENDPOINT_API_KEY)")
    p.add_argument("--endpoint-model", help="model name at the endpoint")
    p.add_argument("--out", type=Path, required=True, help="folder: one subfolder per task, suite.json/.md on top")
    p.add_argument("--data", action="append", default=[], metavar="[TASK=]PATH",
                   help="a task's data file; PATH alone: every task (medmax-12 reads one release file)")
    p.add_argument("--image-root", action="append", default=[], metavar="[TASK=]DIR",
                   help="a task's image folder; DIR alone: every task")
    _add_generation_options(p, "each task")
    p.add_argument("--circular", action="store_true", help="circular evaluation of multiple-choice tasks")
    p.add_argument("--judge-endpoint", help=f"OpenAI-compatible judge (key: ${JUDGE_KEY_ENV}): MedMax's open "
                   "answers, VLMEvalKit's unmatched mcq answers")
    p.add_argument("--judge-model", help="model name at the judge endpoint")
    _add_bootstrap_options(p)
    p.set_defaults(func=_suite, metrics="compat,strict")


def _add_generation_options(p, questions: str) -> None:
    """How `eval run` and `eval suite` answer: batch, limit, and the local model's device and dtype."""
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="questions per generate call (local) or requests in flight (endpoint) "
                        "(default %(default)s)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help=f"only the first N questions of {questions}")
    p.add_argument("--device", default="auto",
                   help="local model: cpu, cuda, cuda:1 ... (default %(default)s: this process's GPU if any, "
                        "else cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="local model weights' dtype (default: the checkpoint's)")


def _add_bootstrap_options(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals (default %(default)s)")


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _eval_root(args) -> int:
    if args.compare:
        print(_compare_text(*args.compare, all_groups=False))
        return 0
    args.eval_parser.print_help()
    return 2


def task_from_args(args):
    from medtune.eval.tasks import get_task
    if getattr(args, "gt", None):
        guess = "canonical" if args.gt.suffix == ".jsonl" else "llava-med-vqa"
        return get_task("custom", data=args.gt, data_format=args.gt_format or guess)
    return get_task(args.task, data=args.data, data_format=args.gt_format,
                    image_root=getattr(args, "image_root", None), prompt_style=getattr(args, "prompt_style", "plain"),
                    protocol=getattr(args, "protocol", "medtune"), circular=getattr(args, "circular", False))


def _families(text: str) -> tuple[str, ...]:
    from medtune.errors import UserError
    from medtune.eval.metrics import FAMILIES
    aliases = {"llava-med": "compat", "med-moe": "compat"}  # the name for the compatibility family
    families = tuple(dict.fromkeys(aliases.get(f.strip(), f.strip()) for f in text.split(",") if f.strip()))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise UserError(f"--metrics: unknown families {unknown} (choose from {', '.join(FAMILIES)})")
    return families


def _judge(args):
    from medtune.errors import UserError
    if not args.judge_endpoint:
        if "judge" in _families(args.metrics):
            raise UserError("the judge family needs --judge-endpoint and --judge-model")
        return None
    if not args.judge_model:
        raise UserError("--judge-endpoint needs --judge-model")
    from medtune.eval.judge import Judge
    return Judge(args.judge_endpoint, args.judge_model, api_key=os.environ.get(JUDGE_KEY_ENV))


def _score(args) -> int:
    from medtune.errors import UserError
    from medtune.eval.metrics import MissingPredictions
    from medtune.eval.score import read_candidates, score_predictions

    from medtune.eval.compat import get_flavour

    if args.candidates and not get_flavour(args.compat_flavour).open_accuracy:
        raise UserError("--candidates is used by the llava-med flavours only (add --compat-flavour llava-med)")
    families = _families(args.metrics)
    _check_inputs(args, predictions=args.predictions)
    try:
        result = score_predictions(task_from_args(args), args.predictions, out_dir=args.out, families=families,
                                   compat_flavour=args.compat_flavour, judge=_judge(args),
                                   medmax_truth=args.medmax_truth,
                                   candidates=read_candidates(args.candidates) if args.candidates else None,
                                   allow_missing=args.allow_missing, strict=args.strict,
                                   resamples=args.resamples, seed=args.seed)
    except MissingPredictions as error:
        raise UserError(str(error)) from None
    for row in result.headline():
        print(f"{row.family:7s} {row.answer_type:6s} {row.metric:9s} {row.estimate.value:6.2f} "
              f"[{row.estimate.low:.2f}, {row.estimate.high:.2f}] n={row.estimate.n}"
              + (f" ({row.excluded} excluded)" if row.excluded else ""))
    if result.compat_table is not None:
        print(f"\ncompat table ({result.compat_table.flavour}):\n{result.compat_table.render()}")
        print(f"note: {result.compat_table.exact_match_note}")
    if result.medmax_table is not None:
        print(f"\n{result.medmax_table.render()}")
    if result.probmed_table is not None:
        print(f"\n{result.probmed_table.render()}")
    for name, tally in result.tallies.items():
        if tally.n_skipped:
            print(f"{name.replace('_', ' ')}: {tally.summary()}", file=sys.stderr)
    missing = sum(i.missing for i in result.items)
    print(f"\n{len(result.items)} questions scored, {missing} without prediction, "
          f"{len(result.unexpected)} unexpected predictions" +
          (f"; report in {args.out}" if args.out else ""))
    return 0


def _check_inputs(args, **files) -> None:
    """Each named file (predictions, shards ...) and the task's own files must be readable text; the image root a
    folder that exists."""
    from medtune.data.files import readable_text_file

    for what, paths in files.items():
        for path in paths if isinstance(paths, list) else [paths]:
            readable_text_file(path, f"{what} file".replace("_", " "))
    for what in ("gt", "data"):   # benchmark files: the format layer reads Parquet releases too
        if getattr(args, what, None) is not None:
            readable_text_file(getattr(args, what), {"gt": "ground-truth file", "data": "task data file"}[what],
                               parquet=True)
    if getattr(args, "image_root", None) is not None:
        from medtune.data.images import require_image_root
        require_image_root(args.image_root)


def _results_file(path) -> Path:
    """A scoring run's results.json (or its folder), checked to be one before comparing."""
    import json

    from medtune.data.files import readable_text_file
    from medtune.errors import UserError
    from medtune.eval.report import RESULTS_FILE

    path = Path(path)
    results = readable_text_file(path / RESULTS_FILE if path.is_dir() else path, "results.json")
    try:
        rows = json.loads(results.read_text(encoding="utf-8")).get("rows")
    except (ValueError, AttributeError):
        rows = None
    if not isinstance(rows, list):
        raise UserError(f"{results}: not a medtune results.json (no 'rows'; pass a results file or the folder of "
                        "a scoring run)")
    return results


def _compare_text(a, b, *, all_groups: bool) -> str:
    from medtune.eval.report import compare
    return compare(_results_file(a), _results_file(b), all_groups=all_groups)


def _compare(args) -> int:
    print(_compare_text(args.a, args.b, all_groups=args.all_groups))
    return 0


def _merge(args) -> int:
    from medtune.errors import UserError
    from medtune.eval.predictions import MergeError, merge_predictions

    _check_inputs(args, predictions_shard=list(args.shards))
    expected = None
    if args.task or args.gt:
        expected = [s.id for s in task_from_args(args).samples()]
    try:
        written = merge_predictions(args.shards, args.out, expected)
    except MergeError as error:
        raise UserError(str(error)) from None
    print(f"{len(args.shards)} shards merged, {written} predictions written to {args.out}")
    return 0


def _tasks(args) -> int:
    from medtune.eval.suite import SUITES
    from medtune.eval.tasks import TASKS
    width = max(len(name) for name in TASKS)
    for name, spec in TASKS.items():
        print(f"{name:{width}s}  {spec.description}")
    print("\nsuites (medtune eval suite NAME):")
    for name, suite in SUITES.items():
        print(f"{name:{width}s}  {suite.description}: {', '.join(t.name for t in suite.tasks)}")
    return 0


def _keyed_paths(values: list[str]) -> dict[str, Path]:
    """``TASK=PATH`` (or ``PATH``, for every task: key ``*``) options as a dict."""
    out = {}
    for value in values:
        key, sep, path = value.partition("=")
        out[key if sep else "*"] = Path(path if sep else value)
    return out


def _suite(args) -> int:
    """``medtune eval suite NAME``: run each task as ``eval run`` would, then write the suite report."""
    from medtune.errors import UserError
    from medtune.eval.backends import BackendError
    from medtune.eval.metrics import MissingPredictions
    from medtune.eval.run import ResumeMismatch, run_task
    from medtune.eval.score import score_predictions
    from medtune.eval.suite import get_suite, run_suite, suite_tasks

    suite = get_suite(args.name)
    try:
        tasks = suite_tasks(suite, _keyed_paths(args.data), _keyed_paths(args.image_root),
                            circular=args.circular)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    judge = _judge(args)
    backend = _backend_from_args(args)
    if suite.protocol == "medmax":
        tasks = [_with_model_tokenizer(task, backend) for task in tasks]
    families = (suite.family,)

    def run_one(task, folder):
        result = run_task(task, backend, folder, batch_size=args.batch_size, limit=args.limit,
                          families=families, score=judge is None, progress=True)
        print(summary_line(result))
        if judge is not None and result.predictions_path is not None:
            from medtune.eval.run import LimitedTask
            return score_predictions(LimitedTask.of(task, args.limit), result.predictions_path, out_dir=folder,
                                     families=families, judge=judge, resamples=args.resamples, seed=args.seed)
        return result

    try:
        rows = run_suite(suite, tasks, args.out, run_one, resamples=args.resamples, seed=args.seed)
    except (BackendError, MissingPredictions, ResumeMismatch, RuntimeError) as error:
        raise UserError(str(error)) from None
    finally:
        getattr(backend, "close", lambda: None)()
    for row in rows:
        e = row.estimate
        print(f"{row.task:18s} {row.answer_type:6s} {e.value:6.2f} [{e.low:.2f}, {e.high:.2f}] n={e.n}")
    print(f"suite report in {args.out}")
    return 0


def summary_line(result) -> str:
    return (f"{result.task}: {result.shard_questions} questions, {result.answered} answered now"
            + (f", {result.skipped.n_skipped} skipped" if result.skipped.n_skipped else ""))


def _run(args) -> int:
    """``medtune eval run``: check the options, answer the task, score it."""
    from medtune.errors import UserError
    from medtune.eval.backends import BackendError
    from medtune.data.jsonl import RecordError
    from medtune.eval import predictions as preds
    from medtune.eval.run import ResumeMismatch, run_task, summary
    from medtune.eval.metrics import MissingPredictions

    families = _families(args.metrics)
    if "judge" in families:
        raise UserError("`eval run` does not call a judge; score its predictions.jsonl with "
                        "`medtune eval score --judge-endpoint URL --judge-model NAME`")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    num_shards, shard_index = shard_from_env(args.num_shards, args.shard_index)
    _check_inputs(args)
    if args.model:
        from medtune.models.cli import check_model_path
        check_model_path(args.model)
    task = task_from_args(args)
    _check_seed_prompt(task.prompt_style, args)
    backend = _backend_from_args(args)
    if task.protocol == "medmax":
        task = _with_model_tokenizer(task, backend)
    if "medmax" in families:
        print("medmax: `eval run` calls no judge, so open answers are reported as not judged; score "
              "predictions.jsonl with `medtune eval score --metrics medmax --judge-endpoint URL "
              "--judge-model NAME`", file=sys.stderr)
    try:
        result = run_task(task, backend, args.out, num_shards=num_shards, shard_index=shard_index,
                          shard_mode=args.shard_mode, batch_size=args.batch_size, limit=args.limit,
                          families=families, strict=args.strict, progress=True)
    except (BackendError, preds.MergeError, MissingPredictions, RecordError, ResumeMismatch) as error:
        raise UserError(str(error)) from None
    finally:
        getattr(backend, "close", lambda: None)()
    print(summary(result, args.out))
    if result.skipped.n_skipped:
        for line in result.skipped.details():
            print(f"  {line}", file=sys.stderr)
        raise UserError(f"{result.skipped.n_skipped} questions have no prediction, so no report was written; "
                        "fix their images and run again (answered questions are kept), or score the partial "
                        "file with `medtune eval score --allow-missing`")
    return 0


def _check_seed_prompt(style: str, args) -> None:
    """A seed's prompt style needs the checkpoint rendered in one of that seed's conversation modes; checked from
    its medtune.json before the model loads."""
    from medtune.errors import UserError
    from medtune.eval.tasks import SEED_PROMPT_TEMPLATES

    allowed = SEED_PROMPT_TEMPLATES.get(style)
    if allowed is None:
        return
    if args.endpoint:
        print(f"--prompt-style {style}: the endpoint's chat template is the server's, so it is not checked",
              file=sys.stderr)
        return
    from medtune.models.kinds.base import recorded_template

    template = recorded_template(args.model)
    if template not in allowed:
        shown = f"template {template!r}" if template else "its own chat template (no medtune.json)"
        raise UserError(f"--prompt-style {style}: {args.model} is prompted with {shown}, not one of {style}'s "
                        f"conversation modes ({', '.join(allowed)}); import the seed's checkpoint with "
                        "`medtune model import SOURCE OUT --conv-mode MODE`")


def _with_model_tokenizer(task, backend):
    """The medmax protocol sizes its one-token budget to a local model's tokenizer; an endpoint's is unknown."""
    from dataclasses import replace

    tokenizer = getattr(getattr(backend, "vlm", None), "tokenizer", None)
    if tokenizer is None:
        print("medmax protocol: the endpoint's tokenizer is unknown, so closed and mcq answers get MedMax's "
              "literal max_tokens 1, counted in the server's tokenizer", file=sys.stderr)
    return replace(task, tokenizer=tokenizer)


def _backend_from_args(args):
    from medtune.errors import UserError
    from medtune.eval.backends import BackendError, HTTPBackend, LocalBackend
    from medtune.eval.run import ENDPOINT_KEY_ENV

    if args.endpoint:
        api_key = os.environ.get(ENDPOINT_KEY_ENV) or os.environ.get("OPENAI_API_KEY")
        try:
            return HTTPBackend(args.endpoint, args.endpoint_model, api_key=api_key, concurrency=args.batch_size)
        except BackendError as error:
            raise UserError(str(error)) from None
    try:
        return LocalBackend(args.model, batch_size=args.batch_size, device=process_device(args.device), dtype=args.dtype)
    except UserError:
        raise
    except (OSError, ValueError) as error:  # a hub name not in the cache offline, a broken weight file
        raise UserError(f"cannot load a model from {args.model}: {' '.join(str(error).split())}") from error


if __name__ == "__main__":  # pragma: no cover - `python -m medtune.eval.cli` for debugging
    from medtune.cli import main
    sys.exit(main(["eval", *sys.argv[1:]]))
