"""The canonical format itself: medtune's sample JSON Lines (see docs/data-format.md).

Reading and writing delegate to :mod:`medtune.data.jsonl`, which streams and writes atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from medtune.data.jsonl import SampleWriter, Tally, read_samples
from medtune.data.schema import Sample


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False) -> Iterator[Sample]:
    return read_samples(path, strict=strict, tally=tally)


def sniff(record: dict) -> bool:
    """Canonical samples: only id, messages, meta (and a pair's rejected reply), every message a role and a list
    of typed parts."""
    if not set(record) <= {"id", "messages", "meta", "rejected"} or not isinstance(record.get("messages"), list):
        return False
    for message in record["messages"]:
        if not isinstance(message, dict) or not set(message) <= {"role", "content"} or "role" not in message:
            return False
        content = message.get("content")
        if not (isinstance(content, str) or isinstance(content, list) and all(
                isinstance(part, dict) and part.get("type") in ("text", "image") for part in content)):
            return False
    return True


def write(path: str | os.PathLike, samples: Iterable[Sample], *, tally: Tally) -> None:
    with SampleWriter(path, tally) as writer:
        for sample in samples:
            writer.write(sample)


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
