"""An OpenAI-compatible HTTP API for a medtune model: ``medtune serve``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain, or ``stream: true`` as server-sent
``chat.completion.chunk`` events ending with ``data: [DONE]``) and ``GET /health``.

Design choices:

* Requests are validated by a pydantic model (``_ChatBody``: strict types, ranges, the messages' structure;
  fields it does not read are ignored) and its first error is worded as OpenAI's error shape
  ``{"error": {"message", "type", "param", "code"}}`` with a message that names the offending field
  (``messages[0].content[1].image_url``); the server keeps serving.
* Images arrive as ``image_url`` data URIs (PNG/JPEG/..., or ``application/dicom``) or as file paths under the
  one root the operator allows (``--allowed-image-root``; a path whose real path leaves it is refused with the
  same words as a missing file, and no message shows a server path). Remote URLs are never fetched.
* Every request is bounded before it costs much (a client may be hostile): its body is read as it arrives and
  refused past its size (413, chunked or not) or past :data:`BODY_READ_SECONDS` (408), and past
  :data:`MAX_JSON_VALUES` before it is parsed; its images share one pixel budget (``--max-request-pixels``),
  charged from each header before the pixels are decoded (a gzipped NIfTI is inflated only as far as its header
  says, once that fits; a deflated DICOM is measured before pydicom inflates it); at most :data:`DECODERS`
  requests decode at once; its prompt is encoded on arrival and refused when it and ``max_tokens`` do not fit
  the model's context; the encoded prompt (pixels at the model's size) waits in the queue instead of the decoded
  images. A request holds its place in the queue from arrival, so ``--max-queue`` bounds all of this, and a
  client that hangs up (streamed or not) gives its place back within :data:`DISCONNECT_POLL_SECONDS` and its
  generation stops at the next token. JSON nested too deep, numbers out of any range and every other malformed
  input are 4xx errors.
* One worker thread owns the model. It micro-batches: it takes the oldest waiting request and every other
  waiting request with the same decoding settings (up to ``max_batch_size``) into one ``Generator.complete``
  call. Streams run alone. Greedy results do not depend on the batch (left padding is tested), sampled
  requests with a ``seed`` run alone so the seed reproduces. If a batch fails, its requests are retried one by
  one so only the faulty request gets the error.
* The queue is bounded (``--max-queue``, default :data:`DEFAULT_MAX_QUEUE` requests waiting to start, streams
  included). A request past the bound is refused at once with 503 and ``Retry-After`` (seconds, from the
  recent time per batch), as OpenAI's clients expect of an overloaded server; nothing admitted is dropped.
  Without a bound, a burst would grow memory (decoded images wait in the queue) and every client's wait
  without limit, and the clients would time out anyway, after the server had spent the work.
* Parameters follow OpenAI: ``temperature`` defaults to 1 (send 0 for greedy, deterministic answers),
  ``seed`` makes sampling reproducible, ``max_tokens`` (or ``max_completion_tokens``) is capped by the
  operator's limit, ``stop`` takes up to 4 strings. An ``image_url`` object may add ``"window": PRESET`` for a
  DICOM image (medtune.data.images.WINDOW_PRESETS).
* Binds to loopback by default; an API key (``--api-key`` or ``MEDTUNE_API_KEY``) is required as a Bearer
  token on ``/v1`` routes when set. ``/health`` stays open for load balancers and says nothing private.
* Every request gets one access-log line once its response is sent (:class:`AccessLog`): method, path, status,
  seconds and, for completions, the token counts; never a message or an image, which are patients' data. On
  SIGTERM or Ctrl-C the server stops within a second and logs that it did (:mod:`medtune.serve.shutdown`).
"""
# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at
# registration, and they are imported inside create_app, so they must be evaluated where they are defined.
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import hmac
import json
import logging
import math
import os
import queue
import reprlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, field_validator)

