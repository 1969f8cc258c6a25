"""`medtune serve` under hostile requests (issue 28): every request's decoding, prompt, place in the queue and body
are bounded, a client that goes away frees its place at once, and every malformed request is a 4xx in OpenAI's
error shape that shows no server path.

The app runs in this process, in a TestClient (:func:`app_with`) or on a loopback port where a test needs real
connections (:func:`serving`: hang-ups, chunked and slow bodies), with the session's tiny Generator, or with a
tiny model of 16k positions where a generation must last long enough to be cut short. Limits are small, so every
bomb here is a few kilobytes to a few hundred.
"""
import asyncio
import contextlib
import io
import json
import socket
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from serve_helpers import data_uri, free_port, noise_image, png_bytes

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
nibabel = pytest.importorskip("nibabel")

URL = "/v1/chat/completions"


@contextlib.contextmanager
def app_with(generator, **options):
    """`medtune serve`'s app for ``generator`` with ``options`` as its ServerConfig, in a TestClient."""
    from fastapi.testclient import TestClient

    from medtune.serve.api import ServerConfig, create_app

    app = create_app(generator, ServerConfig(model_id="tiny", **options))
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client
    finally:
        app.state.worker.close()


@contextlib.contextmanager
def serving(generator, **options):
    """`medtune serve`'s app for ``generator`` with ``options`` as its ServerConfig, on a loopback port."""
    import uvicorn

    from medtune.serve.api import ServerConfig, create_app
    from medtune.serve.shutdown import wait_until_listening

    app = create_app(generator, ServerConfig(model_id="tiny", **options))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until_listening(server, thread, "test server")
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        app.state.worker.stop()
        server.should_exit = True
        thread.join(10)
        app.state.worker.close()


@pytest.fixture(scope="module")
def long_generator():
    """A tiny model with 16k positions: 8,000 new tokens take seconds, long enough to leave in the middle."""
    import torch

    from medtune.models import presets
    from medtune.models.build import build_vlm
    from medtune.models.generation import Generator

    torch.set_num_threads(1)
    return Generator(build_vlm(presets.tiny_spec(llm={"max_position_embeddings": 16384})))


def ask(*content, **settings) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": c}} if c.startswith("data:") else {"type": "text", "text": c}
             for c in content]
    return {"model": "tiny", "temperature": 0, "max_tokens": 2, "messages": [{"role": "user", "content": parts}],
            **settings}


def error_of(response) -> dict:
    """The OpenAI error object of a response, checked to have exactly OpenAI's four fields."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def raw_request(port: int, body: bytes) -> socket.socket:
    """A connection that has sent one POST and is left open (its caller closes it to hang up)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def read_response(sock: socket.socket) -> tuple[str, str]:
    """The status line and body of the one response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0].decode(), body.decode()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- 1. a memory budget per request, checked from headers before decoding ---------------------------------------


def nifti_gzip(shape, *, keep_compressed_bytes: int | None = None, extra_zeros: int = 0) -> bytes:
    """A gzipped int16 NIfTI of zeros with ``shape``, streamed through zlib (nothing the size of the volume is
    held); cut after ``keep_compressed_bytes``, or followed by ``extra_zeros`` more bytes than the header says."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    out = [packer.compress(header.binaryblock + b"\0" * 4)]
    left = int(np.prod(shape)) * 2 + extra_zeros
    block = b"\0" * (1 << 20)
    while left > 0:
        out.append(packer.compress(block[:min(left, len(block))]))
        left -= len(block)
    data = b"".join(out) + packer.flush()
    return data if keep_compressed_bytes is None else data[:keep_compressed_bytes]


