"""Benchmark: DPO and GRPO steps in medtune against TRL's own DPOTrainer and GRPOTrainer, same model, same data.

Both train the same checkpoint (the ``small`` preset by default, random weights, saved once and loaded by each)
on the same preference pairs: VQA-RAD's yes/no training questions with their image, the reference answer chosen
and the other one rejected. Same batch size, steps, learning rate (constant), beta, optimizer (Trainer's AdamW)
and trainable parts: the projector and the language model; the vision tower frozen (in TRL's model by switching
off its gradients). Configurations:

* ``trl``: ``trl.DPOTrainer`` with the checkpoint's processor (it applies the checkpoint's chat template and
  processor itself), its reference model a frozen copy (TRL's default for a model without adapters);
* ``medtune``: a ``method: dpo`` stage of ``medtune train`` (the kind's collator and exact speed-ups: the LM head
  only at labelled positions, frozen-tower features, each image decoded once);
* ``medtune precompute``: with ``dpo: {precompute_reference: true}`` (TRL 1.16 refuses
  ``precompute_ref_log_probs`` for vision datasets, so it has no counterpart there);
* ``trl grpo`` / ``medtune grpo``: GRPO on the same questions (their image, the reference answer), ``--group``
  answers sampled per question at temperature 1, at most ``--new-tokens`` tokens, beta 0.04 (a frozen reference in
  both), rewarded by medtune's ``strict`` reward (the strict metric family, :mod:`medtune.eval.rewards`) in both;
  a step is ``--batch-size`` questions (TRL counts its batch in completions: batch times group). The samples differ
  (each draws its own), so rewards are comparable only on average.

Timed: steps ``--warmup``+1 to the last (by default after the first epoch, once every image has been decoded),
from the end of each optimizer step (a TrainerCallback in both), so model loading, data preparation, the
precomputing pass and the warm-up steps are left out (their seconds are printed apart as ``setup s``). TRL's
configs default to bf16 (autocast on a CPU too); both sides run in fp32 here. ``first loss`` is the first
step's: log 2 in all three (the policy starts as its reference). Both draw the pairs in the same order (Trainer's
seeded sampler), so the per-step losses are comparable: ``max |loss - trl|`` is the largest difference.
TRL is not a medtune dependency; install it beside the venv:

    pip install --no-deps --target /tmp/trlpkgs trl==1.16.0
    TRL_EXPERIMENTAL_SILENCE=1 PYTHONPATH=/tmp/trlpkgs python benchmarks/post_training.py
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

BETA, LR = 0.1, 1e-4


def clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.losses: list[float] = []
            self.rewards: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())


        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

    return Clock()


def pairs(n: int) -> list:
    """VQA-RAD's first ``n`` yes/no training questions: chosen = the answer, rejected = the other."""
    from medtune.data.formats import read_records
    from medtune.data.jsonl import Tally
    from medtune.data.schema import Message, Part, Sample
    from medtune.paths import resolve_data_path

    path = resolve_data_path("bundled:vqa_rad/trainset.json")
    out = []
    for sample in read_records("vqa-rad", path, tally=Tally()):
        answer = sample.messages[-1].text.strip().lower()
        if answer in ("yes", "no"):
            reply = lambda text: Message("assistant", (Part.of_text(text),))   # noqa: E731
            out.append(Sample(id=sample.id, messages=[*sample.messages[:-1], reply(answer)], meta=sample.meta,
                              rejected=reply("no" if answer == "yes" else "yes")))
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} yes/no questions")


def run_medtune(args, workdir: Path, base: Path, data: Path, name: str, stage: dict,
                per_step: int | None = None) -> dict:
    """``medtune train`` of one stage (``stage``: what differs from the shared settings) on the pairs' questions,
    with a clock added to its Trainer."""
    from medtune.paths import bundled_data
    from medtune.train import run as run_module
    from medtune.train.recipe import parse_recipe

    timer = clock()
    build = run_module.build_trainer

    def with_clock(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(timer)
        return trainer

    recipe = parse_recipe({
        "model": str(base), "output_dir": str(workdir / name.replace(" ", "-")), "report_to": ["none"], "seed": 0,
        "stages": [{"data": {"path": str(data), "format": "canonical",
                             "image_root": str(bundled_data("vqa_rad", "images"))},
                    "lr": {"llm": LR, "projector": LR}, "max_steps": args.steps, "batch_size": args.batch_size,
                    "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0, "log_steps": 1,
                    "save_steps": 10 * args.steps, "max_length": 512, "torch_threads": args.threads,
                    "dataloader_workers": 0, **stage}]})
    started = time.perf_counter()
    run_module.build_trainer = with_clock
    try:
        run_module.run_recipe(recipe)
    finally:
        run_module.build_trainer = build
    return _result(name, timer, started, args, per_step)


def run_trl(args, workdir: Path, base: Path, samples: list) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from medtune.paths import bundled_data

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(base)
    for parameter in model.model.vision_tower.parameters():   # as medtune's stage: the tower frozen
        parameter.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(base)
    root = bundled_data("vqa_rad", "images")
    rows = [{"images": [Image.open(root / s.images[0].path).convert("RGB")],
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": s.messages[-1].text}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": s.rejected.text}]}]}
            for s in samples]
    name = "trl"
    config = DPOConfig(output_dir=str(workdir / name), per_device_train_batch_size=args.batch_size,
                       max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                       weight_decay=0.0, beta=BETA, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                       use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
                       bf16=False, max_length=None)   # TRL's default is bf16; medtune's stage runs in fp32
    timer = clock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         callbacks=[timer])
    trainer.train()
    return _result(name, timer, started, args)


