"""LLaVA / LLaVA-Med / PathChat conversation files: a JSON list (or JSON Lines) of
``{id, image, conversations: [{from: human|gpt|assistant|system, value}]}``.

* ``image`` is one path or a list of paths; the ``<image>`` placeholders in the turns take them in order.
  A record with images and no placeholder gets them in front of its first user turn (LLaVA's own loader does
  the same); any other count mismatch skips the record with both counts in the reason.
* Leading assistant turns (before the first user turn) are dropped, as GMAI-VL does, and counted in a note.
* What plain LLaVA has no field for travels in extra keys that LLaVA loaders ignore, which makes
  canonical -> llava -> canonical lossless: ``meta`` holds the canonical metadata (answer_type, answer,
  split, ..., ``extra``), and an image with a DICOM frame or NIfTI axis/slice is written as
  ``{"path", "frame"|"axis"|"slice"}`` instead of a bare path. Unknown keys of a foreign record (LLaVA-Med's
  ``domain``, ``fig_label`` ...) are kept in ``meta.extra``.
* Text parts are joined to placeholders with one newline (``"<image>\\nQuestion"``), which the reader removes
  again; two text parts in a row cannot be told apart from one part with a newline and come back merged.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from medtune.data.formats.records import (
    TurnStats, convert_records, converted_for_writing, image_json, image_refs, iter_records,
    messages_from_turns, sample_from_record, text_from_parts, write_json_records,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import Sample

# "conversatons" (sic) is how several LLaVA-Med evaluation files spell it; Med-MoE reads both.
CONVERSATION_KEYS = ("conversations", "conversatons")
KNOWN_KEYS = {"id", "image", "meta", *CONVERSATION_KEYS}
SPEAKERS = {"user": "human", "assistant": "gpt", "system": "system"}


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False) -> Iterator[Sample]:
    stats = TurnStats()
    yield from convert_records(path, iter_records(path), partial(llava_sample, path=path, stats=stats),
                               tally=tally, strict=strict)
    stats.add_notes(tally, path)


def sniff(record: dict) -> bool:
    """LLaVA records: ``conversations`` (or ``conversatons``) of {from, value}; ShareGPT's ``images`` is not LLaVA."""
    conversations = next((record[k] for k in CONVERSATION_KEYS if k in record), None)
    return (isinstance(conversations, list) and bool(conversations) and isinstance(conversations[0], dict)
            and "from" in conversations[0] and "value" in conversations[0] and "images" not in record)


def llava_sample(record: Any, where: int | str, *, path: str | os.PathLike, stats: TurnStats,
                 known_keys: set[str] = KNOWN_KEYS) -> Sample:
    """One LLaVA record as a sample; keys outside ``known_keys`` go to ``meta.extra``."""
    if not isinstance(record, dict):
        raise ValueError(f"record is not a JSON object (got {type(record).__name__})")
    conversations = next((record[k] for k in CONVERSATION_KEYS if k in record), None)
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("missing field 'conversations' (a non-empty list of {from, value})")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}] needs 'from' and 'value'")
        turns.append((turn["from"], turn["value"]))
    messages = messages_from_turns(turns, image_refs(record.get("image")), stats)
    return sample_from_record(record, messages, known_keys, path, where)


def llava_record(sample: Sample) -> dict:
    images = []
    conversations = [{"from": SPEAKERS[m.role], "value": text_from_parts(m, images)} for m in sample.messages]
    record: dict[str, Any] = {"id": sample.id}
    if images:
        record["image"] = image_json(images[0]) if len(images) == 1 else [image_json(i) for i in images]
    record["conversations"] = conversations
    meta = sample.meta.to_dict()
    if meta:
        record["meta"] = meta
    return record


def write(path: str | os.PathLike, samples: Iterable[Sample], *, tally: Tally) -> None:
    """A JSON list for ``.json`` (what LLaVA's loader expects), JSON Lines for ``.jsonl``."""
    write_json_records(path, converted_for_writing(path, samples, llava_record, tally=tally), tally=tally)


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
