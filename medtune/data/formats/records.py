"""Shared machinery for format readers and writers: streaming record iteration, the skip/count loop and
``<image>`` placeholder handling.

* :func:`iter_records` streams a JSON array *or* JSON Lines file one record at a time. JSON arrays are parsed
  incrementally with ``json.JSONDecoder.raw_decode`` over fixed-size chunks, so a multi-gigabyte LLaVA file
  needs memory for one record, not for the whole list. A malformed record is skipped and counted and reading
  resumes at the next record (see :func:`_iter_json_array` for how); only when no next record can be found is
  the rest of the file counted as one unreadable record.
* :func:`convert_records` is the loop every reader shares: it counts each record as read, turns a converter's
  ``ValueError`` into a :class:`RecordError` naming file, record, the record's id (when it has one) and reason, skips and counts it (or raises when
  ``strict``), and counts deliberate exclusions (:class:`Skip`, e.g. credentialed MedMax rows) without ever
  failing on them, because they are a policy, not bad input.
* :func:`messages_from_turns` implements the LLaVA conventions shared by ``llava``, ``messages`` (string content)
  and ``medmax``: leading assistant turns are dropped (as GMAI-VL does) and counted, ``<image>`` placeholders are
  matched to the image list in order, and a record with images but no placeholder gets them in front of its
  first user turn.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from medtune.data.files import readable_text_file
from medtune.data.jsonl import RecordError, Tally, atomic_open, iter_json_lines, raw_id
from medtune.data.schema import ImageRef, Message, Metadata, Part, Sample

IMAGE_PLACEHOLDER = "<image>"
_CHUNK_CHARS = 1 << 16

# Speaker names seen in LLaVA, ShareGPT and OpenAI files, mapped onto canonical roles.
ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}


class Skip(Exception):
    """A record left out on purpose (not an error): counted under ``reason``, never raised by ``strict``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TurnStats:
    """What a reader changed while building messages, reported as notes at the end of a file."""

    def __init__(self):
        self.leading_assistant_dropped = 0

    def add_notes(self, tally: Tally, path: str | os.PathLike) -> None:
        if self.leading_assistant_dropped:
            tally.notes.append(f"{self.leading_assistant_dropped} leading assistant turns dropped ({path})")


# --------------------------------------------------------------------------------------------- reading

def iter_records(path: str | os.PathLike) -> Iterator[tuple[int | str, Any]]:
    """Yield ``(where, record)`` from a JSON array (``where`` = ``"[index]"``) or JSON Lines (line number).

    A record that does not parse is yielded as a :class:`RecordError` in place of the record.
    """
    path = readable_text_file(path)
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        first = _first_non_space(handle)
    if first == "[":
        yield from _iter_json_array(path)
    else:
        yield from iter_json_lines(path)


def _first_non_space(handle) -> str:
    while True:
        chunk = handle.read(4096)
        if not chunk:
            return ""
        stripped = chunk.lstrip("\ufeff \t\r\n")
        if stripped:
            return stripped[0]


class _ChunkBuffer:
    """A sliding window over a text file: ``text[pos:]`` is unread; consumed text is dropped as we go."""

    def __init__(self, handle):
        self.handle, self.text, self.pos, self.eof = handle, "", 0, False
        self.lines_before = 0  # newlines in text already dropped, for error line numbers

    def fill(self, size: int = _CHUNK_CHARS) -> bool:
        """Read more text; False at end of file. Drops the consumed prefix so memory stays flat."""
        if self.eof:
            return False
        chunk = self.handle.read(size)
        if not chunk:  # leave the text as it is, so positions in a pending error stay valid
            self.eof = True
            return False
        if self.pos > _CHUNK_CHARS:
            self.lines_before += self.text.count("\n", 0, self.pos)
            self.text, self.pos = self.text[self.pos:], 0
        self.text += chunk
        return True

    def skip_space(self) -> str:
        """Advance past whitespace; return the next character ('' at end of file)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.fill():
                return ""

    def line_at(self, pos: int) -> int:
        return self.lines_before + self.text.count("\n", 0, pos) + 1

    def indent_at(self, pos: int) -> str | None:
        """The whitespace before ``pos`` on its line; None when something else precedes it on that line or the
        line's start is no longer in the window."""
        start = self.text.rfind("\n", 0, pos) + 1
        if start == 0:
            return None
        prefix = self.text[start:pos]
        return prefix if prefix.strip(" \t") == "" else None


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    """The records of a JSON list, one at a time; a malformed one is skipped and reading resumes after it.

    Resynchronising: from a malformed record's first character, strings and brackets are followed until the
    bracket it opened closes (a doubled or missing comma, an unquoted key ... leave the structure intact).
    In a file with one record per line or per indented block, a line at the record's own indentation that opens
    a new record ends it as well (a lost quote swallows brackets). When neither is found the rest of the file is
    one unreadable record (``tail``); it may hold any number of records, which is why callers refuse to call such
    a run complete.
    """
    decoder = json.JSONDecoder()
    with open(path, "r", encoding="utf-8") as handle:
        buffer = _ChunkBuffer(handle)
        try:
            yield from _array_records(path, decoder, buffer)
        except UnicodeDecodeError as error:
            line = buffer.line_at(len(buffer.text))
            yield "[?]", RecordError(path, f"line {line}", f"not UTF-8 text ({error.reason}); "
                                     "the rest of the file is unreadable", tail=True)