from medtune.models.generation import Completion, GenerationSettings, ImageSampling
from medtune.serve.shutdown import GRACE_SECONDS, run_until_signalled, wait_until_listening

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# A 5000 x 5000 image (a full-field mammogram), or several smaller ones, per request: 75 MB as RGB
DEFAULT_MAX_REQUEST_PIXELS = 25_000_000
DEFAULT_MAX_TOKENS_LIMIT = 1024
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_QUEUE = 64  # eight full batches of the default size waiting behind the one being generated
# Requests whose images are decoded at the same time: each may hold its whole pixel budget several times over
# while it decodes (16-bit data goes through float64), and more than two at once gain nothing on the cores the
# model also needs.
DECODERS = 2
DISCONNECT_POLL_SECONDS = 0.25   # how often a plain request's handler asks whether its client is still there
# A request holds its place in the queue while its body arrives: a client that trickles it in gives it back after
# this long (a body at the default limit needs 15 Mbit/s).
BODY_READ_SECONDS = 60
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
IMAGE_MEDIA_TYPES = ("image/", "application/dicom")
# The one answer for a path outside the root, missing, or not a file: which of them it is would tell a client
# what exists on the server.
NO_IMAGE_AT_PATH = "no image file the server may read at this path (paths are under its allowed image root)"
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed takes
# transformers' stop-string matcher builds a table of vocabulary size x the longest stop string (and keeps the
# last few): 20,000 characters took 300 MB with the tiny preset's vocabulary
MAX_STOP_CHARACTERS = 64
# A body of `[{},{},...]` parses to about 25 times its size: 200,000 values are at most ~16 MB of Python objects,
# and far more than a conversation needs (the commas of its text count too)
MAX_JSON_VALUES = 200_000
USAGE_KEY = "medtune.usage"  # the ASGI scope entry where a completion handler leaves token counts for the log


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring, _SHORT_REPR.maxother, _SHORT_REPR.maxlong = 80, 80, 40


