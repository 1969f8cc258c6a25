"""Benchmark: medtune's training loop against a plain Hugging Face Trainer loop, same model, same data, one run.

Every configuration trains the same randomly initialised model (the demo's ``small`` preset by default: vision
tower frozen, projector + LLM trained, one learning rate for both so the optimizers match) on the same VQA-RAD
SFT batches, in the same order (same seed, same sampler), for ``--epochs`` epochs over ``--samples`` training
samples drawn at random (seed 0; 400 samples show about 230 of the 315 images):

* ``naive``: ``transformers.Trainer`` as a script would use it: the model's own forward (the LM head over every
  position, the vision tower on every image of every step), torch's default threads, ``--naive-workers``
  dataloader workers (default 0, Trainer's own default; LLaVA's scripts pass 4).
* ``medtune``: ``medtune train``'s Trainer (:func:`medtune.train.run.build_trainer`) with its defaults: the LM
  head only at labelled positions, each distinct image decoded once (:class:`medtune.train.cache.ImageMemo`) and,
  the tower being frozen, its features computed once, torch threads and dataloader workers from the usable cores
  (:mod:`medtune.train.machine`).
* ``medtune free threads``: ``torch_threads: free`` (the demo's setting), fewer threads while other processes
  keep cores busy (the ``thr`` column lists the counts it chose, in order).
* ``medtune -X``: the same with one exact speed-up turned off (or the old default of 2 dataloader workers), so
  each one's share is visible.
* ``medtune +bf16`` (CPUs with native bf16, or a GPU) and ``medtune +compile`` (``--compile``): optional, not
  exact; their loss is printed beside the others for the parity check.

Throughput is measured twice: over the first epoch from the end of step ``--warmup`` (so model building,
encoding and torch.compile's compilation are left out; compilation time is printed separately), where the
per-image speed-ups still meet most images for the first time, and over the later epochs, where they have seen
every image (a run of several epochs, like the demo's, spends most of its time there). Useful tokens are the
tokens that are not padding, and the labelled ones (what the loss trains), counted from the same batches.
``loss`` is Trainer's mean training loss over all steps: the exact speed-ups leave it equal to float rounding.

With ``--busy N``, N other processes spin on the CPU during every configuration (another job on a shared
machine): the naive loop and medtune's default keep their threads, ``free threads`` runs on the cores left.

    python benchmarks/train_speed.py                         # small preset, 2 x 50 steps: about 7 minutes on 2 cores
    python benchmarks/train_speed.py --compile               # + torch.compile (slow to compile on a CPU)
    python benchmarks/train_speed.py --busy 1 --only naive medtune "medtune free threads"
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

LR = 2e-4


class StepClock:
    """A TrainerCallback that records the wall-clock time at the end of every optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter())
        return _Clock()


class CountingCollator:
    """The model's collator, counting each batch's non-padding and labelled tokens; ``drop`` removes keys a
    plain model forward does not take (medtune's per-sample metadata)."""

    def __init__(self, collator, drop: tuple[str, ...] = ()):
        self.collator, self.drop, self.batches = collator, drop, []

    def __call__(self, features):
        batch = self.collator(features)
        self.batches.append((int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum())))
        return {key: value for key, value in batch.items() if key not in self.drop}


def recipe_for(args, workdir: Path, name: str, **stage_changes):
    from medtune.train.recipe import parse_recipe

    stage = {"name": name, "lr": {"projector": LR, "llm": LR}, "max_steps": args.steps,
             "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad"},
             "batch_size": args.batch_size, "max_length": 256, "save_steps": 100 * args.steps,
             "log_steps": args.steps, "warmup_ratio": 0.0, "schedule": "constant", **stage_changes}
    return parse_recipe({"model": {"preset": args.preset}, "output_dir": str(workdir / name), "seed": 0,
                         "report_to": ["none"], "cache_dir": str(workdir / "cache"), "stages": [stage]})


