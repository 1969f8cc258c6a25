"""Servers the serving benchmarks start on loopback: a free port, and a process that is up once /health answers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, env: dict, timeout: float = 600) -> subprocess.Popen:
    """Run ``command`` and wait until its /health on ``port`` answers 200; the process, or the reason it is not up."""
    import httpx

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}:\n{process.stdout.read()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise TimeoutError(f"{' '.join(command[:3])} did not start within {timeout} s")


def start_medtune_serve(model: Path, port: int, model_id: str, *options: str, timeout: float = 300) -> subprocess.Popen:
    """``medtune serve MODEL`` on loopback (this Python, offline), with extra command-line ``options``."""
    command = [sys.executable, "-c", "import sys; from medtune.cli import main; sys.exit(main())", "serve",
               str(model), "--host", "127.0.0.1", "--port", str(port), "--model-name", model_id, *options]
    return start(command, port, {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}, timeout)
