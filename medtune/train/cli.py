"""Command-line verbs of the training stage: ``medtune train`` and ``medtune merge``.

    medtune train RECIPE [key=value ...] [--tiny] [--resume] [--start-stage N] [--output DIR]
    medtune merge CHECKPOINT OUT [--base DIR]

RECIPE is a YAML file or the name of a shipped recipe (``demo``, ``llava-med`` ...). Overrides use dotted
paths into the recipe (``stages.0.max_steps=3``, ``stages.*.batch_size=4``); ``--tiny`` (or ``tiny=true``)
runs the same stages on the tiny preset model and bundled VQA-RAD for two steps each. Several processes:
``torchrun --nproc_per_node 8 -m medtune.cli train RECIPE`` (or ``accelerate launch``); the recipe's
``distributed.strategy`` picks DDP, FSDP2 or DeepSpeed ZeRO-2/3.

Nothing heavy is imported here: torch and transformers load inside the verbs.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train a model in stages from a recipe",
        description="Train a model in stages from a recipe YAML (see recipes/). Stage n+1 starts from stage "
                    "n's output; every stage writes checkpoints, metrics.jsonl, TensorBoard logs and a summary.")
    train.add_argument("recipe", metavar="RECIPE", help="recipe YAML, or a shipped recipe name (demo, llava-med ...)")
    _add_train_options(train)
    # Overrides and options may come in any order (`train demo --tiny stages.0.max_steps=3`): the rest of the
    # line is re-read by train_command with argparse's intermixed parsing.
    train.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    train.set_defaults(func=train_command)

    merge = subparsers.add_parser(
        "merge", help="merge LoRA adapters into a plain model (loads with transformers alone)",
        description="Write CHECKPOINT (a LoRA checkpoint-N or a stage's adapter/) as a merged model in OUT: "
                    "safetensors weights, tokenizer with chat template, processor; no medtune or peft needed.")
    merge.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory")
    merge.add_argument("out", metavar="OUT", help="new directory for the merged model")
    merge.add_argument("--base", metavar="DIR", help="base model (default: the one named in adapter_config.json)")
    merge.set_defaults(func=merge_command)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides by dotted path, e.g. stages.0.max_steps=3 or stages.*.lr.llm=0")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny preset model, bundled VQA-RAD and 2 steps per stage (a CPU smoke run)")
    parser.add_argument("--resume", action="store_true",
                        help="skip finished stages and continue an unfinished one from its last complete checkpoint")
    parser.add_argument("--start-stage", type=int, default=0, metavar="N",
                        help="start at stage N (0-based; default %(default)s, the first); stage N-1's model must "
                             "exist in the output directory")
    parser.add_argument("--output", metavar="DIR", help="output directory (replaces the recipe's output_dir)")


def _reparse(args: argparse.Namespace) -> argparse.Namespace:
    """Options and overrides from the whole line, in any order."""
    parser = argparse.ArgumentParser(prog="medtune train", add_help=False)
    _add_train_options(parser)
    rest = [*args.overrides, *args.rest]
    for name in ("tiny", "resume"):
        if getattr(args, name):
            rest.append(f"--{name}")
    if args.start_stage:
        rest += ["--start-stage", str(args.start_stage)]
    if args.output:
        rest += ["--output", args.output]
    return parser.parse_intermixed_args(rest)


def train_command(args: argparse.Namespace) -> int:
    from medtune.data.files import readable_text_file
    from medtune.paths import recipe_path
    from medtune.train.recipe import load_recipe
    from medtune.distributed import is_main_process
    from medtune.train.run import run_recipe

    options = _reparse(args)
    overrides = list(options.overrides)
    if options.output:
        overrides.append(f"output_dir={options.output}")
    recipe = load_recipe(readable_text_file(recipe_path(args.recipe), "recipe (YAML)"), overrides, tiny=options.tiny)
    run_recipe(recipe, start_stage=options.start_stage, resume=options.resume)
    if is_main_process():
        print(f"done: {len(recipe.stages) - options.start_stage} stage(s); summary in "
              f"{recipe.output_dir}/summary.json, TensorBoard: tensorboard --logdir {recipe.output_dir}")
    return 0


def merge_command(args: argparse.Namespace) -> int:
    from medtune.models.cli import check_model_path
    from medtune.train.merge import ADAPTER_CONFIG, merge_checkpoint

    check_model_path(args.checkpoint, configs=("config.json", ADAPTER_CONFIG))
    if args.base:
        check_model_path(args.base)
    out = merge_checkpoint(args.checkpoint, args.out, base=args.base)
    print(f"merged model written to {out} (loads with transformers' from_pretrained)")
    return 0
