"""Benchmark: `medtune serve` driven past its queue bound: 4x ``--max-queue`` requests at once.

Starts a real ``medtune serve`` on loopback with a tiny random model (presets.tiny_spec) saved to a temporary
folder, with a small ``--max-queue``, and sends ``--factor`` x that many chat completions at the same moment
(asyncio + httpx), each long enough (``--max-tokens``) that the queue fills while the first batch runs:

* burst: every request is sent once. Each must come back either answered (200) or refused with a status
  (503 + Retry-After); a connection error, a timeout, any other status or a server that exits is a crash.
* retrying: the same burst, each refused client waiting Retry-After seconds and sending again, as OpenAI's
  clients do; every request must end answered.

Prints a table per phase (status, count, p50/p95 latency, Retry-After values), the server's own count of
refusals (/health) and whether it is still running. Exits 1 on any crash.

    python benchmarks/serve_overload.py
    python benchmarks/serve_overload.py --max-queue 16 --factor 4 --max-batch-size 4 --max-tokens 256
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common.serving import free_port, start_medtune_serve

MODEL_ID = "bench"
QUESTION = "Is there a fracture?"


def build_model(out: Path) -> Path:
    from medtune.models import presets
    from medtune.models.build import build_vlm

    build_vlm(presets.tiny_spec()).save(out)
    return out


def request_body(index: int, max_tokens: int) -> dict:
    # greedy and text only: every request has the same settings, so the server batches them
    return {"model": MODEL_ID, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"{QUESTION} (request {index})"}]}


async def send(client, url: str, body: dict, *, retry: bool) -> dict:
    """One client: the final status, its latency, how many times it was refused, the Retry-After values seen."""
    import httpx

    start, refusals, waits = time.perf_counter(), 0, []
    while True:
        try:
            response = await client.post(url, json=body)
        except httpx.HTTPError as error:   # a crash, as far as this client can tell
            return {"status": type(error).__name__, "seconds": time.perf_counter() - start, "refusals": refusals,
                    "retry_after": waits}
        if response.status_code == 503 and "retry-after" in response.headers:
            waits.append(int(response.headers["retry-after"]))
            if retry:
                refusals += 1
                await asyncio.sleep(waits[-1])
                continue
        return {"status": response.status_code, "seconds": time.perf_counter() - start, "refusals": refusals,
                "retry_after": waits}


async def burst(url: str, count: int, max_tokens: int, *, retry: bool) -> tuple[float, list[dict]]:
    import httpx

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(send(client, url, request_body(i, max_tokens), retry=retry)
                                         for i in range(count)))
        return time.perf_counter() - start, list(results)


def print_table(title: str, wall: float, results: list[dict]) -> None:
    print(f"\n{title}: {len(results)} requests, {wall:.2f} s wall")
    print(f"{'status':<22}{'count':>6}{'p50 ms':>9}{'p95 ms':>9}{'Retry-After s':>15}")
    by_status = collections.defaultdict(list)
    for result in results:
        by_status[result["status"]].append(result)
    for status, group in sorted(by_status.items(), key=lambda kv: str(kv[0])):
        latencies = sorted(r["seconds"] for r in group)
        p50 = statistics.median(latencies)
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        waits = sorted({w for r in group for w in r["retry_after"]})
        shown = f"{waits[0]}-{waits[-1]}" if len(waits) > 1 else (str(waits[0]) if waits else "-")
        label = {200: "200 answered", 503: "503 refused"}.get(status, f"{status} CRASH")
        print(f"{label:<22}{len(group):>6}{p50 * 1000:>9.0f}{p95 * 1000:>9.0f}{shown:>15}")
    refused_before = sum(r["refusals"] for r in results)
    if refused_before:
        print(f"(refused {refused_before} times in all before being answered)")


def crashes(results: list[dict], *, allowed: set) -> int:
    return sum(r["status"] not in allowed for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--factor", type=int, default=4, help="requests sent at once, as a multiple of the bound")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    import httpx

    count = args.factor * args.max_queue
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "tiny-vlm")
        port = free_port()
        server = start_medtune_serve(model, port, MODEL_ID, "--max-queue", str(args.max_queue), "--max-batch-size",
                                     str(args.max_batch_size), "--max-tokens-limit", str(max(args.max_tokens, 1024)))
        try:
            base = f"http://127.0.0.1:{port}"
            url = f"{base}/v1/chat/completions"
            asyncio.run(burst(url, 1, 4, retry=False))   # warm-up: first-call allocations, lazy imports
            burst_wall, burst_results = asyncio.run(burst(url, count, args.max_tokens, retry=False))
            after_burst = httpx.get(f"{base}/health").json()
            retry_wall, retry_results = asyncio.run(burst(url, count, args.max_tokens, retry=True))
            health = httpx.get(f"{base}/health").json()
            alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"medtune serve, tiny preset, --max-queue {args.max_queue}, --max-batch-size {args.max_batch_size}, "
          f"{count} concurrent requests ({args.factor}x the bound), {args.max_tokens} new tokens, greedy, "
          f"{os.cpu_count()} CPUs, torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print_table("burst (each request sent once)", burst_wall, burst_results)
    print_table("retrying (refused clients wait Retry-After and send again)", retry_wall, retry_results)
    print(f"\nserver: {after_burst['refused']} refusals counted in the burst, {health['refused']} in all; "
          f"waiting now {health['waiting']}; still running: {'yes' if alive else 'NO'}")
    failed = (crashes(burst_results, allowed={200, 503}) + crashes(retry_results, allowed={200})
              + (not alive) + (after_burst["refused"] != sum(r["status"] == 503 for r in burst_results)))
    if failed:
        print(f"FAILED: {failed} crashes or unaccounted requests", file=sys.stderr)
        return 1
    print("zero crashes: every request was answered or refused with 503 + Retry-After")
    return 0


if __name__ == "__main__":
    sys.exit(main())
