"""Benchmark: training with packed rows vs padded batches, through `medtune train`'s own stage runner.

Trains the same model (presets.tiny_spec, or ``--preset small``) on the bundled VQA-RAD training set for
``--steps`` optimizer steps twice in one run, each from the same random initialisation:

* padded (baseline): ``--batch-size`` samples per step, padded to the longest in the batch;
* packed: ``--batch-size`` rows per step, each row filled with whole samples up to ``--max-length`` tokens
  (position ids restart per sample, attention kept within each sample).

Reports useful tokens per second (tokens that are not padding, counted by Trainer from the attention mask or,
for packed rows, the ids) and peak memory: on a GPU the CUDA allocator's
peak, on a CPU the peak resident memory above what the process held before training (sampled every 5 ms).
Ratios are packed / padded.

    python benchmarks/train_packing.py
    python benchmarks/train_packing.py --preset small --steps 40 --batch-size 8 --max-length 512
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path


def peak_memory_meter():
    """(start, stop) functions; stop returns the peak bytes used since start (CUDA allocator or RSS)."""
    import torch

    if torch.cuda.is_available():
        def start():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def stop(baseline):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - baseline
        return start, stop

    page = os.sysconf("SC_PAGE_SIZE")
    state = {"peak": 0, "running": False}

    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page

    def sample():
        while state["running"]:
            state["peak"] = max(state["peak"], rss())
            time.sleep(0.005)

    def start():
        state.update(peak=rss(), running=True)
        state["thread"] = threading.Thread(target=sample, daemon=True)
        state["thread"].start()
        return state["peak"]

    def stop(baseline):
        state["running"] = False
        state["thread"].join()
        return max(state["peak"], rss()) - baseline
    return start, stop


def run(packing: bool, args, workdir: Path) -> dict:
    """Train one configuration; returns tokens, seconds, padding share and peak memory."""
    from medtune.train.recipe import parse_recipe
    from medtune.train.run import run_stage

    name = "packed" if packing else "padded"
    recipe = parse_recipe({
        "model": {"preset": args.preset}, "output_dir": str(workdir / name), "report_to": ["none"],
        "cache_dir": str(workdir / "cache"), "seed": 0,
        "stages": [{"name": name, "lr": {"projector": 1e-3, "llm": 1e-3}, "max_steps": args.steps,
                    "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad"},
                    "batch_size": args.batch_size, "max_length": args.max_length, "packing": packing,
                    "save_steps": 10 * args.steps, "log_steps": args.steps, "warmup_ratio": 0.0}],
    })
    start, stop = peak_memory_meter()
    baseline = start()
    began = time.perf_counter()
    result = run_stage(recipe, 0)
    seconds = time.perf_counter() - began
    peak = stop(baseline)
    # Trainer's train_runtime leaves out model building and encoding, which both runs share
    metrics = (workdir / name / f"stage-0-{name}" / "metrics.jsonl").read_text().splitlines()
    train_seconds = json.loads(metrics[-1]).get("train_runtime", seconds)
    return {"name": name, "tokens": result.tokens, "seconds": train_seconds, "peak": peak}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        # Trainer's train_runtime times the steps only: encoding (and filling the token cache) is left out
        rows = [_in_child(run, packing, args, Path(tmp)) for packing in (False, True)]
    padded, packed = rows
    print(f"\n{args.preset} model, VQA-RAD, {args.steps} steps, batch {args.batch_size}, "
          f"max_length {args.max_length}, device {'cuda' if _cuda() else 'cpu'}")
    print(f"{'run':<8} {'useful tokens':>14} {'seconds':>9} {'useful tok/s':>13} {'peak memory MiB':>16}")
    for row in rows:
        print(f"{row['name']:<8} {row['tokens']:>14,} {row['seconds']:>9.2f} {row['tokens'] / row['seconds']:>13,.0f} "
              f"{row['peak'] / 2**20:>16.1f}")
    speed = (packed["tokens"] / packed["seconds"]) / (padded["tokens"] / padded["seconds"])
    memory = packed["peak"] / padded["peak"] if padded["peak"] > 0 else float("nan")
    print(f"{'ratio':<8} {packed['tokens'] / padded['tokens']:>14.2f} {packed['seconds'] / padded['seconds']:>9.2f} "
          f"{speed:>13.2f} {memory:>16.2f}   (packed / padded)")


def _in_child(function, *args):
    """Run ``function(*args)`` in a fresh process, so each configuration's peak memory is its own."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
