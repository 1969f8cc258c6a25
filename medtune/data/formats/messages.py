"""OpenAI-style / ShareGPT messages JSON Lines (a JSON list is read too).

A record is ``{"id"?, "messages": [{"role", "content"}], "images"?: [...], "meta"?}``:

* ``content`` is a string (``<image>`` placeholders take the record's ``images`` in order, the LLaMA-Factory
  ShareGPT convention) or a list of parts: ``{"type": "text", "text"}``, ``{"type": "image", "image": path}``
  (also ``"path"``/``"url"`` instead of ``"image"``), or OpenAI's ``{"type": "image_url", "image_url":
  {"url"}}``. An image part without a source takes the next entry of ``images``. Only local paths are
  accepted (``file://`` is stripped); http(s) and ``data:`` URLs are refused with a reason, because medtune
  never downloads during conversion.
* ``role`` may be spelled ShareGPT's way (``from: human|gpt``, ``value``; ``conversations`` for ``messages``).
* Leading assistant turns are dropped and counted, as for llava.
* Written as ``{"id", "messages": [{"role", "content": [parts]}], "meta"}`` with image parts
  ``{"type": "image", "image": path}`` (the Hugging Face chat-template spelling); ``meta`` carries the
  canonical metadata so canonical -> messages -> canonical is lossless.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from medtune.data.formats.records import (
    TurnStats, convert_records, converted_for_writing, image_json, image_refs, iter_records,
    messages_from_turns, parts_from_text, placeholder_count, sample_from_record, write_json_records,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Part, Sample

KNOWN_KEYS = {"id", "messages", "conversations", "images", "meta"}
IMAGE_PART_TYPES = ("image", "image_url")


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False) -> Iterator[Sample]:
    stats = TurnStats()
    yield from convert_records(path, iter_records(path), partial(messages_sample, path=path, stats=stats),
                               tally=tally, strict=strict)
    stats.add_notes(tally, path)


def sniff(record: dict) -> bool:
    """OpenAI/ShareGPT records: ``messages`` of {role, content}, or ShareGPT turns with an ``images`` list."""
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return False
    if "role" in turns[0] and "content" in turns[0]:
        return True
    return "from" in turns[0] and ("messages" in record or "images" in record)


def messages_sample(record: Any, where: int | str, *, path: str | os.PathLike, stats: TurnStats) -> Sample:
    if not isinstance(record, dict):
        raise ValueError(f"record is not a JSON object (got {type(record).__name__})")
    turns_raw = record.get("messages", record.get("conversations"))
    if not isinstance(turns_raw, list) or not turns_raw:
        raise ValueError("missing field 'messages' (a non-empty list of {role, content})")
    turns = []
    for i, turn in enumerate(turns_raw):
        if not isinstance(turn, dict):
            raise ValueError(f"messages[{i}] is not an object")
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise ValueError(f"messages[{i}] needs 'role' and 'content'")
        turns.append((role, content))
    messages = messages_from_turns(turns, image_refs(record.get("images")), stats,
                                   parts_of=_content_parts, slots_of=_content_slots)
    return sample_from_record(record, messages, KNOWN_KEYS, path, where)


def _content_slots(content: Any) -> int:
    """How many entries of the record's ``images`` list this content consumes."""
    if isinstance(content, str):
        return placeholder_count(content)
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    slots = 0
    for part in content:
        if not isinstance(part, dict):
            raise ValueError(f"a content part must be an object, got {type(part).__name__}")
        if part.get("type") == "text":
            slots += placeholder_count(part.get("text"))
        elif part.get("type") in IMAGE_PART_TYPES:
            slots += _explicit_image(part) is None
        else:
            raise ValueError(f"unknown content part type {part.get('type')!r} (expected text, image or image_url)")
    return slots


def _content_parts(content: Any, images: Iterator[ImageRef]) -> list[Part]:
    if isinstance(content, str):
        return parts_from_text(content, images)
    parts: list[Part] = []
    for part in content:
        if part["type"] == "text":
            parts.extend(parts_from_text(part["text"], images))
        else:
            ref = _explicit_image(part)
            parts.append(Part.of_image(ref if ref is not None else next(images)))
    return parts


def _explicit_image(part: dict) -> ImageRef | None:
    """The image a part names itself, or None when it is a slot for the record's ``images`` list."""
    if part.get("type") == "image_url":
        source = part.get("image_url")
        source = source.get("url") if isinstance(source, dict) else source
    else:
        source = next((part[k] for k in ("image", "path", "url") if part.get(k) not in (None, "")), None)
    if source is None:
        return None
    if isinstance(source, str):
        if source.startswith(("http://", "https://", "data:")):
            raise ValueError(f"image {source[:40]!r} is a URL or inline data; medtune needs a local path")
        source = source.removeprefix("file://")
    return image_refs(source)[0]


def messages_record(sample: Sample) -> dict:
    messages = [{"role": m.role, "content": [_part_json(p) for p in m.content]} for m in sample.messages]
    record: dict[str, Any] = {"id": sample.id, "messages": messages}
    meta = sample.meta.to_dict()
    if meta:
        record["meta"] = meta
    return record


def _part_json(part: Part) -> dict:
    if part.type == "text":
        if "<image>" in part.text:
            raise ValueError("text contains a literal <image>, which would be read back as an image")
        return {"type": "text", "text": part.text}
    return {"type": "image", "image": image_json(part.image)}


def write(path: str | os.PathLike, samples: Iterable[Sample], *, tally: Tally) -> None:
    write_json_records(path, converted_for_writing(path, samples, messages_record, tally=tally), tally=tally)


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