def prepared(recipe, samples: int, *, image_memo: bool = True):
    """(vlm, model with the stage's parts trainable, training rows, collator) as `medtune train` builds them,
    on ``samples`` rows drawn at random (seed 0) from the stage's data."""
    import random

    from medtune.models.presets import build_preset
    from medtune.train.cache import CachedDataset
    from medtune.train.data import stage_dataset
    from medtune.train.parts import apply_trainable_parts

    stage = recipe.stages[0]
    vlm = build_preset(recipe.model["preset"])
    dataset, _ = stage_dataset(stage.data, vlm, max_length=stage.max_length, seed=recipe.seed,
                               cache_dir=recipe.cache_dir, progress=False)
    chosen = sorted(random.Random(0).sample(range(len(dataset)), min(samples, len(dataset))))
    dataset = CachedDataset(dataset.rows.select(chosen), vlm, memo_bytes=None if image_memo else 0)
    model = apply_trainable_parts(vlm, vlm.model, stage.lr)
    rows = dataset   # unpacked: the samples are the rows
    return vlm, model, rows, vlm.collator(packing=False, max_length=stage.max_length)


def naive_trainer(args, workdir: Path, clock):
    """A plain transformers Trainer over the same model and data; returns (trainer, counting collator)."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from medtune.models.batch import SAMPLE_INDEX, SAMPLE_METADATA

    recipe = recipe_for(args, workdir, "naive")
    stage = recipe.stages[0]
    _, model, rows, collator = prepared(recipe, args.samples, image_memo=False)   # the model alone: no medtune loop
    counting = CountingCollator(collator, drop=(SAMPLE_METADATA, SAMPLE_INDEX))
    training_args = TrainingArguments(
        output_dir=str(workdir / "naive"), seed=recipe.seed, data_seed=recipe.seed, max_steps=args.steps,
        per_device_train_batch_size=stage.batch_size, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0.0, weight_decay=0.0, max_grad_norm=stage.max_grad_norm, save_strategy="no",
        logging_steps=args.steps, report_to="none", remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=args.naive_workers, use_cpu=not _cuda(), dataloader_pin_memory=_cuda())
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=counting,
                      callbacks=[clock])
    trainer.remove_callback(PrinterCallback)   # Trainer's own log lines; the table says it all
    return trainer, counting


def medtune_trainer(args, workdir: Path, name: str, clock, *, speedups_off: tuple[str, ...] = (),
                    image_memo: bool = True, **stage_changes):
    from medtune.train.objectives.sft import SFT
    from medtune.train.run import build_trainer

    recipe = recipe_for(args, workdir, name, **stage_changes)
    stage = recipe.stages[0]
    vlm, model, rows, collator = prepared(recipe, args.samples, image_memo=image_memo)
    counting = CountingCollator(collator)
    trainer = build_trainer(recipe, stage, vlm, model, rows, None, counting, workdir / name, objective=SFT())
    trainer.speedups = dataclasses.replace(trainer.speedups, **{flag: False for flag in speedups_off})
    trainer.add_callback(clock)
    return trainer, counting


def spin(seconds: float) -> None:
    """Keep one core busy for ``seconds`` (a stand-in for another job)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@contextlib.contextmanager
def busy_processes(count: int, seconds: float = 3600.0):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=spin, args=(seconds,), daemon=True) for _ in range(count)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()


def run(name: str, make, args) -> dict:
    """Train one configuration; throughput after the warm-up steps, and its mean loss."""
    import torch

    with tempfile.TemporaryDirectory(prefix="medtune-speed-") as tmp, busy_processes(args.busy):
        clock = StepClock()
        trainer, counting = make(Path(tmp), clock)
        began = time.perf_counter()
        output = trainer.train()
        governor = getattr(trainer, "thread_governor", None)
        if governor is not None:   # the threads it chose, first to last
            threads = "-".join(dict.fromkeys(str(n) for n in governor.choices))
        else:
            threads = str(getattr(trainer.args, "torch_threads", None) or torch.get_num_threads())
    first, later = windows(args)
    return {"name": name, "first": clock.times[first[1] - 1] - clock.times[first[0] - 1],
            "later": clock.times[later[1] - 1] - clock.times[later[0] - 1],
            "batches": counting.batches, "loss": output.metrics["train_loss"], "threads": threads,
            "workers": trainer.args.dataloader_num_workers,
            "warmup_seconds": clock.times[args.warmup - 1] - began}