def _array_records(path: Path, decoder: json.JSONDecoder, buffer: _ChunkBuffer) -> Iterator[tuple[str, Any]]:
    buffer.skip_space()
    buffer.pos += 1  # the opening '['
    index = 0
    while True:
        char = buffer.skip_space()
        if char == "]":
            return
        if char == ",":  # a stray separator ("[a,,b]"): no record is lost
            buffer.pos += 1
            continue
        where = f"[{index}]"
        if char == "":
            yield where, RecordError(path, where, "not valid JSON (the file ends inside the list, without ']'); "
                                                  "the rest of the file is missing", tail=True)
            return
        start = buffer.pos
        value, problem = _decode_next(decoder, buffer)
        if problem is None:
            yield where, value
        else:
            head = buffer.text[start:start + 4096]
            line = buffer.line_at(start)
            if not _skip_malformed(buffer, buffer.indent_at(start)):
                yield where, RecordError(path, where, f"{problem}; the rest of the file from line {line} is "
                                                      "unreadable", sample_id=_id_in_text(head), tail=True)
                return
            yield where, RecordError(path, where, problem, sample_id=_id_in_text(head))
        index += 1
        if buffer.skip_space() == ",":
            buffer.pos += 1
        # anything else is the closing ']' or a missing comma: the next turn of the loop reads what follows


def _decode_next(decoder: json.JSONDecoder, buffer: _ChunkBuffer) -> tuple[Any, str | None]:
    """Decode the value at ``buffer.pos``, reading more text until it is complete: ``(value, error or None)``.

    On a syntax error ``buffer.pos`` stays at the value's start. More text is read only when the error is at
    the end of the window (the value may just be incomplete); an error inside it is final.
    """
    size = _CHUNK_CHARS
    while True:
        try:
            value, end = decoder.raw_decode(buffer.text, buffer.pos)
        except json.JSONDecodeError as error:
            at_edge = error.pos > len(buffer.text) - 16 or error.msg.startswith("Unterminated string")
            if at_edge and buffer.fill(size):
                size *= 2  # a record larger than the window: grow geometrically, not one chunk per retry
                continue
            return None, f"not valid JSON ({error.msg} at line {buffer.line_at(error.pos)})"
        # A number ending exactly at the window's edge may continue in the next chunk.
        if end == len(buffer.text) and buffer.fill(size):
            continue
        buffer.pos = end
        return value, None


def _skip_malformed(buffer: _ChunkBuffer, indent: str | None) -> bool:
    """Move ``buffer.pos`` past the malformed value that starts there; False when its end cannot be found.

    ``indent`` is the whitespace before the value on its line (None when the value shares its line): a later
    line with that indentation that starts with the value's opening bracket begins the next record.
    """
    opening = buffer.text[buffer.pos]
    depth, in_string, escaped = 0, False, False
    offset = 0  # from buffer.pos, which fill() may move when it drops consumed text
    while True:
        i = buffer.pos + offset
        if i >= len(buffer.text):
            if not buffer.fill():
                return False
            continue
        char = buffer.text[i]
        offset += 1
        if char == "\n":
            in_string = False  # a JSON string holds no raw newline: a quote was lost on this line
            if indent is not None and depth > 0 and offset > 1 and _opens_record(buffer, i + 1, indent, opening):
                buffer.pos = i + 1
                return True
        elif in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            if depth == 0:  # the list's own ']' after a malformed scalar
                buffer.pos = i
                return True
            depth -= 1
            if depth == 0:
                buffer.pos = i + 1
                return True
        elif char == "," and depth == 0:
            buffer.pos = i
            return True


