"""``medtune data check FILE``: find every problem in a dataset before a training run trips over it.

The check reads the file in any known format, converts what it can to canonical samples and reports, one line
per problem with its location:

* records that do not parse or do not validate (bad JSON, unknown answer_type, placeholder count that does not
  match the images, ...) as the format reader reports them;
* structural problems in parsed samples: empty turns, no user turn, an assistant speaking first, two
  consecutive turns of one role, a system message after the start, literal ``<image>`` placeholders left in
  the text, duplicate ids;
* every image that is missing, outside the image root, not an image, truncated, over the pixel limit or an
  undecodable DICOM/NIfTI, with :class:`~medtune.data.images.ImageError`'s reason. Each distinct image
  reference is loaded once, however many samples share it. ``check_images=False`` (``--no-images``) skips
  them, for annotations that come without their images (SLAKE's JSON alone, say).

Every problem is kept (``--report`` writes them all), but one missing folder makes an error per record, so the
command prints only the first few of each kind (:func:`first_of_each_kind`) and a line with each kind's count.

The format is detected from the file's content unless ``--format`` names it; when nothing in the file could be
read in the format used, a note says which format it looks like. An image root that does not exist is one
error before any record is read, not a "file not found" per image. DICOM that may show burned-in patient text
is an error unless ``--allow-burned-in``, and then the summary and the report say how many were accepted.
Record errors name the record's id when it has one.

Locations are ``file:line`` for canonical JSON Lines (read here line by line); other formats are read through
their reader, which names ``file:line`` / ``file:[index]`` for records it rejects; for problems in samples it
accepted the check names ``file:[index]`` in JSON arrays and ``file: record N`` (the Nth record) otherwise.
Warnings (an unanswered question, placeholders that merely duplicate image parts) do not fail the check unless
``--strict``. Exit code 1 when errors exist. Messages never contain DICOM element values: image errors come
from the images module, which reads only pixels and whitelisted tags.
"""
from __future__ import annotations

import collections
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from medtune.data.files import readable_text_file
from medtune.data.images import (DEFAULT_MAX_PIXELS, BurnedInError, ImageError, load_image,
                                 require_image_root)
from medtune.data.jsonl import RecordError, Tally, iter_json_lines, raw_id
from medtune.data.schema import ImageRef, Sample, SchemaError

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Problem:
    where: str          # "file:line" or "file: record N"
    kind: str           # short category used for counting ("unreadable image", "duplicate id", ...)
    message: str
    sample_id: str | None = None
    severity: str = "error"  # or "warning"

    def line(self) -> str:
        sample = f" [id {self.sample_id}]" if self.sample_id else ""
        return f"{self.where}: {self.severity}: {self.message}{sample}"


class _RecordingTally(Tally):
    """A Tally that also keeps every record error a format reader reports (a Tally keeps only the first)."""

    def __init__(self):
        super().__init__()
        self.errors: list[RecordError] = []

    def skip_error(self, error: RecordError, reason: str | None = None) -> None:
        self.errors.append(error)
        super().skip_error(error, reason)


# --------------------------------------------------------------------------------------------- reading

def located_samples(fmt: str, path: Path, tally: Tally) -> Iterator[tuple[str, Sample | RecordError]]:
    """Yield ``(location, sample or the error that stopped a record)`` for every record of ``path``."""
    if fmt == "canonical":
        yield from _canonical_located(path, tally)
        return
    from medtune.data.formats import read_records

    recording = _RecordingTally()
    is_array = _starts_with_bracket(path)
    for sample in read_records(fmt, path, tally=recording, strict=False, require_complete=False,
                               require_usable=False):
        yield from _drain(recording)
        # JSON arrays: the reader's own "[index]" notation; other files: the count (blank lines are not counted).
        yield (f"{path}:[{recording.read - 1}]" if is_array else f"{path}: record {recording.read}"), sample
    yield from _drain(recording)
    tally.read += recording.read
    tally.skipped.update(recording.skipped)
    tally.notes.extend(recording.notes)


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        return handle.read(4096).lstrip("\ufeff \t\r\n")[:1] == "["


def _drain(recording: _RecordingTally) -> Iterator[tuple[str, RecordError]]:
    while recording.errors:
        error = recording.errors.pop(0)
        yield (f"{error.file}:{error.record}" if error.record is not None else error.file), error