def windows(args) -> tuple[tuple[int, int], tuple[int, int]]:
    """The timed (after-step, to-step) ranges: the first epoch after the warm-up steps, and the later epochs."""
    return (args.warmup, args.epoch_steps), (args.epoch_steps, args.steps)


def configurations(args) -> list[tuple[str, object]]:
    from medtune.train.machine import bf16_native

    def medtune(name, **changes):
        return name, lambda workdir, clock: medtune_trainer(args, workdir, name, clock, **changes)

    rows = [("naive", lambda workdir, clock: naive_trainer(args, workdir, clock)),
            medtune("medtune"),
            medtune("medtune -labelled head", speedups_off=("labelled_positions_head",)),
            medtune("medtune -tower cache", speedups_off=("frozen_vision_features",)),
            medtune("medtune -image memo", image_memo=False),
            medtune("medtune -all exact", image_memo=False,
                    speedups_off=("labelled_positions_head", "frozen_vision_features")),
            medtune("medtune 2 workers", dataloader_workers=2),
            medtune("medtune free threads", torch_threads="free")]
    if _cuda() or bf16_native():
        rows.append(medtune("medtune +bf16", precision="bf16"))
    if args.compile:
        rows.append(medtune("medtune +compile", compile=True))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--samples", type=int, default=400, help="training samples (drawn at random, seed 0)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4, help="first-epoch steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--naive-workers", type=int, default=0, help="dataloader workers of the plain Trainer")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--only", nargs="*", help="run only these configurations (names as printed)")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="N other processes keep a core busy each while every configuration trains")
    args = parser.parse_args(argv)
    args.epoch_steps = -(-args.samples // args.batch_size)
    args.steps = args.epochs * args.epoch_steps
    if args.epochs < 2 or args.epoch_steps <= args.warmup + 1:
        parser.error("need --epochs 2 or more and more than --warmup + 1 steps per epoch")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    from medtune.train.progress import quiet_libraries

    quiet_libraries()
    results = [run(name, make, args) for name, make in configurations(args)
               if not args.only or name in args.only]
    print_table(results, args)


def print_table(results: list[dict], args) -> None:
    base = results[0]
    # every configuration sees the same batches (same seed and sampler); counts come from the main process's
    # collator, which workers bypass, so the first configuration's counts stand for all
    counted = next(r["batches"] for r in results if r["batches"])
    first, later = windows(args)
    tokens, labelled = (sum(b[column] for b in counted[later[0]:later[1]]) for column in (0, 1))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.preset} preset, VQA-RAD SFT, {args.samples} samples, batch {args.batch_size}, {args.epochs} "
          f"epochs of {args.epoch_steps} steps (timed: steps {first[0] + 1}-{first[1]} of the first epoch, steps "
          f"{later[0] + 1}-{later[1]} after it), device {'cuda' if _cuda() else 'cpu'}, load average {load:.2f}"
          + (f", {args.busy} other busy process(es)" if args.busy else ""))
    print(f"useful tokens per later-epochs window: {tokens:,} non-padding, {labelled:,} labelled; x naive = "
          f"samples/s ratio (the same batches, so also the tokens/s ratio)")
    header = (f"{'configuration':<24} {'thr':>5} {'wrk':>3} {'x naive 1st':>11} {'samples/s':>9} {'tok/s':>8} "
              f"{'labelled/s':>10} {'x naive':>7} {'loss':>8} {'loss - naive':>12} {'warm-up s':>9}")
    print(" " * 34 + "first epoch" + " " * 3 + "later epochs")
    print(header)
    print("-" * len(header))
    steps = later[1] - later[0]
    for row in results:
        rate = steps * args.batch_size / row["later"]
        print(f"{row['name']:<24} {row['threads']:>5} {row['workers']:>3} {base['first'] / row['first']:>11.2f} "
              f"{rate:>9.2f} {tokens / row['later']:>8,.0f} {labelled / row['later']:>10,.1f} "
              f"{base['later'] / row['later']:>7.2f} {row['loss']:>8.4f} {row['loss'] - base['loss']:>+12.2e} "
              f"{row['warmup_seconds']:>9.1f}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