def _opens_record(buffer: _ChunkBuffer, start: int, indent: str, opening: str) -> bool:
    """Whether the line at ``start`` is ``indent`` followed by ``opening`` (reading more text if needed)."""
    while len(buffer.text) < start + len(indent) + 1 and buffer.fill():
        pass
    return buffer.text.startswith(indent + opening, start)


_ID_IN_TEXT = re.compile(r'"(?:id|qid|question_id)"\s*:\s*(?:"((?:[^"\\\n]|\\.){1,200})"|(-?\d{1,20}))')


def _id_in_text(text: str) -> str | None:
    """The id of a record that does not parse, when its text still shows one (for the error message)."""
    match = _ID_IN_TEXT.search(text)
    return None if match is None else (match.group(1) or match.group(2))


def convert_records(path: str | os.PathLike, records: Iterable[tuple[int | str, Any]],
                    convert: Callable[[Any, int | str], Sample], *, tally: Tally,
                    strict: bool = False) -> Iterator[Sample]:
    """Turn raw records into samples with ``convert(record, where)``; count, skip or raise bad ones."""
    for where, record in records:
        tally.read += 1
        error = None
        try:
            if isinstance(record, RecordError):
                raise record
            sample = convert(record, where)
        except Skip as skip:
            tally.skip(skip.reason, f"{path}:{where}")
            continue
        except RecordError as record_error:
            error = record_error
        except (ValueError, TypeError) as problem:  # SchemaError is a ValueError
            error = RecordError(path, where, str(problem), sample_id=raw_id(record))
        if error is not None:
            if strict:
                raise error
            tally.skip_error(error)
            continue
        yield sample


def require(record: Any, *keys: str) -> list[Any]:
    """The values of ``keys`` in a JSON object, with a clear message when the record or a key is missing."""
    if not isinstance(record, dict):
        raise ValueError(f"record is not a JSON object (got {type(record).__name__})")
    for key in keys:
        if record.get(key) is None:
            raise ValueError(f"missing field {key!r}")
        if record[key] == "":
            raise ValueError(f"empty field {key!r}")
    return [record[key] for key in keys]


def text_value(value: Any, name: str) -> str:
    """A JSON scalar as text: benchmark files store some answers as numbers (VQA-RAD has ``"answer": 5``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"field {name!r} must be text, got {type(value).__name__}")


def record_id(record: dict, path: str | os.PathLike, where: int | str, *keys: str) -> str:
    """The record's own id (first of ``keys`` present), else ``<file stem>-<index or line>``."""
    for key in keys or ("id",):
        value = record.get(key)
        if value not in (None, ""):
            return text_value(value, key)
    return f"{Path(path).stem}-{str(where).strip('[]')}"


def sample_from_record(record: dict, messages: list, known_keys: set[str], path: str | os.PathLike,
                       where: int | str) -> Sample:
    """A sample from a conversation record: its ``meta`` (if any) plus every key outside ``known_keys`` in
    ``meta.extra``, so conversions lose nothing."""
    meta = Metadata.from_dict(record["meta"]) if "meta" in record else Metadata()
    for key, value in record.items():
        if key not in known_keys:
            meta.extra.setdefault(key, value)
    return Sample(id=record_id(record, path, where), messages=messages, meta=meta)


def split_from_name(path: str | os.PathLike) -> str | None:
    """``trainset.json`` -> train, ``validate_en.json`` -> validation, ``test_slice.json`` -> test.

    Matched on words of the file name, so ``llava_med_eval_qa50.jsonl`` is not taken for a validation split.
    """
    for word in re.findall(r"[a-z]+", Path(path).name.lower()):
        if word.startswith("train"):
            return "train"
        if word.startswith("test"):
            return "test"
        if word in ("val", "valid", "validate", "validation", "dev"):
            return "validation"
    return None


def existing_subfolder(path: str | os.PathLike, *names: str) -> Path:
    """The first of ``names`` that exists beside the data file, else the data file's folder."""
    folder = Path(path).parent
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    return folder


# ------------------------------------------------------------------------------------- placeholders

def image_refs(value: Any) -> list[ImageRef]:
    """LLaVA's ``image`` field: absent, one path, a list of paths, or medtune's ``{path, frame|axis|slice}``."""
    if value is None or value == "" or value == []:
        return []
    values = value if isinstance(value, list) else [value]
    return [ImageRef.from_dict(item) for item in values]


def image_json(ref: ImageRef) -> str | dict:
    """The inverse of :func:`image_refs` for one image: a plain path unless a frame or slice is named."""
    data = ref.to_dict()
    return ref.path if list(data) == ["path"] else data