def test_a_request_s_images_share_one_pixel_budget(generator):
    tile = data_uri(png_bytes(noise_image(1, (40, 40))))   # 1,600 pixels, under the per-image limit
    with app_with(generator, max_pixels=4000, max_request_pixels=5000) as client:
        assert client.post(URL, json=ask(tile, tile, tile, "Same?")).status_code == 200
        refused = client.post(URL, json=ask(tile, tile, tile, tile, "Same?"))
    assert refused.status_code == 400
    error = error_of(refused)
    assert error["param"] == "messages[0].content[3].image_url"
    assert error["message"] == ("messages[0].content[3].image_url: image of 40x40 = 1,600 pixels with the 4,800 "
                                "decoded before it is over this server's limit per request (--max-request-pixels) "
                                "of 5,000 pixels")


def test_a_gzip_nifti_bomb_is_refused_from_its_header_before_it_is_inflated(generator):
    # Cut off after its first 200 compressed bytes: inflating it would end in a gzip error, so a refusal that
    # names the budget shows the header alone was read.
    bomb = nifti_gzip((64, 64, 64), keep_compressed_bytes=200)
    with app_with(generator, max_request_pixels=100_000) as client:
        refused = client.post(URL, json=ask(data_uri(bomb, "image/nifti"), "What is it?"))
    assert refused.status_code == 400
    assert error_of(refused)["message"] == (
        "messages[0].content[0].image_url: NIfTI volume of 64x64x64 = 262,144 pixels is over this server's limit "
        "per request (--max-request-pixels) of 100,000 pixels")


def test_gzip_nifti_inflates_no_further_than_its_header_says():
    from medtune.data.images import ImageError, image_from_bytes, pixel_budget

    bomb = nifti_gzip((1024, 1024, 64))   # 128 MiB of voxels in about 130 KB
    tracemalloc.start()
    try:
        with pixel_budget(1_000_000, "the test's limit"), pytest.raises(ImageError, match="the test's limit"):
            image_from_bytes(bomb, name="bomb.nii.gz")
        refused_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        # a small volume followed by 64 MiB its header does not mention: those are never inflated
        image = image_from_bytes(nifti_gzip((32, 32, 4), extra_zeros=64 << 20), name="v.nii.gz")
        padded_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.size == (32, 32)
    assert refused_peak < 2 << 20 and padded_peak < 2 << 20, (refused_peak, padded_peak)


def test_a_deflated_dicom_is_measured_before_pydicom_inflates_it():
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from medtune.data.images import ImageError, image_from_bytes, pixel_budget
    from serve_helpers import ct_dicom_bytes

    def deflated(size: int) -> bytes:
        dataset = pydicom.dcmread(io.BytesIO(ct_dicom_bytes(size)))
        dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    assert image_from_bytes(deflated(64), name="ct.dcm", window="lung").size == (64, 64)
    bomb = deflated(2048)   # 8 MiB of pixel data in about 10 KB
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="deflated DICOM dataset inflates to over 1,600,000 bytes"):
            image_from_bytes(bomb, name="ct.dcm", max_pixels=100_000)
        with pixel_budget(100_000, "the test's limit"), pytest.raises(ImageError, match="the test's limit"):
            image_from_bytes(bomb, name="ct.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 << 20, peak   # inflated 1 MiB at a time; pydicom would have held all 8 MiB at once


def test_decoding_runs_two_at_a_time_and_requests_hold_a_queue_place_from_arrival(generator, monkeypatch):
    import medtune.serve.api as api

    decoding, most = [0], [0]
    lock = threading.Lock()
    parse = api.parse_chat_request

    def slow_parse(body, config):
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        time.sleep(1.5)
        with lock:
            decoding[0] -= 1
        return parse(body, config)

    monkeypatch.setattr(api, "parse_chat_request", slow_parse)
    with serving(generator, max_queue=3) as (url, _):
        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(url + URL, json=ask("Hello?")) for _ in range(8)))

        statuses = sorted(r.status_code for r in asyncio.run(burst()))
    # three places: three read and decoded (two at a time), five refused before their bodies were read
    assert statuses == [200] * 3 + [503] * 5
    assert most[0] == api.DECODERS == 2


