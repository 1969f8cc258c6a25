"""MedMax JSON Lines: ``{text, image_path, image_tokens | tokens, source, task, credential}``.

* ``text`` is one interleaved sequence (instruction, context and response together) with ``<image>``
  placeholders; ``image_path`` is one path or a list, taken by the placeholders in order. MedMax trains on the
  whole sequence, and the text marks no turn boundary, so the canonical sample is **one assistant message**
  holding the sequence (text and image parts in order). Writing joins all messages' text with newlines, so
  roles of a multi-turn sample are not kept (medmax has no field for them).
* ``credential`` YES marks rows whose images MedMax may not redistribute: they ship without ``image_path`` and
  ``tokens``. They are skipped by default and counted as "credentialed (images not shipped)";
  ``include_credentialed=True`` (``--include-credentialed``) reads them once the user has filled in
  ``image_path``, with ``meta.credential = true``. A credentialed row that still has placeholders and no
  ``image_path`` is skipped with that reason.
* ``image_tokens``, ``tokens`` and any other field are kept in ``meta.extra`` and written back at the top level.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from medtune.data.formats.records import (
    IMAGE_PLACEHOLDER, Skip, TurnStats, convert_records, converted_for_writing, image_json, image_refs,
    iter_records, messages_from_turns, record_id, require, text_from_parts, write_json_records,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import Metadata, Sample

CREDENTIALED_REASON = "credentialed (images not shipped)"
MAPPED_KEYS = {"id", "text", "image_path", "source", "task", "credential"}
_YES, _NO = {"yes", "y", "true", "1"}, {"no", "n", "false", "0", ""}


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False,
         include_credentialed: bool = False) -> Iterator[Sample]:
    convert = partial(medmax_sample, path=path, include_credentialed=include_credentialed)
    return convert_records(path, iter_records(path), convert, tally=tally, strict=strict)


def sniff(record: dict) -> bool:
    """MedMax rows: ``text`` with MedMax's image or credential fields, and no conversation."""
    return ("text" in record and any(k in record for k in ("image_path", "credential", "image_tokens", "tokens"))
            and not any(k in record for k in ("conversations", "messages")))


def parse_credential(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    key = str(value).strip().lower()
    if key in _YES:
        return True
    if key in _NO:
        return False
    raise ValueError(f"credential must be YES or NO, got {value!r}")


def medmax_sample(record: Any, where: int | str, *, path: str | os.PathLike,
                  include_credentialed: bool) -> Sample:
    (text,) = require(record, "text")
    credential = parse_credential(record.get("credential"))
    if credential and not include_credentialed:
        raise Skip(CREDENTIALED_REASON)
    if not isinstance(text, str):
        raise ValueError(f"field 'text' must be text, got {type(text).__name__}")
    images = image_refs(record.get("image_path"))
    if credential and not images and IMAGE_PLACEHOLDER in text:
        raise ValueError("credentialed row has no image_path: fill in the paths of the images you obtained")
    # One assistant turn: there is no user turn, so nothing counts as a "leading" assistant turn.
    messages = messages_from_turns([("assistant", text)], images, TurnStats())
    meta = Metadata(source=_optional_text(record, "source"), task=_optional_text(record, "task"),
                    credential=credential,
                    extra={k: v for k, v in record.items() if k not in MAPPED_KEYS})
    return Sample(id=record_id(record, path, where), messages=messages, meta=meta)


def _optional_text(record: dict, key: str) -> str | None:
    value = record.get(key)
    return None if value is None else str(value)


def medmax_record(sample: Sample) -> dict:
    images: list = []
    text = "\n".join(text_from_parts(message, images) for message in sample.messages)
    record: dict[str, Any] = {"id": sample.id, "text": text,
                              "image_path": (image_json(images[0]) if len(images) == 1
                                             else [image_json(i) for i in images] or None),
                              "source": sample.meta.source, "task": sample.meta.task,
                              "credential": "YES" if sample.meta.credential else "NO"}
    for key, value in sample.meta.extra.items():
        record.setdefault(key, value)
    return record


def write(path: str | os.PathLike, samples: Iterable[Sample], *, tally: Tally) -> None:
    write_json_records(path, converted_for_writing(path, samples, medmax_record, tally=tally), tally=tally)


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
