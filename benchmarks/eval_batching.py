"""Benchmark: batched evaluation (`medtune eval run`) against one-question-at-a-time generation.

The seed systems' evaluation loops (LLaVA-Med ``model_vqa``, Med-MoE's copy of it) answer one question per
``generate`` call: open the image, build the prompt, generate, write the line, next question. This script
answers the same VQA-RAD test questions with the same tiny random model (presets.tiny_spec, or ``--preset
small``) saved to a temporary folder, in one process and one run:

* ``seed loop`` (baseline): that loop, on medtune's Generator with batch size 1, the image loaded per question;
* ``eval run, batch 1``: :func:`medtune.eval.run.run_task` with the local backend at batch size 1 (the
  runner's own overhead: requests, image cache, flushed predictions file; scoring is left out);
* ``eval run, batch B`` for each ``--batch-sizes`` value.

Generation settings are the task's (greedy; 32 new tokens for closed and 128 for open questions). A random
model seldom emits its end token, so nearly every answer runs to that budget, as every row of a batch does.
The answers of every mode must be identical, question by question (greedy decoding, left padding), and the
script says so. Prints wall time, questions/s and the ratio to the seed loop.

    OMP_NUM_THREADS=1 python benchmarks/eval_batching.py
    python benchmarks/eval_batching.py --questions 64 --batch-sizes 8,16 --preset small
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def build_model(preset: str, out: Path) -> Path:
    from medtune.models import presets
    from medtune.models.build import build_vlm

    build_vlm(presets.preset_spec(preset)).save(out)
    return out


def seed_loop(vlm, task, samples) -> dict[str, str]:
    """One question per generate call, image opened per question, as the seed systems do."""
    from medtune.data.images import load_image
    from medtune.models.generation import GenerationSettings, Generator

    generator = Generator(vlm)
    answers = {}
    for sample in samples:
        images = [load_image(ref, task.image_root) for ref in sample.images]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": task.prompt(sample)}]
        settings = GenerationSettings(**task.settings_for(sample))
        answers[sample.id] = generator.generate([[{"role": "user", "content": content}]], [images], settings)[0]
    return answers


def eval_run(vlm, task, limit: int, batch_size: int, out_dir: Path) -> dict[str, str]:
    """medtune's runner with the local backend; returns the answers it wrote."""
    from medtune.eval.backends import LocalBackend
    from medtune.eval.run import run_task

    run_task(task, LocalBackend(vlm, batch_size=batch_size), out_dir, batch_size=batch_size, limit=limit,
             progress=False, score=False)
    lines = (out_dir / "predictions.jsonl").read_text().splitlines()
    return {record["id"]: record["prediction"] for record in map(json.loads, lines)}


def timed(function, *args) -> tuple[float, dict[str, str]]:
    start = time.perf_counter()
    answers = function(*args)
    return time.perf_counter() - start, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=64, help="the first N VQA-RAD test questions")
    parser.add_argument("--batch-sizes", default="8,16")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import torch

    from medtune.eval.tasks import get_task
    from medtune.models.build import load_vlm

    task = get_task("vqa-rad")
    samples = task.samples()[:args.questions]
    with tempfile.TemporaryDirectory() as tmp:
        vlm = load_vlm(build_model(args.preset, Path(tmp) / "model"))
        seed_loop(vlm, task, samples[:2])  # warm-up: first-call allocations, lazy imports
        rows = [("seed loop (one question per generate)", 1, *timed(seed_loop, vlm, task, samples))]
        for batch_size in [1, *batch_sizes]:
            out = Path(tmp) / f"run-batch{batch_size}"
            rows.append((f"eval run, batch {batch_size}", batch_size,
                         *timed(eval_run, vlm, task, args.questions, batch_size, out)))

    kinds = {s.meta.answer_type for s in samples}
    counts = ", ".join(f"{sum(s.meta.answer_type == k for s in samples)} {k}" for k in sorted(kinds))
    print(f"VQA-RAD test, first {len(samples)} questions ({counts}); {args.preset} preset; greedy; "
          f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print_table(rows)
    baseline = rows[0][3]
    same = all(answers == baseline for *_, answers in rows[1:])
    print(f"answers identical in every mode, question by question: {'yes' if same else 'NO'}")
    return 0 if same else 1


def print_table(rows) -> None:
    base_seconds = rows[0][2]
    print(f"| {'mode':40s} | batch | seconds | questions/s | vs seed loop |")
    print(f"|{'-' * 42}|-------|---------|-------------|--------------|")
    for name, batch_size, seconds, answers in rows:
        print(f"| {name:40s} | {batch_size:5d} | {seconds:7.2f} | {len(answers) / seconds:11.2f} | "
              f"{base_seconds / seconds:11.2f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
