"""The canonical sample: the one data format medtune speaks inside.

Every external format is read into a :class:`Sample` and written from one (``medtune.data.formats``); nothing
else in the code knows about external formats. A sample is an id, a list of messages and metadata:

* ``messages``: ``role`` is ``system``, ``user`` or ``assistant``; ``content`` is a list of parts, each either
  text or an image reference. Image references are resolved and loaded late (``medtune.data.images``).
* ``ImageRef.path`` is relative to the dataset's image root (LLaVA's ``image_folder``, GMAI-VL's
  ``image_dir``); the root travels with the dataset (``--image-root`` on the command line, ``image_root`` in
  recipes) and defaults to the directory of the data file. DICOM files may name a ``frame``; NIfTI volumes an
  ``axis`` and ``slice``.
* ``Metadata`` carries what evaluation and mixing need: source, task, modality, organ, split, answer_type
  (normalised to open | closed | mcq), choices, answer, credential, and ``extra`` for anything else a source
  provides (question type, benchmark-specific fields) so that conversions lose nothing.

The JSON form (one object per line in a ``.jsonl`` file) is documented in docs/data-format.md; ``to_dict`` and
``from_dict`` are its only writer and reader, and ``from_dict`` validates, raising :class:`SchemaError` with
a reason a person can act on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")
ANSWER_TYPES = ("open", "closed", "mcq")
# meta.extra keys shared by readers and scorers: the right option's letter as the benchmark gives it (two options
# may share a text), and the benchmark file's answer / option cells as written, for the families that reproduce
# a reference script reading them verbatim.
ANSWER_LABEL, SOURCE_CELLS = "answer_label", "source_cells"

# Spellings seen in the wild ("CLOSED " with a trailing space in VQA-RAD, "close" in some LLaVA-Med files,
# "yes/no" in others) all map onto the three canonical answer types.
_ANSWER_TYPE_ALIASES = {
    "open": "open", "opened": "open", "open-ended": "open", "free": "open", "free-form": "open",
    "closed": "closed", "close": "closed", "closed-ended": "closed", "yes/no": "closed", "yesno": "closed",
    "binary": "closed",
    "mcq": "mcq", "multiple-choice": "mcq", "multiple choice": "mcq", "choice": "mcq", "multi-choice": "mcq",
}


class SchemaError(ValueError):
    """A record does not follow the canonical sample format; the message says which field and why."""


def normalise_answer_type(value: Any) -> str | None:
    """Map any common spelling of an answer type onto ``open`` | ``closed`` | ``mcq`` (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SchemaError(f"answer_type must be a string, got {type(value).__name__}")
    key = " ".join(value.strip().lower().replace("_", "-").split())
    if key == "":
        return None
    if key not in _ANSWER_TYPE_ALIASES:
        raise SchemaError(f"unknown answer_type {value!r} (expected one of open, closed, mcq)")
    return _ANSWER_TYPE_ALIASES[key]


@dataclass(frozen=True)
class ImageRef:
    """Where an image lives: a path relative to the image root, plus a frame (DICOM) or axis/slice (NIfTI)."""

    path: str
    frame: int | None = None
    axis: str | None = None
    slice: int | None = None

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise SchemaError("image path must be a non-empty string")
        for name in ("frame", "slice"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SchemaError(f"image {name} must be a non-negative integer, got {value!r}")
        if self.axis is not None and self.axis not in ("axial", "coronal", "sagittal"):
            raise SchemaError(f"image axis must be axial, coronal or sagittal, got {self.axis!r}")

    def to_dict(self) -> dict:
        # Built by hand: dataclasses.asdict deep-copies and dominated conversion profiles.
        out = {"path": self.path}
        for name in ("frame", "axis", "slice"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "ImageRef":
        if isinstance(data, str):
            return cls(path=data)
        if not isinstance(data, dict):
            raise SchemaError(f"image reference must be a path or an object, got {type(data).__name__}")
        unknown = set(data) - {"path", "frame", "axis", "slice"}
        if unknown:
            raise SchemaError(f"image reference has unknown keys: {sorted(unknown)}")
        if "path" not in data:
            raise SchemaError("image reference has no 'path'")
        return cls(**data)


@dataclass(frozen=True)
class Part:
    """One piece of a message: ``Part.of_text("...")`` or ``Part.of_image(ImageRef(...))``."""

    type: str
    text: str | None = None
    image: ImageRef | None = None

    def __post_init__(self):
        if self.type == "text":
            if not isinstance(self.text, str) or self.image is not None:
                raise SchemaError("a text part needs a string 'text' and no image")
        elif self.type == "image":
            if not isinstance(self.image, ImageRef) or self.text is not None:
                raise SchemaError("an image part needs an 'image' reference and no text")
        else:
            raise SchemaError(f"unknown content part type {self.type!r} (expected text or image)")

    @classmethod
    def of_text(cls, text: str) -> "Part":
        return cls(type="text", text=text)

    @classmethod
    def of_image(cls, image: ImageRef | str) -> "Part":
        return cls(type="image", image=image if isinstance(image, ImageRef) else ImageRef(image))

    def to_dict(self) -> dict:
        if self.type == "text":
            return {"type": "text", "text": self.text}
        return {"type": "image", "image": self.image.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> "Part":
        if not isinstance(data, dict):
            raise SchemaError(f"a content part must be an object, got {type(data).__name__}")
        kind = data.get("type")
        if kind == "text":
            return cls.of_text(data.get("text"))
        if kind == "image":
            return cls(type="image", image=ImageRef.from_dict(data.get("image")))
        raise SchemaError(f"unknown content part type {kind!r} (expected text or image)")


@dataclass(frozen=True)
class Message:
    role: str
    content: tuple[Part, ...]

    def __post_init__(self):
        if self.role not in ROLES:
            raise SchemaError(f"unknown role {self.role!r} (expected system, user or assistant)")
        object.__setattr__(self, "content", tuple(self.content))

    @property
    def text(self) -> str:
        """The message's text parts joined by newlines (image parts left out)."""
        return "\n".join(p.text for p in self.content if p.type == "text")

    @property
    def images(self) -> list[ImageRef]:
        return [p.image for p in self.content if p.type == "image"]

    def to_dict(self) -> dict:
        return {"role": self.role, "content": [p.to_dict() for p in self.content]}

    @classmethod
    def from_dict(cls, data: Any) -> "Message":
        if not isinstance(data, dict):
            raise SchemaError(f"a message must be an object, got {type(data).__name__}")
        content = data.get("content")
        if isinstance(content, str):  # a bare string is accepted as one text part
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise SchemaError("message content must be a list of parts")
        return cls(role=data.get("role"), content=tuple(Part.from_dict(p) for p in content))


_META_FIELDS = ("source", "task", "modality", "organ", "split", "answer_type", "choices", "answer", "credential")


@dataclass
class Metadata:
    source: str | None = None
    task: str | None = None
    modality: str | None = None
    organ: str | None = None
    split: str | None = None
    answer_type: str | None = None
    choices: list[str] | None = None
    answer: str | None = None
    credential: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.answer_type = normalise_answer_type(self.answer_type)
        for name in ("source", "task", "modality", "organ", "split", "answer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SchemaError(f"metadata {name} must be a string, got {type(value).__name__}")
        if self.choices is not None:
            if not isinstance(self.choices, list) or not all(isinstance(c, str) for c in self.choices):
                raise SchemaError("metadata choices must be a list of strings")
        if not isinstance(self.credential, bool):
            raise SchemaError(f"metadata credential must be true or false, got {self.credential!r}")
        if not isinstance(self.extra, dict):
            raise SchemaError("metadata extra must be an object")

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in _META_FIELDS if getattr(self, name) not in (None, False)}
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Metadata":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise SchemaError("meta must be an object")
        unknown = set(data) - set(_META_FIELDS) - {"extra"}
        if unknown:
            raise SchemaError(f"meta has unknown keys {sorted(unknown)} (put source-specific fields in meta.extra)")
        return cls(**data)


@dataclass
class Sample:
    id: str
    messages: list[Message]
    meta: Metadata = field(default_factory=Metadata)
    rejected: Message | None = None
    """A preference pair's rejected reply: the alternative to the last message (the chosen reply) after the
    same prompt. Preference methods (DPO) train on the pair; the others read the conversation as it is."""

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise SchemaError("sample id must be a non-empty string")
        if not self.messages:
            raise SchemaError("sample has no messages")
        self.messages = list(self.messages)
        if self.rejected is not None:
            if self.rejected.role != "assistant" or self.messages[-1].role != "assistant":
                raise SchemaError("a preference pair needs an assistant reply last (the chosen one) and an "
                                  f"assistant 'rejected' reply, got {self.messages[-1].role} and {self.rejected.role}")
            if self.rejected.content == self.messages[-1].content:
                raise SchemaError("the rejected reply equals the chosen one: the pair prefers nothing")

    def with_reply(self, reply: Message) -> "Sample":
        """The same prompt answered by ``reply`` instead of the last message (no pair)."""
        return Sample(id=self.id, messages=[*self.messages[:-1], reply], meta=self.meta)

    @property
    def images(self) -> list[ImageRef]:
        """All image references in message order."""
        return [image for message in self.messages for image in message.images]

    def turns(self, role: str) -> Iterator[Message]:
        return (m for m in self.messages if m.role == role)

    @property
    def question(self) -> str:
        """The text of the first user turn (what a VQA benchmark asks)."""
        return next((m.text for m in self.messages if m.role == "user"), "")

    def to_dict(self) -> dict:
        out = {"id": self.id, "messages": [m.to_dict() for m in self.messages], "meta": self.meta.to_dict()}
        if self.rejected is not None:
            out["rejected"] = self.rejected.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Sample":
        if not isinstance(data, dict):
            raise SchemaError(f"a sample must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"id", "messages", "meta", "rejected"}
        if unknown:
            raise SchemaError(f"sample has unknown keys {sorted(unknown)}")
        sample_id = data.get("id")
        if isinstance(sample_id, int) and not isinstance(sample_id, bool):
            sample_id = str(sample_id)
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise SchemaError("sample 'messages' must be a list")
        rejected = data.get("rejected")
        return cls(id=sample_id, messages=[Message.from_dict(m) for m in messages],
                   meta=Metadata.from_dict(data.get("meta")),
                   rejected=None if rejected is None else Message.from_dict(rejected))


def qa_sample(sample_id: str, question: str, answer: str | None, images: list[ImageRef] = (),
              meta: Metadata | None = None, system: str | None = None) -> Sample:
    """A single-turn visual question: images first, then the question; the answer as the assistant turn.

    Benchmark readers use this so every VQA benchmark has the same shape. ``answer`` None makes a sample
    with only the user turn (a question to be answered by a model).
    """
    messages = []
    if system:
        messages.append(Message("system", (Part.of_text(system),)))
    messages.append(Message("user", tuple(Part.of_image(i) for i in images) + (Part.of_text(question),)))
    if answer is not None:
        messages.append(Message("assistant", (Part.of_text(answer),)))
    meta = meta or Metadata()
    if meta.answer is None and answer is not None:
        meta.answer = answer
    return Sample(id=str(sample_id), messages=messages, meta=meta)