def _canonical_located(path: Path, tally: Tally) -> Iterator[tuple[str, Sample | RecordError]]:
    readable_text_file(path)
    for number, obj in iter_json_lines(path):
        tally.read += 1
        if not isinstance(obj, RecordError):
            try:
                obj = Sample.from_dict(obj)
            except SchemaError as error:
                obj = RecordError(path, number, str(error), sample_id=raw_id(obj))
        if isinstance(obj, RecordError):
            tally.skip_error(obj)
        yield f"{path}:{number}", obj


def _record_error_kind(reason: str) -> str:
    if reason.startswith("not valid JSON"):
        return "unparsable record"
    if "answer_type" in reason:
        return "unknown answer_type"
    if IMAGE_PLACEHOLDER in reason or "placeholder" in reason:
        return "placeholder mismatch"
    return "invalid record"


# ---------------------------------------------------------------------------------------- sample checks

def turn_problems(sample: Sample) -> Iterator[tuple[str, str, str]]:
    """(kind, message, severity) for empty, missing and misordered turns."""
    roles = [message.role for message in sample.messages]
    for index, message in enumerate(sample.messages):
        if not message.images and not message.text.strip():
            yield "empty turn", f"empty {message.role} turn (message {index + 1})", "error"
        if message.role == "system" and index > 0:
            where = f"position {index + 1}"
            yield "misordered turns", f"system message at {where} (only the first may be system)", "error"
    conversation = [(i, role) for i, role in enumerate(roles) if role != "system"]
    if "user" not in roles:
        yield "misordered turns", "no user turn", "error"
    elif conversation and conversation[0][1] == "assistant":
        yield "misordered turns", "assistant turn before any user turn", "error"
    for (i, first), (j, second) in zip(conversation, conversation[1:]):
        if first == second:
            yield "misordered turns", f"two consecutive {first} turns (messages {i + 1} and {j + 1})", "error"
    if "user" in roles and "assistant" not in roles:
        yield "no answer", "no assistant turn (a question without an answer)", "warning"


def placeholder_problems(sample: Sample) -> Iterator[tuple[str, str, str]]:
    """Literal ``<image>`` left in text: canonical samples carry images as parts, so it would be an extra image."""
    placeholders = sum(m.text.count(IMAGE_PLACEHOLDER) for m in sample.messages)
    if not placeholders:
        return
    images = len(sample.images)
    if placeholders != images:
        yield ("placeholder mismatch",
               f"{placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) in the text but {images} image part(s)", "error")
    else:
        yield ("placeholder mismatch",
               f"'{IMAGE_PLACEHOLDER}' in the text duplicates the {images} image part(s)", "warning")


class ImageChecker:
    """Loads each distinct image reference once and remembers the outcome (None when it is fine).

    With ``allow_burned_in``, DICOM that may show burned-in text is loaded anyway and counted in
    ``burned_in_accepted``; without it, it is an error like any unusable image.
    """

    def __init__(self, root: Path, allowed_roots: Iterable = (), max_pixels: int = DEFAULT_MAX_PIXELS,
                 allow_burned_in: bool = False):
        self.root, self.allowed_roots, self.max_pixels = root, tuple(allowed_roots), max_pixels
        self.allow_burned_in = allow_burned_in
        self.burned_in_accepted = 0
        self.outcomes: dict[ImageRef, ImageError | None] = {}

    def _load(self, ref: ImageRef, allow_burned_in: bool) -> None:
        load_image(ref, self.root, allowed_roots=self.allowed_roots, max_pixels=self.max_pixels,
                   allow_burned_in=allow_burned_in)

    def check(self, ref: ImageRef) -> ImageError | None:
        if ref not in self.outcomes:
            try:
                try:
                    self._load(ref, allow_burned_in=False)
                except BurnedInError:
                    if not self.allow_burned_in:
                        raise
                    self.burned_in_accepted += 1
                    self._load(ref, allow_burned_in=True)
                self.outcomes[ref] = None
            except ImageError as error:
                self.outcomes[ref] = error
            except ImportError as error:  # DICOM/NIfTI without the [dicom] extra: one clear line, not a traceback
                from medtune.errors import UserError
                raise UserError(f"{ref.path}: {error}") from None
        return self.outcomes[ref]


# The kinds image_problem_kind gives: a problem whose meaning depends on where image paths were looked up.
IMAGE_PROBLEM_KINDS = ("burned-in annotation", "missing image", "image outside root", "unreadable image")