def _result(name: str, timer, started: float, args, per_step: int | None = None) -> dict:
    first = timer.times[args.warmup - 1]   # --warmup is at least 1
    timed = timer.times[-1] - first
    steps = len(timer.times) - args.warmup
    return {"name": name, "samples_per_s": steps * (per_step or args.batch_size) / timed, "setup": first - started,
            "losses": timer.losses, "rewards": timer.rewards}


def run_trl_grpo(args, workdir: Path, base: Path, samples: list) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from medtune.eval.metrics import Item
    from medtune.eval.rewards import rewards
    from medtune.paths import bundled_data

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(base)
    for parameter in model.model.vision_tower.parameters():
        parameter.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(base)
    root = bundled_data("vqa_rad", "images")
    rows = [{"image": Image.open(root / s.images[0].path).convert("RGB"), "truth": s.messages[-1].text,
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]}
            for s in samples]

    def strict(completions, truth, **_):   # medtune's strict reward, the same function its GRPO stage calls
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return rewards("strict", [Item(str(i), "", t, "closed", text) for i, (text, t) in enumerate(zip(texts, truth))])

    config = GRPOConfig(output_dir=str(workdir / "trl-grpo"), per_device_train_batch_size=args.batch_size * args.group,
                        num_generations=args.group, max_completion_length=args.new_tokens, temperature=1.0, beta=0.04,
                        max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                        weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
                        bf16=False)
    timer = clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[strict], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=processor, callbacks=[timer])
    trainer.train()
    return _result("trl grpo", timer, started, args, per_step=args.batch_size * args.group)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=8,
                        help="steps left out of the timing, at least 1 (default: the first epoch, which decodes every "
                             "image)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--group", type=int, default=4, help="GRPO: answers sampled per question")
    parser.add_argument("--new-tokens", type=int, default=8, help="GRPO: at most this many tokens per answer")
    parser.add_argument("--only", nargs="*", help="run only these configurations (names as printed)")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    from medtune.models.presets import build_preset
    from medtune.train.progress import quiet_libraries

    quiet_libraries()
    workdir = Path(tempfile.mkdtemp(prefix="medtune-post-training-"))
    base = workdir / "base"
    build_preset(args.preset).save(base)
    samples = pairs(args.pairs)
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples), encoding="utf-8")
    def dpo(precompute: bool) -> dict:
        return {"name": "dpo", "method": "dpo", "dpo": {"beta": BETA, "precompute_reference": precompute}}

    grpo = {"name": "grpo", "method": "grpo", "grpo": {"group_size": args.group, "beta": 0.04, "temperature": 1.0,
                                                      "max_new_tokens": args.new_tokens, "rewards": {"strict": 1.0}}}
    configurations = {"trl": lambda: run_trl(args, workdir, base, samples),
                      "medtune": lambda: run_medtune(args, workdir, base, data, "medtune", dpo(False)),
                      "medtune precompute": lambda: run_medtune(args, workdir, base, data, "medtune precompute",
                                                                dpo(True)),
                      "trl grpo": lambda: run_trl_grpo(args, workdir, base, samples),
                      "medtune grpo": lambda: run_medtune(args, workdir, base, data, "medtune grpo", grpo,
                                                          per_step=args.batch_size * args.group)}
    results = [run() for name, run in configurations.items() if not args.only or name in args.only]
    print_table([r for r in results if "grpo" not in r["name"]], args, "DPO", "pairs")
    print_table([r for r in results if "grpo" in r["name"]], args, "GRPO", "answers")


def print_table(results: list[dict], args, method: str, unit: str) -> None:
    import torch

    if not results:
        return
    base = results[0]
    flags = sorted({flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                    if flag in Path("/proc/cpuinfo").read_text()} if Path("/proc/cpuinfo").exists() else set())
    grpo = f", {args.group} answers per question, at most {args.new_tokens} new tokens" if method == "GRPO" else ""
    print(f"\n{method}, {args.preset} preset, {args.pairs} VQA-RAD yes/no questions, batch {args.batch_size} "
          f"questions{grpo}, {args.steps} steps (timed: {args.warmup + 1}-{args.steps}), fp32, {args.threads} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'} ({', '.join(flags) or 'no flags read'})")
    header = (f"{'configuration':<20} {unit + '/s':>10} {'x ' + base['name']:>10} {'first loss':>10} {'mean loss':>9} "
              f"{'max |loss - ' + base['name'] + '|':>22} {'mean reward':>11} {'setup s':>8}")
    print(header)
    print("-" * len(header))
    for row in results:
        losses = row["losses"]
        # GRPO's losses come from each run's own samples: not comparable step by step
        gap = "-" if method == "GRPO" else f"{max(abs(a - b) for a, b in zip(losses, base['losses'])):.2e}"
        rewards = row.get("rewards")
        reward = f"{sum(rewards) / len(rewards):.3f}" if rewards else "-"
        print(f"{row['name']:<20} {row['samples_per_s']:>10.2f} {row['samples_per_s'] / base['samples_per_s']:>10.2f} "
              f"{losses[0]:>10.6f} {sum(losses) / len(losses):>9.6f} {gap:>22} {reward:>11} {row['setup']:>8.1f}")
    if method == "DPO":
        print(f"(log 2 = {math.log(2):.4f})")


if __name__ == "__main__":
    main()
