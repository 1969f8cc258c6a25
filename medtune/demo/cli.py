"""``medtune demo``: the whole pipeline on the bundled VQA-RAD, on a CPU, in minutes, with no network.

    medtune demo [KEY=VALUE ...] [--output DIR] [--preset tiny|small] [--steps-scale F | --quick] [--seed N]
                 [--max-test N] [--recipe RECIPE]

Converts VQA-RAD, removes train/test leakage, trains ``recipes/demo.yaml`` (projector alignment, then
instruction tuning) on a randomly initialised preset model, evaluates on the test split with both metric
families and two answer-prior baselines, and writes ``DIR/report.md`` (+ report.json, loss.png,
results.png). Re-running reuses converted data, finished stages and answers already given. ``KEY=VALUE``
are recipe overrides, as for ``medtune train`` (e.g. ``model.llm=...`` for pretrained parts on a GPU).

The pipeline is in :mod:`medtune.demo.pipeline`; this module only parses arguments (nothing heavy is
imported until the verb runs).
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUTPUT = Path("medtune-output") / "demo"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="the whole pipeline on bundled VQA-RAD: data, leakage, training, evaluation, report",
        description="Convert the bundled VQA-RAD, remove train/test leakage, train a small random model in two "
                    "stages (recipes/demo.yaml), evaluate it on the 451 test questions beside answer-prior "
                    "baselines, and write a report. No network; under 10 minutes on 2 CPU cores.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides, as for `medtune train` (e.g. stages.0.max_steps=50)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="DIR",
                        help=f"where everything goes (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--preset", choices=("tiny", "small"), default="small",
                        help="model preset: small (the demo, ~6 M parameters) or tiny (seconds, for tests); default: small")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--steps-scale", type=float, default=1.0, metavar="F",
                       help="multiply every stage's steps (or epochs) by F (default 1)")
    steps.add_argument("--quick", action="store_true", help="a tenth of the steps (--steps-scale 0.1)")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="training and bootstrap seed (default: the recipe's)")
    parser.add_argument("--max-test", type=int, default=None, metavar="N",
                        help="evaluate on the first N test (and validation) questions only (default: all)")
    parser.add_argument("--recipe", default="demo", metavar="RECIPE",
                        help="recipe YAML or shipped recipe name (default: demo, i.e. recipes/demo.yaml)")
    parser.add_argument("--eval-batch-size", type=int, default=16, metavar="N",
                        help="questions per generate call (default: 16)")
    parser.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    from medtune.data.files import readable_text_file
    from medtune.demo.pipeline import QUICK_SCALE, DemoOptions, run_demo
    from medtune.errors import InputFileError
    from medtune.paths import recipe_path

    readable_text_file(recipe_path(args.recipe), "recipe (YAML)")  # before any phase starts
    if args.output.exists() and not args.output.is_dir():
        raise InputFileError(f"--output {args.output} is a file; the demo needs a folder")

    options = DemoOptions(output=args.output, preset=args.preset,
                          steps_scale=QUICK_SCALE if args.quick else args.steps_scale, seed=args.seed,
                          max_test=args.max_test, eval_batch_size=args.eval_batch_size,
                          recipe=args.recipe, overrides=list(args.overrides))
    run_demo(options)
    return 0
