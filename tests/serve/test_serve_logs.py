"""What an operator reads in `medtune serve`'s log: one access line per request, with token counts for completions
and never a message or an image, and a line when SIGTERM stops the server, which it does within a second."""
import logging
import re
import signal
import subprocess
import sys
import time

import pytest

from serve_helpers import SUBPROCESS_ENV, data_uri, free_port, noise_image, png_bytes

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

SECRET = "Jane Roe, born 1971-03-04, MRN 5550123"   # what a clinician might type; must never reach a log
ACCESS_LINE = re.compile(r"(GET|POST) (\S+) (\d{3}) \d+\.\d\d s(, (\d+) prompt \+ (\d+) completion tokens)?")


@pytest.fixture
def app(generator):
    from medtune.serve.api import ServerConfig, create_app

    app = create_app(generator, ServerConfig(model_id="tiny", max_tokens_limit=16))
    yield app
    app.state.worker.close()


def chat(client, **body):
    image = data_uri(png_bytes(noise_image(3)))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": f"Is {SECRET} well?"}]}]
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "temperature": 0,
                                                     "max_tokens": 6, **body})


def test_one_access_line_per_request_with_tokens_and_no_content(app, caplog):
    from fastapi.testclient import TestClient

    with caplog.at_level(logging.INFO, logger="medtune.serve.api"), TestClient(app) as client:
        plain = chat(client)
        streamed = chat(client, stream=True, stream_options={"include_usage": True})
        wrong_model = chat(client, model="other")
        health = client.get("/health")
    assert (plain.status_code, streamed.status_code, wrong_model.status_code, health.status_code) == (200, 200, 404,
                                                                                                       200)
    lines = [record.getMessage() for record in caplog.records if record.name == "medtune.serve.api"]
    matches = [ACCESS_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [m.group(1, 2, 3) for m in matches] == [("POST", "/v1/chat/completions", "200"),
                                                  ("POST", "/v1/chat/completions", "200"),
                                                  ("POST", "/v1/chat/completions", "404"),
                                                  ("GET", "/health", "200")]
    usage = plain.json()["usage"]
    assert matches[0].group(5, 6) == (str(usage["prompt_tokens"]), str(usage["completion_tokens"]))
    streamed_usage = [line for line in streamed.text.splitlines() if '"usage"' in line][-1]
    assert f'"completion_tokens": {matches[1].group(6)}' in streamed_usage
    assert matches[2].group(4) is None and matches[3].group(4) is None   # no completion, no token counts
    image_payload = data_uri(png_bytes(noise_image(3))).split(",", 1)[1]
    for forbidden in (SECRET, "Jane", image_payload[:40]):
        assert forbidden not in caplog.text


def start_and_wait_for(args: list[str], ready: str) -> tuple[subprocess.Popen, list[str]]:
    """A `medtune` subprocess, once it has printed the line containing ``ready``, and the lines so far."""
    command = [sys.executable, "-c", "import sys; from medtune.cli import main; sys.exit(main())", *args]
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    while not any(ready in line for line in lines):
        line = process.stdout.readline()
        if not line:
            process.kill()
            pytest.fail("".join(lines))
        lines.append(line)
    return process, lines


def stop_with_sigterm(process: subprocess.Popen) -> tuple[int, float]:
    """Send SIGTERM; the exit code and the seconds it took to exit."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        returncode = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    return returncode, time.monotonic() - started


# The stop itself takes a few tenths of a second; the rest of the bound is the interpreter exiting, slower on a
# busy CI machine. Before the fix, `medtune web` took about six seconds and neither verb said it had stopped.
STOP_SECONDS = 2.0


def test_sigterm_stops_serve_within_a_second_and_it_says_so(tiny_model_dir):
    port = free_port()
    # the "serving" line comes once the server listens and its signal handlers are in place
    process, lines = start_and_wait_for(["serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port),
                                         "--model-name", "tiny"], "serving")
    try:
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": SECRET}]})
        assert answer.status_code == 200
    finally:
        returncode, seconds = stop_with_sigterm(process)
    output = "".join(lines) + process.stdout.read()
    assert returncode == 0 and seconds < STOP_SECONDS, output
    assert "INFO medtune.serve.shutdown: medtune serve stopped (SIGTERM)" in output
    assert re.search(r"POST /v1/chat/completions 200 \d+\.\d\d s, \d+ prompt \+ \d+ completion tokens", output)
    assert SECRET not in output and "Traceback" not in output


def test_sigterm_stops_web_as_fast_through_the_same_path(tiny_model_dir):
    pytest.importorskip("gradio")
    port = free_port()
    process, lines = start_and_wait_for(["web", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port)],
                                        "web demo on")
    returncode, seconds = stop_with_sigterm(process)
    output = "".join(lines) + process.stdout.read()
    assert returncode == 0 and seconds < STOP_SECONDS, output
    assert "INFO medtune.serve.shutdown: medtune web stopped (SIGTERM)" in output
    assert "Traceback" not in output and "httpx" not in output   # nor a log line per start-up request