def test_serve_help_states_the_limits_and_their_defaults():
    import argparse

    from medtune.serve import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    text = " ".join(parser._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "--max-request-pixels" in text and "(default 25000000)" in text
    assert "(default 20971520: 20 MiB)" in text and "refused with 413" in text


# -- 2. prompts longer than the context ------------------------------------------------------------------------


def test_a_prompt_over_the_context_is_refused_before_it_takes_a_place(long_generator, generator):
    with app_with(generator, max_tokens_limit=512) as client:
        words = client.post(URL, json=ask("is it normal " * 400, max_tokens=64))
        started = time.monotonic()
        megabyte = client.post(URL, json=ask("x" * 1_000_000, max_tokens=64))
        megabyte_seconds = time.monotonic() - started
    assert words.status_code == 400 and megabyte.status_code == 400
    error = error_of(words)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert error["message"].startswith("the prompt is ")
    assert error["message"].endswith(" tokens; with max_tokens 64 that is over the model's context of 1024 tokens")
    assert error_of(megabyte)["message"] == ("the messages' 1,000,000 characters cannot fit in the model's context "
                                             "of 1024 tokens with max_tokens 64")
    assert megabyte_seconds < 1.0   # refused without tokenizing a megabyte

    # while the only worker is busy and one place is left, the long prompt is refused at once, not queued
    with serving(long_generator, max_queue=1, max_batch_size=1, max_tokens_limit=8000) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        busy = raw_request(port, json.dumps(ask("Tell me everything.", max_tokens=8000)).encode())
        try:
            wait_for(lambda: app.state.worker.running == 1)
            started = time.monotonic()
            refused = httpx.post(url + URL, json=ask("is it normal " * 6000, max_tokens=8000), timeout=30)
            assert refused.status_code == 400 and time.monotonic() - started < 2.0
            assert error_of(refused)["code"] == "context_length_exceeded"
            assert app.state.worker.waiting == 0
        finally:
            busy.close()


# -- 3. a client that goes away frees its place within a second ------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_clients_that_hang_up_free_their_places_and_stop_their_generation(long_generator, stream):
    long_request = json.dumps(ask("Tell me everything.", max_tokens=8000, stream=stream)).encode()
    with serving(long_generator, max_queue=1, max_batch_size=1, max_tokens_limit=8000) as (url, app):
        worker, port = app.state.worker, int(url.rsplit(":", 1)[1])
        running = raw_request(port, long_request)
        wait_for(lambda: worker.running == 1)   # generating: about 10 s of work
        waiting = raw_request(port, long_request)
        wait_for(lambda: worker.waiting == 1)
        full = httpx.post(url + URL, json=ask("Short?"), timeout=30)
        assert full.status_code == 503   # both places are taken
        running.close()
        waiting.close()
        hung_up = time.monotonic()
        time.sleep(1.0)
        answered = httpx.post(url + URL, json=ask("Short?", max_tokens=4), timeout=30)
        seconds = time.monotonic() - hung_up
    assert answered.status_code == 200, answered.text
    # a second after the hang-up the place is free and the worker idle (the first generation had ~10 s to go)
    assert seconds < 2.5, seconds


# -- 4. bodies are limited while they stream in ----------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(generator):
    from medtune.serve.api import ServerConfig

    limit = ServerConfig(model_id="tiny", max_image_bytes=1000).max_body_bytes
    with serving(generator, max_image_bytes=1000) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"x" * 65536
            for _ in range(limit // len(chunk) + 2):   # past the limit, and the body never ends
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            status_line, _ = read_response(sock)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:   # says its length, sends nothing
            sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n\r\n".encode())
            declared = read_response(sock)
        small = httpx.post(url + URL, content=iter([json.dumps(ask("Hi?")).encode()]), timeout=30)   # chunked
    assert status_line == "HTTP/1.1 413 Request Entity Too Large"
    assert declared[0] == status_line and f"over the limit of {limit}" in json.loads(declared[1])["error"]["message"]
    assert small.status_code == 200, small.text


def test_a_body_that_trickles_in_or_stops_gives_its_place_back(generator, monkeypatch):
    import medtune.serve.api as api

    monkeypatch.setattr(api, "BODY_READ_SECONDS", 0.5)
    with serving(generator, max_queue=1) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            started = time.monotonic()
            slow.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
            status_line, body = read_response(slow)
            seconds = time.monotonic() - started
        gone = socket.create_connection(("127.0.0.1", port))
        gone.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
        wait_for(lambda: app.state.worker.waiting == 1)
        gone.close()
        wait_for(lambda: app.state.worker.waiting == 0, timeout=2)
        answered = httpx.post(url + URL, json=ask("Hi?"), timeout=30)
    assert status_line == "HTTP/1.1 408 Request Timeout" and 0.5 <= seconds < 2, (status_line, seconds)
    assert "did not arrive within 0.5 s" in json.loads(body)["error"]["message"]
    assert answered.status_code == 200   # the one place is free again


# -- 5. every malformed request is a 4xx in OpenAI's shape, with no server path ---------------------------------

HOSTILE = {
    "seed 2**70": (json.dumps(ask("Hi?", seed=2**70)), "'seed' must be a 64-bit integer", "seed"),
    "window object": (json.dumps(ask("Hi?") | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x.png", "window": {"center": 40}}}]}]}),
        "is not a preset", "messages[0].content[0].image_url.window"),
    "window list": (json.dumps(ask("Hi?") | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x.png", "window": [40, 400]}}]}]}),
        "is not a preset", "messages[0].content[0].image_url.window"),
    "nested 100k deep": ('{"model": "tiny", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
                         "nested too deeply", None),
    "integer of 10^6 digits": ('{"model": "tiny", "max_tokens": ' + "9" * 1_000_000 + "}", "not valid JSON", None),
    "temperature 10**400": (json.dumps(ask("Hi?", temperature=10**400)), "'temperature' must be between 0 and 2",
                            "temperature"),
    "role is a list": (json.dumps(ask("Hi?") | {"messages": [{"role": ["user"], "content": "Hi?"}]}),
                       "must be system, user or assistant", "messages[0].role"),
    "image token typed as text": (json.dumps(ask("<image> what is this?")), "cannot be encoded for this model",
                                  "messages"),
    "a megabyte model name": (json.dumps(ask("Hi?", model="m" * 1_000_000)), "not found", "model"),
    "a modality listed twice": (json.dumps(ask("Hi?", modalities=["text", "text"])),
                                "modalities must be text, image or both", None),
    "a NIfTI volume with an empty axis": (json.dumps(ask(data_uri(nifti_gzip((4, 0, 4)), "image/nifti"), "Hi?")),
                                          "axial slice is empty", "messages[0].content[0].image_url"),
    "a million empty objects": ('{"model": "tiny", "messages": [' + "{}," * 1_000_000 + "{}]}",
                                "over the limit of 200,000 JSON values", None),
    "image_sampling not an object": (json.dumps(ask("Hi?", image_sampling=[3, 1.2])),
                                     "'image_sampling' must be an object", "image_sampling"),
    "image_sampling unknown field": (json.dumps(ask("Hi?", image_sampling={"cfg": 3})),
                                     "'image_sampling' has unknown field 'cfg'", "image_sampling"),
    "image_sampling scale a string": (json.dumps(ask("Hi?", image_sampling={"guidance_text": "3"})),
                                      "'image_sampling.guidance_text' must be a number, got '3'", "image_sampling"),
    "image_sampling scale 10**400": (json.dumps(ask("Hi?", image_sampling={"guidance_image": 10**400})),
                                     "image guidance image scale must be between 0 and 20", "image_sampling"),
    "a stop string of 100k characters": (json.dumps(ask("Hi?", stop="s" * 100_000)),
                                         "each 'stop' string may have at most 64 characters", "stop"),
}


# Each request field's rule, as parse_chat_request words it (no model needed): the exact message and param
FIELD_ERRORS = {
    "messages missing": ({"messages": None}, "missing required parameter 'messages'", "messages"),
    "messages an object": ({"messages": {"role": "user"}},
                           "'messages' must be a non-empty array of message objects", "messages"),
    "a message that is a string": ({"messages": ["Hi?"]},
                                   "messages[0] must be an object with 'role' and 'content'", "messages[0]"),
    "a second message without a role": ({"messages": [{"role": "user", "content": "Hi?"}, {"content": "x"}]},
                                        "messages[1].role must be system, user or assistant, got None",
                                        "messages[1].role"),
    "content a number": ({"messages": [{"role": "user", "content": 3}]},
                         "messages[0].content must be a string or an array of parts", "messages[0].content"),
    "a part of an unknown type": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi?"}, {"type": "audio", "audio": "x"}]}]},
        "messages[0].content[1] must be {type: text, text} or {type: image_url, image_url: {url}}",
        "messages[0].content[1]"),
    "a text part without text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
                                 "messages[0].content[0] must be {type: text, text} or {type: image_url, image_url: "
                                 "{url}}", "messages[0].content[0]"),
    "no user message": ({"messages": [{"role": "developer", "content": "Be brief."}]},
                        "'messages' has no user message", "messages"),
    "an image from the assistant": ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "x.png"}}]}]},
        "messages[1].content[0]: images are only accepted in user messages", "messages[1].content[0]"),
    "max_tokens true": ({"max_tokens": True}, "'max_tokens' must be an integer, got True", "max_tokens"),
    "max_completion_tokens 0": ({"max_completion_tokens": 0}, "'max_completion_tokens' must be at least 1, got 0",
                                "max_completion_tokens"),
    "temperature a string": ({"temperature": "0"}, "'temperature' must be a number, got '0'", "temperature"),
    "top_p 0": ({"top_p": 0}, "'top_p' must be greater than 0 and at most 1, got 0", "top_p"),
    "five stop strings": ({"stop": ["a", "b", "c", "d", "e"]},
                          "'stop' must be a non-empty string or a list of at most 4 of them, got ['a', 'b', 'c', 'd', "
                          "'e']", "stop"),
    "an empty stop string": ({"stop": ""}, "'stop' must be a non-empty string or a list of at most 4 of them, "
                                           "got ''", "stop"),
    "modalities audio": ({"modalities": ["text", "audio"]},
                         "'modalities' must list text and/or image, got ['text', 'audio']", "modalities"),
    "stream a string": ({"stream": "yes"}, "'stream' must be a boolean, got 'yes'", "stream"),
    "stream_options a list": ({"stream_options": [1]}, "'stream_options' must be an object, got [1]",
                              "stream_options"),
    "the first bad field is named": ({"temperature": 5, "top_p": 5},
                                     "'temperature' must be between 0 and 2, got 5", "temperature"),
}


