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
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="recipe overrides by dotted path, e.g. stages.0.max_steps=3 or stages.*.lr.llm=0")
    train.add_argument("--tiny", action="store_true",
                       help="tiny preset model, bundled VQA-RAD and 2 steps per stage (a CPU smoke run)")
    train.add_argument("--resume", action="store_true",
                       help="skip finished stages and continue an unfinished one from its last complete checkpoint")
    train.add_argument("--start-stage", type=int, default=0, metavar="N",
                       help="start at stage N (0-based); stage N-1's model must exist in the output directory")
    train.add_argument("--output", metavar="DIR", help="output directory (replaces the recipe's output_dir)")
    train.set_defaults(func=train_command)

    merge = subparsers.add_parser(
        "merge", help="merge LoRA adapters into a plain model (loads with transformers alone)",
        description="Write CHECKPOINT (a LoRA checkpoint-N or a stage's adapter/) as a merged model in OUT: "
                    "safetensors weights, tokenizer with chat template, processor; no medtune or peft needed.")
    merge.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory")
    merge.add_argument("out", metavar="OUT", help="new directory for the merged model")
    merge.add_argument("--base", metavar="DIR", help="base model (default: the one named in adapter_config.json)")
    merge.set_defaults(func=merge_command)


def train_command(args: argparse.Namespace) -> int:
    from medtune.paths import recipe_path
    from medtune.train.recipe import load_recipe
    from medtune.train.run import is_main_process, run_recipe

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    recipe = load_recipe(recipe_path(args.recipe), overrides, tiny=args.tiny)
    results = run_recipe(recipe, start_stage=args.start_stage, resume=args.resume)
    if is_main_process():
        for result in results:
            print(result.line())
        print(f"summary: {recipe.output_dir}/summary.json")
    return 0


def merge_command(args: argparse.Namespace) -> int:
    from medtune.train.merge import merge_checkpoint

    out = merge_checkpoint(args.checkpoint, args.out, base=args.base)
    print(f"merged model written to {out} (loads with transformers' from_pretrained)")
    return 0