def image_problem_kind(error: ImageError) -> str:
    if isinstance(error, BurnedInError):
        return "burned-in annotation"
    if error.reason == "file not found":
        return "missing image"
    if "outside the image root" in error.reason:
        return "image outside root"
    return "unreadable image"


# ------------------------------------------------------------------------------------------------ check

def check_dataset(path: Path, fmt: str, image_root: Path, *, allowed_roots: Iterable = (),
                  max_pixels: int = DEFAULT_MAX_PIXELS, tally: Tally | None = None,
                  progress: bool = True, allow_burned_in: bool = False,
                  check_images: bool = True) -> tuple[list[Problem], ImageChecker | None]:
    """Every problem in ``path``, in file order, plus the image checker (for counts; None when
    ``check_images`` is off and no image is looked at, so the image root need not exist)."""
    from tqdm import tqdm

    readable_text_file(path)
    images = None
    if check_images:
        require_image_root(image_root)
        for root in allowed_roots:
            require_image_root(root, "allowed root")
        images = ImageChecker(image_root, allowed_roots, max_pixels, allow_burned_in)
    tally = tally if tally is not None else Tally()
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    usable = 0
    records = tqdm(located_samples(fmt, path, tally), desc="checking", unit=" records", disable=not progress,
                   file=sys.stderr)
    for where, item in records:
        if isinstance(item, RecordError):
            problems.append(Problem(where, _record_error_kind(item.reason), item.reason, item.sample_id))
            continue
        usable += 1
        problems.extend(sample_problems(item, where, images, first_seen))
    if tally.read and not usable:
        from medtune.data.formats import guess_format

        guess = guess_format(path)
        if guess not in (None, fmt):
            tally.notes.append(f"none of the records could be read as {fmt}: {path} looks like {guess} "
                               f"(--format {guess})")
    return problems, images


def sample_problems(sample: Sample, where: str, images: ImageChecker | None, first_seen: dict[str, str]
                    ) -> Iterator[Problem]:
    if sample.id in first_seen:
        yield Problem(where, "duplicate id", f"duplicate id {sample.id!r} (first at {first_seen[sample.id]})",
                      sample.id)
    else:
        first_seen[sample.id] = where
    for kind, message, severity in (*turn_problems(sample), *placeholder_problems(sample)):
        yield Problem(where, kind, message, sample.id, severity)
    for ref in dict.fromkeys(sample.images) if images is not None else ():
        error = images.check(ref)
        if error is not None:
            yield Problem(where, image_problem_kind(error), f"image {ref.path!r}: {error.reason}", sample.id)


def first_of_each_kind(problems: list[Problem], limit: int) -> list[Problem]:
    """The first ``limit`` problems of each kind, in file order (all of them when ``limit`` is 0): what a person
    reads on the console, where 1,061 lines of one missing folder would hide the one other problem."""
    if not limit:
        return list(problems)
    seen: collections.Counter = collections.Counter()
    shown = []
    for problem in problems:
        seen[problem.kind] += 1
        if seen[problem.kind] <= limit:
            shown.append(problem)
    return shown


def summarise(problems: list[Problem], images: ImageChecker | None, tally: Tally, *, path: Path, fmt: str,
              image_root: Path) -> dict:
    """The report: counts, the one-line summary, and every problem (``images`` None: images were not checked)."""
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    outcomes = images.outcomes if images is not None else {}
    bad_images = sum(outcome is not None for outcome in outcomes.values())
    by_kind = collections.Counter(p.kind for p in problems)
    checked = (f"{len(outcomes)} distinct images ({bad_images} unusable)" if images is not None
               else "no image (annotations only)")
    summary = f"checked {tally.read} records and {checked}: {errors} errors, {warnings} warnings"
    return {"file": os.fspath(path), "format": fmt, "image_root": os.fspath(image_root), "records": tally.read,
            "images_checked": len(outcomes), "images_unusable": bad_images, "annotations_only": images is None,
            "errors": errors, "warnings": warnings, "by_kind": dict(by_kind.most_common()), "summary": summary,
            "allow_burned_in": bool(images and images.allow_burned_in),
            "burned_in_accepted": images.burned_in_accepted if images is not None else 0,
            "tally": tally.to_dict(), "problems": [asdict(p) for p in problems]}