class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI's error JSON with this status code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServerConfig:
    """What the operator decides about a server (the command-line options of ``medtune serve``)."""

    model_id: str
    api_key: str | None = None
    allowed_image_root: Path | None = None
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int | None = None  # None: the image loader's own decompression-bomb guard
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS   # all of a request's images together
    max_batch_size: int = 8
    max_queue: int = DEFAULT_MAX_QUEUE

    @property
    def max_body_bytes(self) -> int:
        # base64 inflates by 4/3; leave room for a few images and the text of a long conversation
        return 4 * (self.max_image_bytes * 4 // 3) + 4 * 1024 * 1024


@dataclass
class ChatRequest:
    """A validated chat request: the conversation in Generator form, its images and decoding settings."""

    conversation: list[dict]
    images: list[Any]
    settings: GenerationSettings
    stream: bool = False
    include_usage: bool = False
    prompt: dict | None = None   # the encoded prompt (Generator.encode), kept instead of the images once known


# -- validation -----------------------------------------------------------------------------------------------


def parse_json_body(raw: bytes) -> dict:
    # Python's JSON objects take up to ~80 bytes per value, so a body of small values parses to many times its size
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")   # at least the number of values, in strings too
    if values > MAX_JSON_VALUES:
        raise ApiError(400, f"request body holds {values:,} commas and brackets, over the limit of "
                            f"{MAX_JSON_VALUES:,} JSON values")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, bad UTF-8, and integers over Python's digit limit
        raise ApiError(400, f"request body is not valid JSON: {_clipped(str(error))}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _clipped(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _shown(value) -> str:
    """A client's value as an error message quotes it: short (a value can be megabytes long, or deeply nested)."""
    return _SHORT_REPR.repr(value)


def _rule(holds, message: str):
    """A check pydantic runs after the type: ``message`` (with ``{}`` for the value) when ``holds`` is false."""
    def check(value):
        if not holds(value):
            raise ValueError(message.format(_shown(value)))
        return value
    return AfterValidator(check)


_Number = StrictInt | StrictFloat   # compared as given: an integer too large for a float is out of range


def _tokens(name: str):
    return Annotated[StrictInt, _rule(lambda n: n >= 1, f"'{name}' must be at least 1, got {{}}")]


class _TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class _ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Any = None   # checked by decode_image_part, which decodes it


class _Message(BaseModel):
    role: Annotated[Literal["system", "user", "assistant"],
                    BeforeValidator(lambda role: ROLE_ALIASES.get(role, role) if isinstance(role, str) else role)]
    # fail_fast: the first bad item ends the check (a list of a million bad items would make a million errors)
    content: StrictStr | Annotated[list[Annotated[_TextPart | _ImagePart, Field(discriminator="type")]],
                                   Field(fail_fast=True)]


class _ChatBody(BaseModel):
    """What the server reads of a chat request, checked in this order (fields it does not read are ignored, as
    OpenAI's clients send more than any one server uses); ``model`` and ``n`` are checked before."""

    max_tokens: _tokens("max_tokens") | None = None
    max_completion_tokens: _tokens("max_completion_tokens") | None = None
    temperature: Annotated[_Number, _rule(lambda t: 0 <= t <= 2, "'temperature' must be between 0 and 2, got {}")] \
        | None = None
    top_p: Annotated[_Number, _rule(lambda p: 0 < p <= 1, "'top_p' must be greater than 0 and at most 1, got {}")] \
        | None = None
    stop: Annotated[StrictStr, Field(min_length=1)] | Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                                                                Field(max_length=4)] | None = None
    seed: Annotated[StrictInt, _rule(lambda seed: SEED_RANGE[0] <= seed <= SEED_RANGE[1],
                                     f"'seed' must be a 64-bit integer ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {{}}")] \
        | None = None
    modalities: Annotated[list[Literal["text", "image"]], Field(min_length=1, fail_fast=True)] | None = None
    image_sampling: dict[str, Any] | None = None   # its fields: _image_sampling
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None
    messages: Annotated[list[_Message], Field(min_length=1, fail_fast=True)]

    @field_validator("stop")
    @classmethod
    def _stop_length(cls, stop):
        if max(map(len, [stop] if isinstance(stop, str) else stop), default=0) > MAX_STOP_CHARACTERS:
            raise ValueError(f"each 'stop' string may have at most {MAX_STOP_CHARACTERS} characters")
        return stop


# What a field must be, as its type error says ("'max_tokens' must be an integer, got 'many'")
_FIELD_RULES = {"max_tokens": "must be an integer", "max_completion_tokens": "must be an integer",
                "temperature": "must be a number", "top_p": "must be a number",
                "stop": "must be a non-empty string or a list of at most 4 of them", "seed": "must be an integer",
                "modalities": "must list text and/or image", "image_sampling": "must be an object",
                "stream": "must be a boolean", "stream_options": "must be an object"}


def _request_error(errors: list[dict], body: dict) -> ApiError:
    """The first of pydantic's errors about a request, as OpenAI's error naming the field."""
    first = errors[0]
    name = first["loc"][0]
    if name == "messages":
        return _messages_error(errors, body)
    if first["type"] == "value_error":   # a _rule or validator: its message is whole
        return ApiError(400, str(first["ctx"]["error"]), param=name)
    return ApiError(400, f"'{name}' {_FIELD_RULES[name]}, got {_shown(body.get(name))}", param=name)


def _messages_error(errors: list[dict], body: dict) -> ApiError:
    loc = errors[0]["loc"]
    if body.get("messages") is None:
        return ApiError(400, "missing required parameter 'messages'", param="messages")
    if len(loc) == 1:
        return ApiError(400, "'messages' must be a non-empty array of message objects", param="messages")
    where = f"messages[{loc[1]}]"
    if len(loc) == 2:
        return ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
    if loc[2] == "role":
        return ApiError(400, f"{where}.role must be system, user or assistant, got "
                             f"{_shown(body['messages'][loc[1]].get('role'))}", param=f"{where}.role")
    # content: a string, or a list of parts (pydantic reports each option; a part's index is the 5th place)
    parts = [e["loc"][4] for e in errors if e["loc"][:3] == loc[:3] and len(e["loc"]) > 4]
    if not parts:
        return ApiError(400, f"{where}.content must be a string or an array of parts", param=f"{where}.content")
    here = f"{where}.content[{parts[0]}]"
    return ApiError(400, f"{here} must be {{type: text, text}} or {{type: image_url, image_url: {{url}}}}",
                    param=here)


def parse_chat_request(body: dict, config: ServerConfig) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body and decode its images; raises :class:`ApiError` naming the field."""
    from medtune.data import images as image_io

    model = body.get("model")
    if model is None:
        raise ApiError(400, "missing required parameter 'model'", param="model")
    if model != config.model_id:
        raise ApiError(404, f"model {_shown(model)} not found; this server serves {config.model_id!r}",
                       param="model", code="model_not_found")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("max_completion_tokens") is not None:   # OpenAI's newer name wins; max_tokens is not read
        body = {key: value for key, value in body.items() if key != "max_tokens"}
    try:
        request = _ChatBody.model_validate(body)
    except ValidationError as error:
        raise _request_error(error.errors(include_url=False), body) from None
    settings = _settings(request, config)   # before any image is decoded
    with image_io.pixel_budget(config.max_request_pixels, "this server's limit per request (--max-request-pixels)"):
        conversation, images = _conversation(request.messages, config)
    return ChatRequest(conversation, images, settings, stream=bool(request.stream),
                       include_usage=bool((request.stream_options or {}).get("include_usage", False)))


def _settings(request: "_ChatBody", config: ServerConfig) -> GenerationSettings:
    """The decoding settings: the server's limits and defaults on the request's checked values."""
    name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(request, name)
    max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > config.max_tokens_limit:
        raise ApiError(400, f"'{name}' is {max_tokens}, over this server's limit of {config.max_tokens_limit}",
                       param=name)
    stop = request.stop or ()
    try:
        return GenerationSettings(
            max_new_tokens=max_tokens, temperature=float(1.0 if request.temperature is None else request.temperature),
            top_p=float(1.0 if request.top_p is None else request.top_p),
            stop=(stop,) if isinstance(stop, str) else tuple(stop), seed=request.seed,
            modalities=tuple(request.modalities or ["text"]), image=_image_sampling(request.image_sampling or {}))
    except ValueError as error:   # what only GenerationSettings checks, e.g. a modality listed twice
        raise ApiError(400, str(error)) from None


def _image_sampling(fields: dict) -> ImageSampling:
    """medtune's ``image_sampling`` extension: how an image answer's codes are picked (``guidance_text``,
    ``guidance_image``, ``temperature``, ``top_p``; Chameleon's defaults for what is left out)."""
    allowed = tuple(ImageSampling().to_dict())
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ApiError(400, f"'image_sampling' has unknown field {unknown[0]!r} (fields: {', '.join(allowed)})",
                       param="image_sampling")
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(400, f"'image_sampling.{name}' must be a number, got {_shown(value)}",
                           param="image_sampling")
        try:   # checked before float(): an integer too large for a float is out of range, not a crash
            ImageSampling(**{name: value})
        except ValueError as error:
            reason = str(error).rsplit(", got ", 1)[0]
            raise ApiError(400, f"'image_sampling': {reason}, got {_shown(value)}", param="image_sampling") from None
    return ImageSampling(**{name: float(value) for name, value in fields.items()})


def _conversation(messages: list, config: ServerConfig) -> tuple[list[dict], list]:
    """The checked messages in Generator form, each image decoded in order."""
    conversation, images = [], []
    for i, message in enumerate(messages):
        content = [_TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content
        parts = []
        for j, part in enumerate(content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            here = f"messages[{i}].content[{j}]"
            if message.role != "user":
                raise ApiError(400, f"{here}: images are only accepted in user messages", param=here)
            images.append(decode_image_part(part.image_url, config, f"{here}.image_url"))
            parts.append({"type": "image"})
        conversation.append({"role": message.role, "content": parts})
    if not any(m["role"] == "user" for m in conversation):
        raise ApiError(400, "'messages' has no user message", param="messages")
    return conversation, images


# -- images ---------------------------------------------------------------------------------------------------


def decode_image_part(image_url, config: ServerConfig, param: str):
    """A PIL image from an ``image_url`` value: ``{"url": ..., "window": optional DICOM preset}`` or a string.

    Error messages quote the loader's reason, never a server path; for a path, "outside the root", "missing" and
    "not a file" are one message (:data:`NO_IMAGE_AT_PATH`), so a client cannot probe what exists."""
    from medtune.data import images as image_io

    if isinstance(image_url, str):
        image_url = {"url": image_url}
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise ApiError(400, f"{param} must be an object with a string 'url'", param=param)
    url, window = image_url["url"], image_url.get("window")
    if window is not None and (not isinstance(window, str) or window not in image_io.WINDOW_PRESETS):
        raise ApiError(400, f"{param}.window {_shown(window)} is not a preset ({', '.join(image_io.WINDOW_PRESETS)})",
                       param=f"{param}.window")
    limits = {} if config.max_pixels is None else {"max_pixels": config.max_pixels}
    try:
        if url.startswith("data:"):
            data, media_type = _data_uri_bytes(url, config, param)
            # the suffix lets the loader recognise DICOM files written without the 128-byte preamble
            name = "upload.dcm" if media_type == "application/dicom" else f"upload.{media_type.split('/')[-1]}"
            return image_io.image_from_bytes(data, name=name, window=window, **limits)
        if url.startswith(("http://", "https://")):
            raise ApiError(400, f"{param}: remote image URLs are not fetched; send a data URI or a path under the "
                                f"server's allowed image root", param=param)
        path = _allowed_path(url.removeprefix("file://"), config, param)
        return image_io.load_image(str(path), config.allowed_image_root,
                                   allowed_roots=(config.allowed_image_root,), window=window,
                                   allow_burned_in=True, **limits)   # shown to the model, written nowhere
    except image_io.ImageError as error:
        raise ApiError(400, f"{param}: {error.reason}", param=param) from None
    except OSError:  # unreadable, or gone since it was checked: as if it were not there
        raise ApiError(400, f"{param}: {NO_IMAGE_AT_PATH}", param=param) from None


def _data_uri_bytes(url: str, config: ServerConfig, param: str) -> tuple[bytes, str]:
    header, sep, payload = url.partition(",")
    media_type = header.removeprefix("data:").split(";")[0].strip().lower()
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: a data URI must look like data:image/png;base64,<data>", param=param)
    if not media_type.startswith(IMAGE_MEDIA_TYPES):
        raise ApiError(400, f"{param}: media type {_shown(media_type or '(none)')} is not an image "
                            f"(expected image/* or application/dicom)", param=param)
    if len(payload) * 3 // 4 > config.max_image_bytes:
        raise ApiError(400, f"{param}: image is over the limit of {config.max_image_bytes} bytes", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError(400, f"{param}: image data is not valid base64 ({error})", param=param) from None
    if len(data) > config.max_image_bytes:
        raise ApiError(400, f"{param}: image is over the limit of {config.max_image_bytes} bytes", param=param)
    return data, media_type


def _allowed_path(path: str, config: ServerConfig, param: str) -> Path:
    """The real path of an image a client names, if it is a file whose real path (symlinks followed) lies under
    the allowed root's; anything else is the one :data:`NO_IMAGE_AT_PATH` error."""
    from medtune.data import images as image_io

    root = config.allowed_image_root
    if root is None:
        raise ApiError(400, f"{param}: image paths are not accepted by this server (no --allowed-image-root); "
                            f"send a data URI", param=param)
    try:
        lexical = image_io.resolve_image_path(path, root, allowed_roots=(root,))
    except image_io.ImageError:
        raise ApiError(400, f"{param}: {NO_IMAGE_AT_PATH}", param=param) from None
    real, real_root = Path(os.path.realpath(lexical)), Path(os.path.realpath(root))
    if real_root not in real.parents or not os.path.isfile(real):
        raise ApiError(400, f"{param}: {NO_IMAGE_AT_PATH}", param=param)
    if real.stat().st_size > config.max_image_bytes:
        raise ApiError(400, f"{param}: image is over the limit of {config.max_image_bytes} bytes", param=param)
    return real


# -- the worker -----------------------------------------------------------------------------------------------


@dataclass
class _Job:
    request: ChatRequest
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    # streaming jobs: deltas go to an asyncio queue in the server's event loop
    loop: asyncio.AbstractEventLoop | None = None
    deltas: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)   # its client has gone
    started: bool = False   # no longer counted as waiting: being generated, or dropped (client gone)

    def batch_key(self):
        """Jobs with equal keys can share one generate call; None: this job runs alone."""
        settings = self.request.settings
        if self.request.stream or (settings.seed is not None and settings.samples):
            return None   # a seeded draw is reproducible only alone: batched rows would share the generator
        return settings

    def result(self, timeout: float | None = None) -> Completion:
        return self.future.result(timeout)


class BatchingWorker:
    """One thread that owns the Generator and micro-batches waiting requests with the same settings; at most
    ``max_queue`` requests wait to start, the next ones are refused (:meth:`busy_error`). The server takes a
    request's place in the queue on arrival (:meth:`reserve`), so what requests read and decode before they
    start is bounded by the queue too. A client that goes away (:meth:`cancel`) frees its place at once, and
    its row stops at the next token if it is being generated. Once :meth:`stop` is called (the server is
    shutting down) generation ends at the next token, and every request not yet answered gets 503 (a stream:
    an error event), so none is still open when the server closes its connections."""

    def __init__(self, generator, max_batch_size: int = 8, max_queue: int = DEFAULT_MAX_QUEUE):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()  # taken off the queue but not batchable yet
        self._admission = threading.Lock()
        self._waiting = 0                    # admitted or reserved, not started yet
        self.running = 0                     # requests being generated now
        self.refused = 0
        self._batch_seconds: float | None = None   # moving average of one generate call
        self.batch_sizes: collections.Counter = collections.Counter()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="medtune-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def full(self) -> bool:
        return self._waiting >= self.max_queue

    def busy_error(self) -> ApiError:
        """503 with Retry-After: about the time the requests waiting now take to start."""
        per_batch = self._batch_seconds or 1.0
        retry_after = max(1, math.ceil(per_batch * (self._waiting / self.max_batch_size + 1)))
        return ApiError(503, f"the server is busy: {self._waiting} requests are waiting, as many as it queues "
                             f"(--max-queue {self.max_queue}); retry after {retry_after} s", type="server_error",
                        code="server_busy", headers={"Retry-After": str(retry_after)})

    def reserve(self) -> None:
        """Take a place in the queue for a request about to be read and checked (503 when there is none); hand
        it to :meth:`submit` with ``reserved=True``, or give it back with :meth:`release`."""
        with self._admission:
            if self._stopping.is_set():
                raise _shutting_down()
            self._refuse_if_full()
            self._waiting += 1

    def release(self) -> None:
        with self._admission:
            self._waiting -= 1

    def submit(self, request: ChatRequest, *, reserved: bool = False) -> _Job:
        job = _Job(request)
        self._admit(job, reserved)
        return job

    def submit_stream(self, request: ChatRequest, loop: asyncio.AbstractEventLoop, *, reserved: bool = False
                      ) -> _Job:
        job = _Job(request, loop=loop, deltas=asyncio.Queue())
        self._admit(job, reserved)
        return job

    def cancel(self, job: _Job) -> None:
        """The job's client has gone: a waiting job gives its place back now and is never generated; a running
        one stops at its next token."""
        with self._admission:
            job.cancelled.set()
            if not job.started:
                job.started = True
                self._waiting -= 1

    def _refuse_if_full(self) -> None:
        if self.full:
            self.refused += 1
            raise self.busy_error()

    def _admit(self, job: _Job, reserved: bool) -> None:
        with self._admission:
            if self._stopping.is_set():
                if reserved:
                    self._waiting -= 1
                raise _shutting_down()
            if not reserved:
                self._refuse_if_full()
                self._waiting += 1
        self._queue.put(job)

    def _start(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs that still have a client, now counted as started rather than waiting."""
        with self._admission:
            live = [job for job in jobs if not job.started]
            for job in live:
                job.started = True
            self._waiting -= len(live)
        return live

    def _timed(self, seconds: float) -> None:
        self._batch_seconds = seconds if self._batch_seconds is None else 0.8 * self._batch_seconds + 0.2 * seconds

    def stop(self) -> None:
        """Cut what is being generated short and answer every request left with 503 (see the class)."""
        self._stopping.set()

    def close(self, timeout: float = 10.0):
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def _next(self, block: bool):
        if self._held:
            return self._held.popleft()
        return self._queue.get(block=block)

    def _loop(self):
        while (job := self._next(block=True)) is not None:
            if self._stopping.is_set():
                for left in self._start([job]):
                    if left.request.stream:
                        _put(left, _shutting_down())
                    else:
                        left.future.set_exception(_shutting_down())
                continue
            jobs = self._start([job] if job.request.stream else self._gather(job))
            if not jobs:
                continue
            started, self.running = time.monotonic(), len(jobs)
            if job.request.stream:
                self._run_stream(job)
            else:
                self._run_batch(jobs)
            self.running = 0
            self._timed(time.monotonic() - started)

    def _gather(self, first: _Job) -> list[_Job]:
        batch, key, skipped = [first], first.batch_key(), []
        if key is not None:
            while len(batch) < self.max_batch_size:
                try:
                    job = self._next(block=False)
                except queue.Empty:
                    break
                if job is None:  # shutting down: let the loop see it after this batch
                    skipped.append(job)
                    break
                if job.started:  # its client has gone
                    continue
                (batch if job.batch_key() == key else skipped).append(job)
        self._held.extendleft(reversed(skipped))  # keep arrival order for the ones that wait
        return batch

    def _run_batch(self, batch: list[_Job]):
        self.batch_sizes[len(batch)] += 1
        requests = [job.request for job in batch]
        prompts = [r.prompt for r in requests]
        try:
            completions = self.generator.complete(
                [r.conversation for r in requests], [r.images for r in requests], requests[0].settings,
                cancel=self._stopping, cancel_rows=[job.cancelled for job in batch],
                prompts=None if None in prompts else prompts)
        except Exception as error:
            if len(batch) > 1:  # find the culprit: only its own request should fail
                for job in batch:
                    self._run_batch([job])
                return
            log.exception("generation failed")
            batch[0].future.set_exception(_as_api_error(error))
            return
        if self._stopping.is_set():  # the answers may have been cut at any token: none is given
            for job in batch:
                job.future.set_exception(_shutting_down())
            return
        for job, completion in zip(batch, completions):
            job.future.set_result(completion)

    def _run_stream(self, job: _Job):
        request = job.request
        try:
            stream = self.generator.stream(request.conversation, request.images, request.settings,
                                           prompt=request.prompt)
            for delta in stream:
                if job.cancelled.is_set() or self._stopping.is_set():
                    stream.deltas.close()  # stops the generation thread too
                    _put(job, _shutting_down())  # read only when the server is stopping, not by a client gone
                    return
                _put(job, delta)
            _put(job, stream.completion)
        except Exception as error:
            log.exception("streaming generation failed")
            _put(job, _as_api_error(error))


def _put(job: _Job, item) -> None:
    """Hand a stream's next delta (or its end) to the event loop serving its client."""
    try:
        job.loop.call_soon_threadsafe(job.deltas.put_nowait, item)
    except RuntimeError:  # that loop has closed (the server stopped): no one is left to read
        pass


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; send the request again once it is back", type="server_error",
                    code="server_shutting_down")


def _as_api_error(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if _is_input_error(error):
        return ApiError(400, f"the request cannot be encoded for this model: {error}")
    return ApiError(500, f"generation failed: {type(error).__name__}", type="server_error")


def _is_input_error(error: BaseException) -> bool:
    """Errors in what a client sent (too long, wrong number of images) as opposed to server faults."""
    try:
        from medtune.models.processing import SkipSample
    except ImportError:  # pragma: no cover - preprocessing not installed
        SkipSample = ()  # noqa: N806
    return isinstance(error, SkipSample) or type(error).__module__.startswith("medtune")


# -- the app --------------------------------------------------------------------------------------------------


class AccessLog:
    """ASGI middleware: one log line per request once its response is sent (a stream's at its end): method, path,
    status, seconds and, for completions, the token counts the handler leaves under :data:`USAGE_KEY`. Never the
    query string or a body: conversations and images are patients' data, and more people read a log than use
    the API."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, usage = time.monotonic(), [500], {}
        scope[USAGE_KEY] = usage

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            tokens = (f", {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens"
                      if usage else "")
            log.info("%s %s %d %.2f s%s", scope["method"], scope["path"], status[0], time.monotonic() - started,
                     tokens)


def create_app(generator, config: ServerConfig):
    """The FastAPI application; ``generator`` needs ``complete`` and ``stream`` like :class:`Generator`."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    worker = BatchingWorker(generator, config.max_batch_size, config.max_queue)
    decoding = asyncio.Semaphore(DECODERS)
    tokenizer = getattr(generator, "tokenizer", None)
    longest_token = max(map(len, tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
    app = FastAPI(title="medtune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(AccessLog)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, error: Exception):  # a bug, not the client's doing: logged by Starlette
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}", type="server_error").body(),
                            status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(error.status_code, str(error.detail), type=kind).body(),
                            status_code=error.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, "waiting": worker.waiting, "running": worker.running,
                "max_queue": worker.max_queue, "refused": worker.refused,
                "batch_sizes": {str(size): count for size, count in sorted(worker.batch_sizes.items())}}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, config)
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "medtune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request, config)
        worker.reserve()   # on arrival: at most --max-queue requests are read, decoded or waiting at once
        try:
            raw = await _read_body(request, config.max_body_bytes)
            async with decoding:
                chat = await run_in_threadpool(_prepare, raw, config, generator, longest_token)
            del raw
            if await request.is_disconnected():
                raise _client_gone()
        except BaseException:
            worker.release()
            raise
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = request.scope.get(USAGE_KEY, {})   # read by AccessLog
        if chat.stream:
            job = worker.submit_stream(chat, asyncio.get_running_loop(), reserved=True)
            return StreamingResponse(_sse_events(job, worker, completion_id, created, config.model_id, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        completion = await _answer_unless_gone(request, worker, worker.submit(chat, reserved=True))
        usage.update(_usage(completion))
        return _completion_body(completion, completion_id, created, config.model_id)

    return app


async def _read_body(request, limit: int) -> bytes:
    """The request's body, read as it arrives and refused (413) as soon as it passes ``limit`` bytes, whether or
    not it said its length (a chunked upload does not); 408 if it has not all arrived within
    :data:`BODY_READ_SECONDS`, since a request holds its place in the queue while it is read."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is over the limit of {limit}")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    from starlette.requests import ClientDisconnect   # the web framework is imported where it is used

    try:
        return await asyncio.wait_for(read(), BODY_READ_SECONDS)
    except ClientDisconnect:
        raise _client_gone() from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_READ_SECONDS} s",
                       code="request_timeout") from None


def _prepare(raw: bytes, config: ServerConfig, generator, longest_token: int) -> ChatRequest:
    """A request body checked, its images decoded and its prompt encoded (refused when it does not fit the
    model's context). Runs in a thread, off the event loop: JSON, images and tokenizing take CPU time."""
    chat = parse_chat_request(parse_json_body(raw), config)
    _check_modalities(generator, chat.settings)
    if getattr(generator, "vlm", None) is not None:
        chat.prompt = _encode_within_context(generator, chat, longest_token)
        chat.images = []   # their pixels are in the prompt now, at the model's size
    return chat


def _encode_within_context(generator, chat: ChatRequest, longest_token: int) -> dict:
    """The request's encoded prompt; 400 when it and ``max_tokens`` do not fit the model's context. A text that
    cannot fit however it tokenizes (no token spans more than ``longest_token`` characters) is refused before
    it is tokenized: a megabyte of text takes the tokenizer seconds."""
    context, max_tokens = generator.context_length, chat.settings.max_new_tokens
    too_long = dict(param="messages", code="context_length_exceeded")
    if context is not None:
        characters = sum(len(part["text"]) for message in chat.conversation for part in message["content"]
                         if part["type"] == "text")
        if characters > max(context - max_tokens, 0) * longest_token:
            raise ApiError(400, f"the messages' {characters:,} characters cannot fit in the model's context of "
                                f"{context} tokens with max_tokens {max_tokens}", **too_long)
    try:
        prompt = generator.encode(chat.conversation, chat.images)
    except Exception as error:   # e.g. an image token typed into a text part: ValueError
        if not (isinstance(error, ValueError) or _is_input_error(error)):
            raise
        raise ApiError(400, f"the request cannot be encoded for this model: {_clipped(str(error))}",
                       param="messages") from None
    length = prompt["input_ids"].shape[1]
    if context is not None and length + max_tokens > context:
        raise ApiError(400, f"the prompt is {length} tokens; with max_tokens {max_tokens} that is over the model's "
                            f"context of {context} tokens", **too_long)
    return prompt


async def _answer_unless_gone(request, worker: BatchingWorker, job: _Job) -> Completion:
    """The job's completion; if its client goes away first, the job is cancelled within
    :data:`DISCONNECT_POLL_SECONDS` (its place freed, its generation stopped)."""
    answer = asyncio.wrap_future(job.future)
    while not answer.done():
        await asyncio.wait([answer], timeout=DISCONNECT_POLL_SECONDS)
        if not answer.done() and await request.is_disconnected():
            worker.cancel(job)
            raise _client_gone()
    return answer.result()


def _client_gone() -> ApiError:
    # nginx's status for a client that closed the connection: no one reads it, the access log shows it
    return ApiError(499, "the client closed the connection before the answer", code="client_closed_request")


def _check_key(request, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                       type="authentication_error", code="invalid_api_key")


def _check_modalities(generator, settings: GenerationSettings) -> None:
    """A request for images to a model that cannot write them is the client's 400, before any generation."""
    vlm = getattr(generator, "vlm", None)
    if vlm is None or settings.modalities == ("text",):
        return
    try:
        vlm.generation_kwargs(settings)
    except ValueError as error:
        raise ApiError(400, str(error), param="modalities") from None


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _message_content(completion: Completion):
    """The answer's text; with images, OpenAI content parts: the text, then each image as a PNG data URI."""
    if not completion.images:
        return completion.text
    from medtune.eval.backends import image_data_uri

    parts = [{"type": "text", "text": completion.text}] if completion.text else []
    return parts + [{"type": "image_url", "image_url": {"url": image_data_uri(image)}} for image in completion.images]


def _completion_body(completion: Completion, completion_id: str, created: int, model_id: str) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": _message_content(completion)},
                         "finish_reason": completion.finish_reason}],
            "usage": _usage(completion)}


async def _sse_events(job: _Job, worker: BatchingWorker, completion_id: str, created: int, model_id: str,
                      usage: dict):
    """``data: {chunk}`` events: the role, the text deltas, the finish reason (and usage), then [DONE]; the token
    counts also go into ``usage``, for the access log."""

    def event(choices: list, **usage) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": choices, **usage}
        return f"data: {json.dumps(body)}\n\n"

    def chunk(delta: dict, finish_reason=None) -> str:
        return event([{"index": 0, "delta": delta, "finish_reason": finish_reason}])

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await job.deltas.get()
            if isinstance(item, str):
                yield chunk({"content": item})
            elif isinstance(item, ApiError):
                yield f"data: {json.dumps(item.body())}\n\n"
                break
            else:  # the finished Completion; images (whole, not streamed) come as content parts before the end
                usage.update(_usage(item))
                if item.images:
                    yield chunk({"content": _message_content(item)[1 if item.text else 0:]})
                yield chunk({}, finish_reason=item.finish_reason)
                if job.request.include_usage:
                    yield event([], usage=_usage(item))
                break
        yield "data: [DONE]\n\n"
    finally:
        worker.cancel(job)  # the client went away early: free its place, stop generating for it


# -- entry point ----------------------------------------------------------------------------------------------


def serve(model: str, *, host: str, port: int, config_overrides: dict) -> None:
    """Load ``model`` and serve it until SIGTERM or Ctrl-C (``medtune serve``)."""
    import uvicorn

    from medtune.models.build import load_vlm
    from medtune.models.generation import Generator

    config = ServerConfig(**config_overrides)
    if host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    generator = Generator(load_vlm(model))
    app = create_app(generator, config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="medtune-serve", daemon=True)
    thread.start()
    wait_until_listening(server, thread, f"medtune serve on {host}:{port}")
    run_until_signalled(server, thread, "medtune serve", on_stop=app.state.worker.stop,
                        ready=lambda: log.info("serving %s as %r on http://%s:%d/v1", model, config.model_id, host,
                                               port))
    app.state.worker.close(timeout=GRACE_SECONDS)  # a generation still running ends with the process
