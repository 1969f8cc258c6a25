"""Benchmark: padding vs packing on the bundled VQA-RAD training split, and preprocessing cold vs cached.

Part 1 encodes every VQA-RAD training question (vicuna template, the tiny preset's offline tokenizer) and
compares three ways of batching the same samples under the same batch token budget (``--rows`` x
``--max-length`` token positions per batch):

* naive: ``--rows`` samples per batch in shuffled order, each batch padded to its longest sample (baseline);
* length-grouped: the same, ordered by medtune.models.sampler.LengthGroupedSampler;
* packed: samples packed best-fit into rows of ``--max-length`` (medtune.models.packing), ``--rows`` rows per
  batch, each batch padded to its longest row.

It reports the share of padding positions, the positions computed per epoch and the optimizer steps per epoch,
with ratios against the naive baseline. Lengths depend on the image tokens per image: the tiny preset's 16,
and 576 (LLaVA-1.5's CLIP ViT-L/14 at 336 px) to show the regime of a real model (only lengths are computed).

Part 2 measures preprocessing throughput (samples/s): encoding with medtune.train.cache.encode_with_cache
into an empty cache (tokenise + decode each image once to check it), then the same call again (read from the
Arrow cache, all token columns materialised).

    python benchmarks/padding_vs_packing.py
    python benchmarks/padding_vs_packing.py --max-length 2048 --rows 4
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import tempfile
import time
from pathlib import Path


def load_vqa_rad():
    from medtune.data.formats import default_image_root, read_records
    from medtune.data.jsonl import Tally
    from medtune.paths import bundled_data

    path = bundled_data("vqa_rad", "trainset.json")
    samples = list(read_records("vqa-rad", path, tally=Tally()))
    return path, default_image_root("vqa-rad", path), samples


def batching_stats(lengths: list[int], batches: list[list[list[int]]], budget: int) -> tuple[float, int, int, float]:
    """(padding share, positions computed, steps, share of the token budget holding real tokens) for batches
    given as lists of rows of sample indices."""
    real = sum(lengths)
    positions = sum(len(batch) * max(sum(lengths[i] for i in row) for row in batch) for batch in batches)
    return 1 - real / positions, positions, len(batches), real / (len(batches) * budget)


def compare_batching(lengths: list[int], max_length: int, rows: int, seed: int) -> list[tuple[str, tuple]]:
    from medtune.models.packing import plan_rows
    from medtune.models.sampler import LengthGroupedSampler

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    naive = [[[i] for i in order[start:start + rows]] for start in range(0, len(order), rows)]
    grouped_order = list(LengthGroupedSampler(lengths, rows, seed=seed))
    grouped = [[[i] for i in grouped_order[start:start + rows]] for start in range(0, len(order), rows)]
    packed_rows = plan_rows(lengths, max_length)
    random.Random(seed).shuffle(packed_rows)  # Trainer shuffles rows; each batch pads to its longest row
    packed = [packed_rows[start:start + rows] for start in range(0, len(packed_rows), rows)]
    budget = rows * max_length
    return [("naive pad-to-longest", batching_stats(lengths, naive, budget)),
            ("length-grouped", batching_stats(lengths, grouped, budget)),
            ("packed (best fit)", batching_stats(lengths, packed, budget))]


def print_batching_table(title: str, results: list[tuple[str, tuple]]) -> None:
    base_positions, base_steps = results[0][1][1], results[0][1][2]
    print(f"\n{title}")
    print(f"{'batching':<22}{'padding':>9}{'positions':>12}{'vs naive':>10}{'steps':>8}{'vs naive':>10}"
          f"{'budget used':>13}")
    for name, (padding, positions, steps, used) in results:
        print(f"{name:<22}{padding:>9.1%}{positions:>12,}{positions / base_positions:>9.2f}x"
              f"{steps:>8,}{steps / base_steps:>9.2f}x{used:>13.1%}")


def measure_cache(path: Path, image_root: Path, samples, vlm, max_length: int) -> list[tuple[str, float, int]]:
    from medtune.train.cache import encode_with_cache

    pairs = lambda: ((sample, image_root) for sample in samples)  # noqa: E731
    timings = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for label in ("cold (encode + check images)", "cached (Arrow read)"):
            start = time.perf_counter()
            result = encode_with_cache(pairs, vlm, data_files=[path], cache_dir=cache_dir, max_length=max_length)
            total = sum(len(ids) for ids in result.rows["input_ids"]) + sum(map(len, result.rows["labels"]))
            seconds = time.perf_counter() - start
            assert total > 0 and result.from_cache == label.startswith("cached")
            timings.append((label, seconds, result.tally.read))
    return timings


def print_cache_table(timings: list[tuple[str, float, int]]) -> None:
    base = timings[0][1]
    print(f"\n{'preprocessing':<32}{'seconds':>9}{'samples/s':>12}{'speed-up':>10}")
    for label, seconds, count in timings:
        print(f"{label:<32}{seconds:>9.2f}{count / seconds:>12,.0f}{base / seconds:>9.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-length", type=int, default=1024,
                        help="tokens per packed row (and per sample) with the tiny preset's image tokens")
    parser.add_argument("--llava-max-length", type=int, default=2048,
                        help="the same with 576 image tokens per image (LLaVA-1.5's context length)")
    parser.add_argument("--rows", type=int, default=8, help="rows per batch; budget = rows x max-length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from medtune.models import presets
    from medtune.models.build import build_vlm
    from medtune.models.processing import SkipSample

    path, image_root, samples = load_vqa_rad()
    vlm = build_vlm(presets.tiny_spec())
    print(f"VQA-RAD train: {len(samples)} samples; template {vlm.template}; {args.rows} rows per batch")
    for tokens_per_image, max_length in ((vlm.image_tokens_per_image, args.max_length), (576, args.llava_max_length)):
        variant = dataclasses.replace(vlm, image_tokens_per_image=tokens_per_image)
        lengths, skipped = [], 0
        for sample in samples:
            try:
                lengths.append(len(variant.encode_tokens(sample, max_length=max_length)["input_ids"]))
            except SkipSample:
                skipped += 1
        budget = args.rows * max_length
        title = (f"{tokens_per_image} image tokens per image, budget {args.rows} x {max_length} = {budget:,} "
                 f"positions per batch: {len(lengths)} samples (skipped {skipped}), length mean "
                 f"{sum(lengths) / len(lengths):.0f}, min {min(lengths)}, max {max(lengths)}; "
                 f"fewest possible steps {math.ceil(sum(lengths) / budget)}")
        print_batching_table(title, compare_batching(lengths, max_length, args.rows, args.seed))
    print_cache_table(measure_cache(path, image_root, samples, vlm, args.max_length))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
