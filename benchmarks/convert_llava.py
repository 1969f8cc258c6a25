"""Benchmark: ``medtune data convert --from llava --to canonical`` on synthetic LLaVA files of growing size.

For each size N (default 100,000 and 1,000,000) the script writes N synthetic LLaVA records (one JSON list, the
way LLaVA ships them; written record by record so generating does not hold the list either), then runs the real
CLI in a child process and reads that child's own resource usage (``os.wait4``: peak RSS of exactly that
process, where ``getrusage(RUSAGE_CHILDREN)`` would report the maximum over all children so far). It prints
records/s and peak memory per size, against two baselines measured in the same run: the same command on an
empty list (start-up: Python, medtune and the CLI imported) and the smallest size. Streaming means the 10x larger file
needs about the same memory; the check at the end fails (exit code 1) when peak memory at the largest size
exceeds 300 MB.

    python benchmarks/convert_llava.py                      # 100k and 1M
    python benchmarks/convert_llava.py --sizes 10000 100000 # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT_MB = 300
QUESTIONS = ["What abnormality is seen in the {organ}?", "Is there a fracture of the {organ}?",
             "Which imaging plane is used for this {organ} scan?", "Describe the findings in the {organ}."]
ORGANS = ["left lung", "liver", "right kidney", "brain", "femur", "heart"]


def synthetic_record(index: int) -> dict:
    """A realistic LLaVA-Med record: 1-2 images, 1-2 rounds, now and then a leading assistant greeting."""
    organ = ORGANS[index % len(ORGANS)]
    images = [f"images/{index // 7:07d}/scan_{index:08d}.jpg"]
    turns = [{"from": "human", "value": "<image>\n" + QUESTIONS[index % len(QUESTIONS)].format(organ=organ)},
             {"from": "gpt", "value": f"The {organ} shows finding number {index} with no other abnormality."}]
    if index % 3 == 0:
        images.append(f"images/{index // 7:07d}/prior_{index:08d}.jpg")
        turns += [{"from": "human", "value": "Compare with the prior study:\n<image>"},
                  {"from": "gpt", "value": "The finding is new compared with the prior study."}]
    if index % 10 == 0:
        turns.insert(0, {"from": "gpt", "value": "Hello, I can describe medical images."})
    return {"id": f"synthetic-{index}", "image": images if len(images) > 1 else images[0],
            "conversations": turns, "domain": {"radiology": True}}


def write_synthetic(path: Path, count: int) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[")
        for index in range(count):
            handle.write(("\n" if index == 0 else ",\n") + json.dumps(synthetic_record(index)))
        handle.write("\n]\n")


CHILD_CONVERT = ("import sys; from medtune.cli import main; "
                 "sys.exit(main(['data', 'convert', '--from', 'llava', '--to', 'canonical', sys.argv[1], sys.argv[2]]))")


def run_child(code: str, *args: str) -> tuple[float, float, str]:
    """Run ``python -c code args``; return (seconds, peak RSS in MB of that child, its stdout)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=stdout, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        stdout.seek(0)
        output = stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"child failed with exit code {process.returncode}:\n{output}")
    return seconds, usage.ru_maxrss / 1024, output  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="record counts")
    parser.add_argument("--workdir", type=Path, help="where to put the files (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        empty = Path(folder) / "empty.json"
        empty.write_text("[]")
        _, startup_mb, _ = run_child(CHILD_CONVERT, str(empty), str(Path(folder) / "empty.jsonl"))
        rows = []
        for size in sorted(args.sizes):
            source, target = Path(folder) / f"llava_{size}.json", Path(folder) / f"canonical_{size}.jsonl"
            write_synthetic(source, size)
            seconds, peak_mb, output = run_child(CHILD_CONVERT, str(source), str(target))
            summary = output.strip().splitlines()[-1]
            if not summary.startswith(f"{size} read, {size} written, 0 skipped"):
                raise RuntimeError(f"unexpected summary for {size} records: {summary}")
            rows.append((size, source.stat().st_size / 2**20, seconds, peak_mb))
            source.unlink()
            target.unlink()
    print_table(rows, startup_mb)
    largest = rows[-1]
    ok = largest[3] < LIMIT_MB
    print(f"\npeak memory at {largest[0]:,} records: {largest[3]:.0f} MB "
          f"({'under' if ok else 'OVER'} the {LIMIT_MB} MB limit)")
    return 0 if ok else 1


def print_table(rows: list[tuple[int, float, float, float]], startup_mb: float) -> None:
    base_size, _, base_seconds, base_mb = rows[0]
    print(f"baseline: the same command on an empty list (start-up cost) peak RSS {startup_mb:.1f} MB\n")
    print(f"| {'records':>10} | {'input MB':>8} | {'seconds':>8} | {'records/s':>9} | {'peak RSS MB':>11} "
          f"| {'RSS - startup':>13} | {'x records':>9} | {'x peak RSS':>10} |")
    print("|" + "|".join("-" * (width + 2) for width in (10, 8, 8, 9, 11, 13, 9, 10)) + "|")
    for size, input_mb, seconds, peak_mb in rows:
        print(f"| {size:>10,} | {input_mb:>8.0f} | {seconds:>8.1f} | {size / seconds:>9,.0f} | {peak_mb:>11.1f} "
              f"| {peak_mb - startup_mb:>13.1f} | {size / base_size:>9.1f} | {peak_mb / base_mb:>10.2f} |")


if __name__ == "__main__":
    sys.exit(main())
