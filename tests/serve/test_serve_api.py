"""`medtune serve` as a real subprocess on 127.0.0.1, called with the official `openai` client and httpx.

Answers must equal the Generator's answers for the same request (same checkpoint, greedy); every bad request
gets a 4xx OpenAI-style error naming what is wrong, and the server keeps answering.
"""
import concurrent.futures
import json

import pytest

from serve_helpers import (ct_dicom_bytes, data_uri, free_port, noise_image, png_bytes, start_medtune,
                           stop)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

API_KEY = "test-key"
MODEL_ID = "tiny"
LIMITS = dict(max_tokens_limit=64, max_image_bytes=100_000, max_pixels=20_000)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A running `medtune serve` with an API key, an allowed image root and small limits."""
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    images.mkdir()
    (images / "scan.png").write_bytes(png_bytes(noise_image(7, (36, 30))))
    (images / "ct.dcm").write_bytes(ct_dicom_bytes())
    (root / "secret.png").write_bytes(png_bytes(noise_image(8)))
    port = free_port()
    process = start_medtune(
        ["serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port), "--model-name", MODEL_ID,
         "--api-key", API_KEY, "--allowed-image-root", str(images),
         "--max-tokens-limit", str(LIMITS["max_tokens_limit"]),
         "--max-image-bytes", str(LIMITS["max_image_bytes"]), "--max-pixels", str(LIMITS["max_pixels"])],
        f"http://127.0.0.1:{port}/health")
    yield {"url": f"http://127.0.0.1:{port}", "images": images, "root": root}
    stop(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, body, *, key=API_KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server["url"] + "/v1/chat/completions", content=raw, headers=headers, timeout=120)
    return httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def image_question(url: str, question: str = "What does this image show?", **image_url) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **image_url}},
                                         {"type": "text", "text": question}]}]


def reference(generator, question, images, **settings):
    """The Generator's answer for the conversation the server builds from image_question(...)."""
    from medtune.models.generation import GenerationSettings

    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    return generator.complete([[{"role": "user", "content": content}]], [images],
                              GenerationSettings(**settings))[0]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID


def test_completion_equals_generator(client, generator):
    from medtune.data.images import image_from_bytes

    data = png_bytes(noise_image(1))
    expected = reference(generator, "What does this image show?", [image_from_bytes(data)], max_new_tokens=12)
    response = client.chat.completions.create(model=MODEL_ID, messages=image_question(data_uri(data)),
                                              temperature=0, max_tokens=12)
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.prompt_tokens == expected.prompt_tokens


