"""Streaming JSON Lines I/O for canonical samples, with bad-record accounting and atomic writes.

* Reading yields one sample at a time, so memory does not grow with the file. A line that is not JSON (or not
  UTF-8) or not a valid sample becomes a :class:`RecordError` naming the file, the line, the record's id when it
  has one and the reason: counted and skipped by default, raised when ``strict``. Lines are decoded one by one,
  so one bad line costs that line only.
* Writing goes to a temporary file beside the target and is renamed into place only when the writer closes
  without an exception, so a crash never leaves a half-written file where a later step would pick it up.
* :class:`Tally` is the "N read, N written, N skipped (reasons)" line every command ends with. Every record
  is in it: an input whose end cannot be read at all (a JSON list cut short) counts that end as one record
  skipped as :data:`UNREADABLE_TAIL`, and ``Tally.incomplete`` says so.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from medtune.data.files import readable_text_file
from medtune.data.schema import Sample

# The skip reason of the part of a file that cannot be read record by record (it is counted as one record).
UNREADABLE_TAIL = "unreadable rest of file"
# Where readers look for a raw record's own id, to name it in error messages.
ID_KEYS = ("id", "qid", "question_id", "index")


class RecordError(ValueError):
    """A bad input record: which file, which record (line or index), its id when known, and why.

    ``tail`` marks the error that ends a file's readable part: what follows it cannot be counted record by record.
    """

    def __init__(self, file: str | os.PathLike, record: int | str | None, reason: str, *,
                 sample_id: str | None = None, tail: bool = False):
        self.file, self.record, self.reason, self.sample_id, self.tail = str(file), record, reason, sample_id, tail
        where = f"{self.file}:{record}" if record is not None else self.file
        if sample_id is not None:
            where += f" (id {sample_id})"
        super().__init__(f"{where}: {reason}")


def raw_id(record: Any) -> str | None:
    """The id a raw record carries under one of :data:`ID_KEYS`, as text; None when it has none."""
    if not isinstance(record, dict):
        return None
    for key in ID_KEYS:
        value = record.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
            return str(value)
    return None


@dataclass
class Tally:
    """Counts of what a command read, wrote and skipped, with each skip's reason kept for the summary."""

    read: int = 0
    written: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bad_records: int = 0   # skips caused by bad input (RecordError), as opposed to deliberate exclusions

    def skip(self, reason: str, example: str | None = None) -> None:
        """Count one skipped record under a short ``reason``; ``example`` (e.g. file:line) is kept once."""
        self.skipped[reason] += 1
        if example is not None:
            self.examples.setdefault(reason, example)

    def skip_error(self, error: RecordError, reason: str | None = None) -> None:
        self.bad_records += 1
        if getattr(error, "tail", False):
            reason = UNREADABLE_TAIL
        self.skip(reason or _short_reason(error.reason), str(error))

    @property
    def incomplete(self) -> bool:
        """True when the end of an input could not be read record by record (its records are not counted)."""
        return self.skipped[UNREADABLE_TAIL] > 0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        line = f"{self.read} read, {self.written} written, {self.n_skipped} skipped"
        if self.skipped:
            line += " (" + ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common()) + ")"
        return line

    def details(self) -> list[str]:
        """One line per skip reason with its first example, for a report or ``--verbose`` output."""
        return [f"{reason}: {n} (first: {self.examples.get(reason, '-')})" for reason, n in self.skipped.most_common()]

    def to_dict(self) -> dict:
        return {"read": self.read, "written": self.written, "skipped": dict(self.skipped), "notes": self.notes}


def _short_reason(reason: str) -> str:
    """Group messages by their stable head ("unknown role 'x' ..." -> "unknown role") for counting."""
    head = reason.split(":")[0].split("(")[0]
    words = [w for w in head.split() if not any(c in w for c in "'\"0123456789/")]
    return " ".join(words[:6]) or reason[:60]


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any | RecordError]]:
    """Yield ``(line_number, parsed_object)``; a line that does not parse yields a RecordError instead.

    The file is read as bytes and each line decoded on its own, so a line that is not UTF-8 is one bad record
    rather than the end of the file. A byte-order mark before the first line is ignored.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield number, RecordError(path, number, f"not UTF-8 text (byte {error.start + 1} of the line)")
            except json.JSONDecodeError as error:
                yield number, RecordError(path, number, f"not valid JSON ({error.msg} at column {error.colno})")


def iter_parsed(path: str | os.PathLike, parse, *, strict: bool = False, tally: Tally | None = None,
                name_ids: bool = False) -> Iterator:
    """Stream ``parse(obj)`` for each JSON line; a line that is not JSON or whose ``parse`` raises ValueError is
    counted in ``tally`` as a RecordError naming file and line (raised instead when ``strict``), and with
    ``name_ids`` the record's own id (:func:`raw_id`) too."""
    tally = tally if tally is not None else Tally()
    for number, obj in iter_json_lines(path):
        tally.read += 1
        if isinstance(obj, RecordError):
            error = obj
        else:
            try:
                yield parse(obj)
                continue
            except ValueError as bad:
                error = RecordError(path, number, str(bad), sample_id=raw_id(obj) if name_ids else None)
        if strict:
            raise error
        tally.skip_error(error)


def read_samples(path: str | os.PathLike, *, strict: bool = False, tally: Tally | None = None) -> Iterator[Sample]:
    """Stream canonical samples from a ``.jsonl`` file; bad lines are counted in ``tally`` (or raised)."""
    readable_text_file(path)
    return iter_parsed(path, Sample.from_dict, strict=strict, tally=tally, name_ids=True)


def _default_file_mode() -> int:
    """What a plain open() would give a new file (0666 less the umask); mkstemp alone gives 0600.

    Read once at import: os.umask can only be read by setting it, which is process-wide and not thread-safe.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()
_HOST = socket.gethostname().replace(".", "-") or "host"


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the partial files of ``path`` whose writer, a process of this host, has ended; returns them."""
    removed = []
    prefix = f".{path.name}.{_HOST}."
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = partial.name[len(prefix):].split(".", 1)[0] if partial.name.startswith(prefix) else ""
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
                removed.append(partial)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's process: alive
    return True


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file is ``.<name>.<host>.<pid>.<random>.partial``. A process killed outright (kill -9, power
    loss) cannot remove its own, so each call first removes those of ``path`` left by processes of this host
    that are no longer running; a partial file is never renamed into place or read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".partial", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class SampleWriter:
    """Write samples to JSON Lines atomically: ``with SampleWriter(out) as w: w.write(sample)``."""

    def __init__(self, path: str | os.PathLike, tally: Tally | None = None):
        self.path = Path(path)
        self.tally = tally if tally is not None else Tally()
        self._context = None
        self._handle = None

    def __enter__(self) -> "SampleWriter":
        self._context = atomic_open(self.path)
        self._handle = self._context.__enter__()
        return self

    def write(self, sample: Sample | dict) -> None:
        record = sample.to_dict() if isinstance(sample, Sample) else sample
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.tally.written += 1

    def __exit__(self, *exc) -> bool:
        return self._context.__exit__(*exc)


def write_samples(path: str | os.PathLike, samples: Iterable[Sample | dict], tally: Tally | None = None) -> Tally:
    with SampleWriter(path, tally) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.tally


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically (reports, results, manifests)."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
