"""Generation backends for evaluation: a local Hugging Face model, or any OpenAI-compatible HTTP endpoint.

Task code builds :class:`Request` objects (an id, OpenAI-style messages whose image parts carry PIL images,
and generation settings) and hands batches to a backend; it never knows which backend answers. Both return
answers in request order, so callers can key them by request id.

* :class:`LocalBackend` runs ``medtune.models.generation.Generator`` on batches (left padding, KV cache,
  greedy by default, deterministic).
* :class:`HTTPBackend` sends one chat-completion request per question to vLLM, SGLang or ``medtune serve``,
  with a bounded number in flight, a timeout per request, and retries with exponential back-off for
  connection errors, timeouts, 429 and 5xx. A 4xx other than 429 is the caller's mistake and is raised at
  once with the server's message: retrying would not help.
"""
from __future__ import annotations

import base64
import collections
import concurrent.futures
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

# One settings type for every backend: what the local Generator takes is what is sent over HTTP and recorded.
from medtune.models.generation import GenerationSettings as Settings

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One question for a backend. ``messages`` are OpenAI-style dicts; an image part is
    ``{"type": "image", "image": PIL.Image}``."""

    id: str
    messages: list[dict]
    settings: Settings = field(default_factory=Settings)
    meta: dict = field(default_factory=dict)
    """The question's sample metadata (modality, organ ...): a backend may report by it (never sent to a model)."""

    @property
    def images(self) -> list:
        return [part["image"] for m in self.messages if isinstance(m["content"], list)
                for part in m["content"] if part.get("type") == "image"]


class BackendError(RuntimeError):
    """A backend could not answer a request (after retries, where they apply)."""


class Backend(Protocol):
    name: str

    def answer(self, requests: Sequence[Request]) -> list[str]:
        """Answers in the order of ``requests``."""

    def write_report(self, out_dir, *, suffix: str = "") -> list:
        """Files a backend adds to a run's report (e.g. a local MoE model's expert usage); their paths."""


def _strip_images(messages: list[dict]) -> list[dict]:
    """Messages with image payloads removed (``{"type": "image"}`` placeholders kept in place)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if part.get("type") == "image" else part for part in content]
        out.append({"role": message["role"], "content": content})
    return out


class LocalBackend:
    """A local model through medtune's Generator, batched."""

    def __init__(self, model: Any, *, batch_size: int = 8, device: str = "cpu", dtype: str | None = None):
        from medtune.models.build import load_vlm
        from medtune.models.kinds import VLM
        from medtune.models.generation import Generator

        self.vlm = model if isinstance(model, VLM) else load_vlm(str(model), device=device, dtype=dtype)
        self.name = f"local:{getattr(self.vlm.model, 'name_or_path', '') or 'model'}"
        self.generator = Generator(self.vlm)
        self.batch_size = batch_size

    def answer(self, requests: Sequence[Request]) -> list[str]:
        answers: list[str] = []
        # Requests with different settings cannot share a generate() call; group consecutive equal ones.
        start = 0
        while start < len(requests):
            settings = requests[start].settings
            stop = start
            while stop < len(requests) and stop - start < self.batch_size and requests[stop].settings == settings:
                stop += 1
            batch = requests[start:stop]
            conversations, images = [_strip_images(r.messages) for r in batch], [r.images for r in batch]
            answers.extend(self.generator.generate(conversations, images, settings))
            # a model kind that reports on its prompts (an MoE model: which expert each domain's tokens took)
            self.vlm.observe_prompts(conversations, images, [r.meta for r in batch])
            start = stop
        return answers

    def write_report(self, out_dir, *, suffix: str = "") -> list:
        return self.vlm.write_eval_report(out_dir, suffix=suffix)


def image_data_uri(image) -> str:
    """A PIL image as a PNG data URI (lossless, so the server sees the pixels the local backend sees).

    zlib level 1: about three times faster to encode than PIL's default level 6 on radiographs, for
    payloads some 20% larger; encoding, not the network, is what a benchmark run waits for.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict], data_uri=image_data_uri) -> list[dict]:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": data_uri(part["image"])}}
                       if part.get("type") == "image" else {"type": "text", "text": part["text"]}
                       for part in content]
        out.append({"role": message["role"], "content": content})
    return out


class _DataUriCache:
    """The last few images' data URIs, so an image asked about several times is encoded once.

    Keyed by object identity (PIL images are unhashable); each entry holds its image, so an id cannot be
    reused by another image while the entry lives.
    """

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: collections.OrderedDict[int, tuple[Any, str]] = collections.OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, image) -> str:
        with self.lock:
            if id(image) in self.entries:
                self.entries.move_to_end(id(image))
                return self.entries[id(image)][1]
        uri = image_data_uri(image)
        with self.lock:
            self.entries[id(image)] = (image, uri)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return uri


class HTTPBackend:
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    RETRY_STATUS = {408, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                 transport=None):
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        self.model = model or self._only_model()
        self._data_uri = _DataUriCache()
        self.name = f"http:{self.base_url}#{self.model}"

    def _only_model(self) -> str:
        models = [m["id"] for m in self._call("GET", "/models")["data"]]
        if len(models) != 1:
            raise BackendError(f"{self.base_url} serves {len(models)} models {models}; name one with --model")
        return models[0]

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                response = self.client.request(method, path, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return response.json()
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in self.RETRY_STATUS:
                    raise BackendError(f"{self.base_url}{path}: {problem}")
            if attempt < self.retries:
                delay = self.backoff * 2 ** attempt
                log.warning("%s%s failed (%s); retry %d/%d in %.1fs", self.base_url, path, problem,
                            attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise BackendError(f"{self.base_url}{path}: gave up after {self.retries + 1} attempts ({problem})")

    def _answer_one(self, request: Request) -> str:
        settings = request.settings
        payload = {"model": self.model, "messages": to_openai_messages(request.messages, self._data_uri),
                   "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                   "top_p": settings.top_p}
        if settings.stop:
            payload["stop"] = list(settings.stop)
        if settings.seed is not None:
            payload["seed"] = settings.seed
        body = self._call("POST", "/chat/completions", payload)
        return body["choices"][0]["message"]["content"] or ""

    def answer(self, requests: Sequence[Request]) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._answer_one, requests))

    def close(self) -> None:
        self.client.close()
