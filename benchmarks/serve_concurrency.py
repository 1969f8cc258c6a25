"""Benchmark: `medtune serve` under 64 concurrent chat requests vs the same requests sent one by one.

Starts a real ``medtune serve`` on loopback with a tiny random model (presets.tiny_spec, or ``--preset small``)
saved to a temporary folder, then sends ``--requests`` chat completions, each with its own image (a PNG data
URI) and question, greedy, ``--max-tokens`` new tokens:

* one by one (baseline): each request waits for the previous answer;
* concurrently: all requests at once (asyncio + httpx), which the server queues and micro-batches.

Every request must succeed (HTTP 200) in both runs, and, decoding being greedy, the concurrent answers must
equal the one-by-one answers. Prints requests/s and p50/p95 latency for both, the ratios, and the batch sizes
the server formed (from /health).

    python benchmarks/serve_concurrency.py
    python benchmarks/serve_concurrency.py --requests 64 --max-tokens 32 --max-batch-size 16 --preset small
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common.serving import free_port, start_medtune_serve

MODEL_ID = "bench"


def build_model(preset: str, out: Path) -> Path:
    from medtune.models import presets
    from medtune.models.build import build_vlm

    build_vlm(presets.preset_spec(preset)).save(out)
    return out


def make_requests(count: int, max_tokens: int) -> list[dict]:
    """``count`` distinct chat requests: a noise PNG of varying size and a question of varying length."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    bodies = []
    for index in range(count):
        pixels = rng.integers(0, 256, (32 + index % 5 * 8, 32 + index % 3 * 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        question = f"Question {index}: what is seen here?" + " Describe it." * (index % 4)
        bodies.append({"model": MODEL_ID, "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": question}]}]})
    return bodies


async def timed_post(client, url: str, body: dict) -> tuple[float, int, str | None]:
    start = time.perf_counter()
    response = await client.post(url, json=body)
    elapsed = time.perf_counter() - start
    text = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
    return elapsed, response.status_code, text


async def run_one_by_one(url: str, bodies: list[dict]):
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = [await timed_post(client, url, body) for body in bodies]
        return time.perf_counter() - start, results


async def run_concurrently(url: str, bodies: list[dict]):
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(timed_post(client, url, body) for body in bodies))
        return time.perf_counter() - start, list(results)


def summarise(wall: float, results) -> dict:
    latencies = sorted(r[0] for r in results)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"ok": sum(r[1] == 200 for r in results), "rps": len(results) / wall, "p50": quantiles[49],
            "p95": quantiles[94], "wall": wall}


def print_table(count: int, baseline: dict, concurrent: dict) -> None:
    print(f"\n{'mode':<14}{'requests':>9}{'ok':>5}{'wall s':>9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}")
    for name, row in (("one by one", baseline), ("concurrent", concurrent)):
        print(f"{name:<14}{count:>9}{row['ok']:>5}{row['wall']:>9.2f}{row['rps']:>9.2f}"
              f"{row['p50'] * 1000:>9.0f}{row['p95'] * 1000:>9.0f}")
    print(f"{'ratio':<14}{'':>9}{'':>5}{concurrent['wall'] / baseline['wall']:>8.2f}x"
          f"{concurrent['rps'] / baseline['rps']:>8.2f}x{concurrent['p50'] / baseline['p50']:>8.2f}x"
          f"{concurrent['p95'] / baseline['p95']:>8.2f}x   (concurrent / one by one)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    args = parser.parse_args(argv)
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.preset, Path(tmp) / f"{args.preset}-vlm")
        port = free_port()
        server = start_medtune_serve(model, port, MODEL_ID, "--max-batch-size", str(args.max_batch_size))
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            bodies = make_requests(args.requests, args.max_tokens)
            asyncio.run(run_one_by_one(url, bodies[:2]))  # warm-up: first-call allocations, lazy imports
            base_wall, base_results = asyncio.run(run_one_by_one(url, bodies))
            before = httpx.get(f"http://127.0.0.1:{port}/health").json()["batch_sizes"]
            conc_wall, conc_results = asyncio.run(run_concurrently(url, bodies))
            after = httpx.get(f"http://127.0.0.1:{port}/health").json()["batch_sizes"]
        finally:
            server.terminate()
            server.wait(timeout=30)
    baseline, concurrent = summarise(base_wall, base_results), summarise(conc_wall, conc_results)
    print(f"medtune serve, {args.preset} preset, {args.requests} requests, {args.max_tokens} new tokens, greedy, "
          f"max batch size {args.max_batch_size}, torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print_table(args.requests, baseline, concurrent)
    formed = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    print("batches formed in the concurrent run (size: count): "
          + ", ".join(f"{size}: {n}" for size, n in sorted(formed.items(), key=lambda kv: int(kv[0])) if n))
    same = sum(b[2] == c[2] for b, c in zip(base_results, conc_results))
    print(f"concurrent answers equal to one-by-one answers: {same}/{args.requests}")
    failed = args.requests - concurrent["ok"] + args.requests - baseline["ok"]
    if failed:
        print(f"FAILED: {failed} requests did not succeed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