def test_streaming_equals_generator(server, client, generator):
    from medtune.data.images import image_from_bytes

    data = png_bytes(noise_image(2, (64, 32)))
    expected = reference(generator, "Any abnormality?", [image_from_bytes(data)], max_new_tokens=16)
    chunks = list(client.chat.completions.create(model=MODEL_ID, stream=True, temperature=0, max_tokens=16,
                                                 messages=image_question(data_uri(data), "Any abnormality?"),
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == expected.text
    assert len([c for c in text_chunks if c.choices[0].delta.content]) > 1  # really streamed
    assert text_chunks[0].choices[0].delta.role == "assistant"
    assert text_chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == expected.completion_tokens
    # the raw event stream ends the way OpenAI's does
    body = {"model": MODEL_ID, "messages": image_question(data_uri(data), "Any abnormality?"), "stream": True,
            "temperature": 0, "max_tokens": 16}
    raw = post(server, body)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_text_only_with_stop_and_system_message(client, generator):
    from medtune.models.generation import GenerationSettings

    conversation = [{"role": "system", "content": "You are a radiologist."},
                    {"role": "user", "content": "Describe a normal chest X-ray."}]
    free = generator.generate([conversation], [[]], GenerationSettings(max_new_tokens=16))[0]
    stop = free[len(free) // 2:][:3].strip()
    expected = generator.generate([conversation], [[]], GenerationSettings(max_new_tokens=16, stop=(stop,)))[0]
    assert expected == free[: free.find(stop)]
    response = client.chat.completions.create(model=MODEL_ID, messages=conversation, temperature=0,
                                              max_tokens=16, stop=[stop])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"


def test_image_path_under_allowed_root(server, client, generator):
    from medtune.data.images import load_image

    image = load_image("scan.png", server["images"])
    expected = reference(generator, "Which organ?", [image], max_new_tokens=10)
    for url in ("scan.png", f"file://{server['images'] / 'scan.png'}"):
        response = client.chat.completions.create(model=MODEL_ID, messages=image_question(url, "Which organ?"),
                                                  temperature=0, max_tokens=10)
        assert response.choices[0].message.content == expected.text


@pytest.mark.parametrize("how", ["data-uri", "path"])
def test_dicom_upload_with_window(server, generator, how):
    from medtune.data.images import image_from_bytes

    dicom = ct_dicom_bytes()
    expected = reference(generator, "Is there a mass?", [image_from_bytes(dicom, name="ct.dcm", window="lung")],
                         max_new_tokens=10)
    url = data_uri(dicom, "application/dicom") if how == "data-uri" else "ct.dcm"
    response = post(server, {"model": MODEL_ID, "temperature": 0, "max_tokens": 10,
                             "messages": image_question(url, "Is there a mass?", window="lung")})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected.text


def test_client_leaving_a_stream_early_does_not_hurt_the_server(server, client, generator):
    body = {"model": MODEL_ID, "stream": True, "temperature": 0, "max_tokens": 64,
            "messages": [{"role": "user", "content": "Tell me everything."}]}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        first = next(response.iter_lines())
    assert first.startswith("data: ") and json.loads(first[6:])["object"] == "chat.completion.chunk"
    expected = reference(generator, "Short?", [], max_new_tokens=4).text
    response = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=4,
                                              messages=[{"role": "user", "content": [
                                                  {"type": "text", "text": "Short?"}]}])
    assert response.choices[0].message.content == expected


def test_concurrent_requests_all_answered_correctly(client, generator):
    """Requests arriving together are batched; each still gets its own one-by-one answer."""
    from medtune.data.images import image_from_bytes

    uploads = [png_bytes(noise_image(seed, (32 + 4 * seed, 40))) for seed in range(8)]
    questions = [f"Question number {seed}: " + "is it normal? " * seed for seed in range(8)]
    expected = [reference(generator, q, [image_from_bytes(d)], max_new_tokens=8).text
                for q, d in zip(questions, uploads)]

    def ask(index):
        return client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=8,
                                              messages=image_question(data_uri(uploads[index]), questions[index]))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [r.choices[0].message.content for r in pool.map(ask, range(8))]
    assert answers == expected


def _noise_png_over(limit: int) -> bytes:
    data = png_bytes(noise_image(3, (200, 180)))  # noise does not compress: 3 bytes a pixel
    assert len(data) > limit
    return data


def _solid_png(width: int, height: int) -> bytes:
    from PIL import Image

    return png_bytes(Image.new("RGB", (width, height), (90, 90, 90)))


GOOD = image_question(data_uri(png_bytes(noise_image(4))))
BAD_REQUESTS = {
    "malformed JSON": (dict(raw=b'{"model": "tiny", "messages": ['), 400, "not valid JSON", None),
    "body not an object": (dict(raw=b'[1, 2]'), 400, "must be a JSON object", None),
    "missing messages": (dict(body={"model": MODEL_ID}), 400, "missing required parameter 'messages'", "messages"),
    "empty messages": (dict(body={"model": MODEL_ID, "messages": []}), 400, "non-empty array", "messages"),
    "bad role": (dict(body={"model": MODEL_ID, "messages": [{"role": "robot", "content": "hi"}]}), 400,
                 "messages[0].role must be system, user or assistant", "messages[0].role"),
    "unknown model": (dict(body={"model": "gpt-4o", "messages": GOOD}), 404, "model 'gpt-4o' not found", "model"),
    "non-image data URI": (dict(body={"model": MODEL_ID, "messages": image_question(
        data_uri(b"hello", "text/plain"))}), 400, "media type 'text/plain' is not an image",
        "messages[0].content[0].image_url"),
    "image media type, not image bytes": (dict(body={"model": MODEL_ID, "messages": image_question(
        data_uri(b"this is not a png at all"))}), 400, "not an image file", "messages[0].content[0].image_url"),
    "corrupt base64": (dict(body={"model": MODEL_ID, "messages": image_question(
        "data:image/png;base64,iVBORw0K@@@not-base64@@@")}), 400, "not valid base64",
        "messages[0].content[0].image_url"),
    "image over byte limit": (dict(body={"model": MODEL_ID, "messages": image_question(
        data_uri(_noise_png_over(LIMITS["max_image_bytes"])))}), 400,
        f"over the limit of {LIMITS['max_image_bytes']} bytes", "messages[0].content[0].image_url"),
    "image over pixel limit": (dict(body={"model": MODEL_ID, "messages": image_question(
        data_uri(_solid_png(200, 150)))}), 400, "200x150 = 30,000 pixels, over the limit of 20,000",
        "messages[0].content[0].image_url"),
    "path outside root (..)": (dict(body={"model": MODEL_ID, "messages": image_question("../secret.png")}), 400,
                               "no image file the server may read", "messages[0].content[0].image_url"),
    "absolute path outside root": (dict(body={"model": MODEL_ID, "messages": image_question("/etc/passwd")}),
                                   400, "no image file the server may read", "messages[0].content[0].image_url"),
    "remote URL": (dict(body={"model": MODEL_ID, "messages": image_question("https://example.org/x.png")}), 400,
                   "remote image URLs are not fetched", "messages[0].content[0].image_url"),
    "unknown window": (dict(body={"model": MODEL_ID, "messages": image_question("ct.dcm", window="sunset")}), 400,
                       "'sunset' is not a preset", "messages[0].content[0].image_url.window"),
    "max_tokens over limit": (dict(body={"model": MODEL_ID, "messages": GOOD, "max_tokens": 65}), 400,
                              "'max_tokens' is 65, over this server's limit of 64", "max_tokens"),
    "max_tokens not a number": (dict(body={"model": MODEL_ID, "messages": GOOD, "max_tokens": "many"}), 400,
                                "'max_tokens' must be an integer", "max_tokens"),
    "temperature out of range": (dict(body={"model": MODEL_ID, "messages": GOOD, "temperature": 3}), 400,
                                 "'temperature' must be between 0 and 2", "temperature"),
    "missing API key": (dict(body={"model": MODEL_ID, "messages": GOOD}, key=None), 401, "invalid or missing API key",
                        None),
    "wrong API key": (dict(body={"model": MODEL_ID, "messages": GOOD}, key="nope"), 401,
                      "invalid or missing API key", None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_clear_error_and_server_keeps_serving(server, case):
    request, status, message, param = BAD_REQUESTS[case]
    response = post(server, request.get("body"), key=request.get("key", API_KEY), raw=request.get("raw"))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["param"] == param
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_unknown_route_is_a_json_error(server):
    response = httpx.get(server["url"] + "/v1/nothing-here")
    assert response.status_code == 404
    assert "error" in response.json()


def test_still_answers_after_bad_requests(server, client, generator):
    for case in ("malformed JSON", "corrupt base64", "unknown model"):
        request = BAD_REQUESTS[case][0]
        post(server, request.get("body"), raw=request.get("raw"))
    expected = reference(generator, "Still there?", [], max_new_tokens=6).text
    response = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=6,
                                              messages=[{"role": "user", "content": [
                                                  {"type": "text", "text": "Still there?"}]}])
    assert response.choices[0].message.content == expected
    assert json.loads(httpx.get(server["url"] + "/health").text)["waiting"] == 0


def test_several_images_in_one_message_are_all_used_in_order(server, generator):
    """Two image_url parts (a frontal and a lateral view) become two images of one prompt, in their order: the
    answer and the prompt's token count are the Generator's for the same two images."""
    frontal, lateral = noise_image(21, (44, 40)), noise_image(22, (40, 44))
    expected = reference(generator, "Compare the two views.", [frontal, lateral], max_new_tokens=10)
    response = post(server, {"model": MODEL_ID, "temperature": 0, "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png_bytes(frontal))}},
                                     {"type": "image_url", "image_url": {"url": data_uri(png_bytes(lateral))}},
                                     {"type": "text", "text": "Compare the two views."}]}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["usage"]["prompt_tokens"] == expected.prompt_tokens
    one = reference(generator, "Compare the two views.", [frontal], max_new_tokens=10)
    assert expected.prompt_tokens > one.prompt_tokens   # the second image's tokens are in the prompt