@pytest.mark.parametrize("case", list(FIELD_ERRORS))
def test_each_request_field_has_its_exact_error(case):
    from medtune.serve.api import ApiError, ServerConfig, parse_chat_request

    fields, message, param = FIELD_ERRORS[case]
    with pytest.raises(ApiError) as info:
        parse_chat_request(ask("Hi?") | fields, ServerConfig(model_id="tiny"))
    assert (info.value.status, info.value.message, info.value.param) == (400, message, param)


def test_a_million_bad_items_cost_one_error_not_a_million():
    """pydantic stops a list at its first bad item (fail_fast): a body of many bad messages, parts or modalities
    is refused at once, without building an error per item."""
    from medtune.serve.api import ApiError, ServerConfig, parse_chat_request

    config = ServerConfig(model_id="tiny")
    with pytest.raises(ApiError):   # the first call imports what validation needs: not what is measured
        parse_chat_request(ask("Hi?") | {"messages": [1]}, config)
    for fields, param in (({"messages": [1] * 200_000}, "messages[0]"),
                          ({"messages": [{"role": "user", "content": [1] * 200_000}]}, "messages[0].content[0]"),
                          ({"modalities": ["audio"] * 200_000}, "modalities")):
        body = ask("Hi?") | fields
        tracemalloc.start()
        started = time.perf_counter()
        with pytest.raises(ApiError) as info:
            parse_chat_request(body, config)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert info.value.param == param and seconds < 1.0 and peak < 20_000_000, (param, seconds, peak)


