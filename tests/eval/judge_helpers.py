"""A fake OpenAI-compatible judge endpoint (httpx.MockTransport) for the judge and medmax tests."""
import json

import httpx


def fake_endpoint(replies, seen):
    """Answers each request with the next reply; a reply that is an int is sent as that HTTP status."""
    queue = list(replies)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        assert request.url.path == "/v1/chat/completions"
        reply = queue.pop(0)
        if isinstance(reply, int):
            return httpx.Response(reply, text="overloaded")
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply}}]})
    return httpx.MockTransport(handler)
