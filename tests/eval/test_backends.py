"""HTTP backend behaviour against a scripted transport: retries, give-up, 4xx, ordering, payload."""
import json

import httpx
import pytest
from PIL import Image

from medtune.eval.backends import BackendError, HTTPBackend, Request, Settings


def scripted(responses, seen):
    """A transport that answers /models and then pops scripted chat responses in order."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        seen.append(json.loads(request.content))
        status, body = responses.pop(0)
        if status == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler)


def chat(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_retries_transient_failures_then_answers():
    seen = []
    backend = HTTPBackend("http://x", transport=scripted([(503, {}), ("timeout", None), (200, chat("yes"))], seen),
                          backoff=0, concurrency=1)
    assert backend.model == "tiny"
    assert backend.answer([Request("q1", [{"role": "user", "content": "hi"}])]) == ["yes"]
    assert len(seen) == 3


def test_gives_up_after_retries_with_the_last_problem():
    backend = HTTPBackend("http://x", transport=scripted([(500, {})] * 3, []), retries=2, backoff=0)
    with pytest.raises(BackendError, match="gave up after 3 attempts .*HTTP 500"):
        backend.answer([Request("q1", [{"role": "user", "content": "hi"}])])


def test_client_errors_are_not_retried():
    seen = []
    backend = HTTPBackend("http://x", transport=scripted([(400, {"error": {"message": "bad image"}})], seen), backoff=0)
    with pytest.raises(BackendError, match="HTTP 400: .*bad image"):
        backend.answer([Request("q1", [{"role": "user", "content": "hi"}])])
    assert len(seen) == 1


def test_payload_carries_settings_and_png_image():
    seen = []
    backend = HTTPBackend("http://x", transport=scripted([(200, chat("a"))], seen), concurrency=1)
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    request = Request("q1", [{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": "what?"}]}],
                      Settings(max_new_tokens=7, stop=("\n",)))
    backend.answer([request])
    payload = seen[0]
    assert payload["max_tokens"] == 7 and payload["temperature"] == 0.0 and payload["stop"] == ["\n"]
    parts = payload["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "what?"}


def test_answers_come_back_in_request_order_under_concurrency():
    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        text = json.loads(request.content)["messages"][0]["content"]
        return httpx.Response(200, json=chat(text.upper()))

    backend = HTTPBackend("http://x", transport=httpx.MockTransport(handler), concurrency=4)
    questions = [f"q{i}" for i in range(20)]
    answers = backend.answer([Request(q, [{"role": "user", "content": q}]) for q in questions])
    assert answers == [q.upper() for q in questions]