def test_max_completion_tokens_wins_over_max_tokens():
    from medtune.serve.api import ServerConfig, parse_chat_request

    request = parse_chat_request(ask("Hi?", max_tokens="many", max_completion_tokens=5), ServerConfig(model_id="tiny"))
    assert request.settings.max_new_tokens == 5


def test_fields_the_server_does_not_read_are_ignored():
    from medtune.serve.api import ServerConfig, parse_chat_request

    extra = {"user": "u-1", "logprobs": False, "frequency_penalty": 0.5, "response_format": {"type": "text"},
             "tools": [], "metadata": {"a": "b"}}
    request = parse_chat_request(ask("Hi?", **extra), ServerConfig(model_id="tiny"))
    plain = parse_chat_request(ask("Hi?"), ServerConfig(model_id="tiny"))
    assert (request.conversation, request.settings) == (plain.conversation, plain.settings)
    assert request.conversation == [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_malformed_requests_are_4xx_in_openai_s_shape(generator, case):
    body, message, param = HOSTILE[case]
    with app_with(generator) as client:
        response = client.post(URL, content=body.encode(), headers={"Content-Type": "application/json"})
        assert client.post(URL, json=ask("Still there?")).status_code == 200
    assert 400 <= response.status_code < 500, response.text[:300]
    error = error_of(response)
    assert message in error["message"] and error["param"] == param
    assert len(error["message"]) < 300   # a client's megabytes are not echoed back


def test_outside_missing_and_not_an_image_are_one_answer_without_server_paths(generator, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "scan.png").write_bytes(png_bytes(noise_image(2)))
    (root / "notes.txt").write_text("not an image")
    (outside / "secret.png").write_bytes(png_bytes(noise_image(3)))
    (outside / "passwords.txt").write_text("hunter2")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "secret-link.png").symlink_to(outside / "secret.png")
    probes = ["linked/secret.png", "linked/passwords.txt", "linked/missing.png", "secret-link.png", "missing.png",
              "../outside/secret.png", str(outside / "secret.png"), "/etc/passwd", "linked", "."]
    with app_with(generator, allowed_image_root=root.resolve()) as client:
        def probe(path):
            body = ask("What?") | {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": path}}, {"type": "text", "text": "What?"}]}]}
            return client.post(URL, json=body)

        answers = {path: probe(path) for path in probes}
        inside = probe("scan.png")
        not_an_image = probe("notes.txt")
    assert {(r.status_code, r.text) for r in answers.values()} == {(400, answers["missing.png"].text)}
    assert inside.status_code == 200
    assert not_an_image.status_code == 400 and "not an image file" in error_of(not_an_image)["message"]
    for response in [*answers.values(), not_an_image]:
        assert str(tmp_path) not in response.text and "/tmp" not in response.text


def test_a_seeded_request_that_draws_image_codes_runs_alone():
    """Greedy text with sampled image codes still draws from the seeded generator: batched with another row, its
    draws would interleave with that row's, so it never shares a generate call."""
    from medtune.models.generation import GenerationSettings, ImageSampling
    from medtune.serve.api import ChatRequest, _Job

    def key(**settings):
        return _Job(ChatRequest([], [], GenerationSettings(**settings))).batch_key()

    assert key(seed=1, modalities=("image",)) is None
    assert key(seed=1, modalities=("image",), image=ImageSampling(temperature=0)) is not None
    assert key(seed=1) is not None and key(seed=1, temperature=0.7) is None