def placeholder_count(text: Any) -> int:
    if not isinstance(text, str):
        raise ValueError(f"turn text must be a string, got {type(text).__name__}")
    return text.count(IMAGE_PLACEHOLDER)


def messages_from_turns(turns: list[tuple[str, Any]], images: list[ImageRef], stats: TurnStats, *,
                        parts_of: Callable[[Any, Iterator[ImageRef]], list[Part]] = None,
                        slots_of: Callable[[Any], int] = placeholder_count) -> list[Message]:
    """Build canonical messages from ``(speaker, content)`` turns whose content holds image slots.

    By default content is text with ``<image>`` placeholders; ``parts_of`` / ``slots_of`` let a format with
    structured content (OpenAI parts) reuse the same rules: leading assistant turns dropped and counted,
    slots matched to ``images`` in order, images without any slot put in front of the first user turn.
    """
    parts_of = parts_of or parts_from_text
    roles = []
    for speaker, content in turns:
        role = ROLE_ALIASES.get(str(speaker).strip().lower())
        if role is None:
            raise ValueError(f"unknown speaker {speaker!r} (expected human, gpt, user, assistant or system)")
        roles.append((role, content))
    roles = _drop_leading_assistant(roles, stats)
    slots = sum(slots_of(content) for _, content in roles)
    prepend: list[ImageRef] = []
    if slots == 0 and images:
        prepend, images = list(images), []
    elif slots != len(images):
        raise ValueError(f"<image> placeholders do not match images: {slots} placeholder(s) in the "
                         f"text, {len(images)} image(s) listed")
    queue = iter(images)
    messages = []
    for role, content in roles:
        parts = parts_of(content, queue)
        if prepend and role == "user":
            parts = [Part.of_image(ref) for ref in prepend] + parts
            prepend = []
        messages.append(Message(role, tuple(parts)))
    if prepend:
        raise ValueError("record lists images but has no user turn to attach them to")
    return messages


def _drop_leading_assistant(turns: list[tuple[str, Any]], stats: TurnStats) -> list[tuple[str, Any]]:
    """Drop assistant turns before the first user turn (kept as is when there is no user turn at all)."""
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if first_user is None:
        return turns
    kept = [turn for i, turn in enumerate(turns) if i >= first_user or turn[0] != "assistant"]
    stats.leading_assistant_dropped += len(turns) - len(kept)
    return kept


def parts_from_text(text: str, images: Iterator[ImageRef]) -> list[Part]:
    """Split ``text`` at ``<image>``; one newline next to a placeholder belongs to it (LLaVA writes
    ``"<image>\\nQuestion"``), so writing with :func:`text_from_parts` and reading back is lossless."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append(Part.of_image(next(images)))
            piece = piece[1:] if piece.startswith("\n") else piece
        if i < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece:
            parts.append(Part.of_text(piece))
    return parts or [Part.of_text("")]


def text_from_parts(message: Message, images: list[ImageRef]) -> str:
    """A message as text with ``<image>`` placeholders (image refs appended to ``images`` in order)."""
    pieces = []
    for part in message.content:
        if part.type == "image":
            images.append(part.image)
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            if IMAGE_PLACEHOLDER in part.text:
                raise ValueError("text contains a literal <image>, which would be read back as an image")
            pieces.append(part.text)
    return "\n".join(pieces)


# --------------------------------------------------------------------------------------------- writing

def write_json_records(path: str | os.PathLike, records: Iterable[dict], *, tally: Tally) -> None:
    """Stream records atomically: a JSON array for ``.json`` files, JSON Lines for anything else."""
    as_array = Path(path).suffix.lower() == ".json"
    with atomic_open(path) as handle:
        if as_array:
            handle.write("[")
        for count, record in enumerate(records):
            line = json.dumps(record, ensure_ascii=False)
            if as_array:
                handle.write(("\n" if count == 0 else ",\n") + line)
            else:
                handle.write(line + "\n")
            tally.written += 1
        if as_array:
            handle.write("\n]\n")


def converted_for_writing(path: str | os.PathLike, samples: Iterable[Sample], convert: Callable[[Sample], dict],
                          *, tally: Tally) -> Iterator[dict]:
    """Map samples to external records; one that the format cannot express is skipped and counted."""
    for sample in samples:
        try:
            yield convert(sample)
        except ValueError as problem:
            tally.skip_error(RecordError(path, f"sample {sample.id}", str(problem)))
