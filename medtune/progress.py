"""What a person sees during a long phase (encoding, training, answering questions, comparing datasets).

:func:`progress_bar` is the display of one phase: on a terminal a tqdm bar with its total, rate and ETA;
anywhere else (a log file, a pipe, CI) :class:`LineProgress`, plain lines with the same figures and no carriage
returns or escape codes, the final one printed once when the phase ends. :func:`track` wraps an iterable in one.

It lives outside ``medtune.train`` and imports only tqdm, so the data verbs, which must run without the
deep-learning extras, show the same display as training and evaluation.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LineProgress:
    """A progress display for a log file: plain lines, each complete and ended by a newline.

    A line each time another tenth of ``total`` is done (at most one every ``min_interval`` seconds), or every
    ``heartbeat`` seconds when the total is unknown or progress is slow; the final line once, at :meth:`close`.
    ``update``, ``set_postfix``, ``close`` and ``n`` behave as tqdm's, so callers need not know which they have.
    """

    def __init__(self, total: int | None, *, desc: str, unit: str, initial: int = 0, file: TextIO | None = None,
                 min_interval: float = 1.0, heartbeat: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.file = file if file is not None else sys.stderr
        self.min_interval, self.heartbeat, self.clock = min_interval, heartbeat, clock
        self.started = self.last_line = clock()
        self.postfix: dict = {}
        self.closed = False
        self._next_tenth = self._tenth_after(initial)

    def _tenth_after(self, n: int) -> int | None:
        if not self.total:
            return None
        return (n * 10 // self.total + 1) * self.total / 10

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        crossed = self._next_tenth is not None and self.n >= self._next_tenth
        if crossed:
            self._next_tenth = self._tenth_after(self.n)
        due = crossed or now - self.last_line >= self.heartbeat
        finished = self.total is not None and self.n >= self.total   # the final line comes from close()
        if due and not finished and now - self.last_line >= self.min_interval:
            self._write(self._progress_line(now))
            self.last_line = now

    def set_postfix(self, values: dict | None = None, refresh: bool = False, **more) -> None:
        self.postfix = {**(values or {}), **more}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(self._final_line(self.clock()))

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rate(self, now: float) -> float:
        elapsed = now - self.started
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def _count(self) -> str:
        return f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"

    def _extras(self) -> str:
        return "".join(f", {key}={value}" for key, value in self.postfix.items())

    def _progress_line(self, now: float) -> str:
        rate = self._rate(now)
        line = f"{self.desc}: {self._count()}"
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else None
            line += f" ({100 * self.n / self.total:.0f}%), {_duration(now - self.started)} elapsed, ETA "
            line += _duration(left) if left is not None else "?"
        else:
            line += f", {_duration(now - self.started)} elapsed"
        return f"{line}, {rate:,.2f} {self.unit}/s{self._extras()}"

    def _final_line(self, now: float) -> str:
        return (f"{self.desc}: {self._count()} in {_duration(now - self.started)} "
                f"({self._rate(now):,.2f} {self.unit}/s){self._extras()}")

    def _write(self, line: str) -> None:
        print(line, file=self.file, flush=True)


class _Disabled:
    """The display of a process that shows none (not the main process, or progress turned off)."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int | None, *, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 file: TextIO | None = None):
    """The display of one phase: a tqdm bar on a terminal, :class:`LineProgress` lines anywhere else."""
    file = file if file is not None else sys.stderr
    if not enabled:
        display = _Disabled()
        display.n = initial
        return display
    if getattr(file, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}", file=file, dynamic_ncols=True)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, file=file)


def note(message: str, file: TextIO | None = None) -> None:
    """A line of its own (a warning about one item) that leaves a bar on the same terminal intact."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=file if file is not None else sys.stderr)


def track(items: Iterable[T], *, total: int | None, desc: str, unit: str, enabled: bool = True,
          file: TextIO | None = None) -> Iterator[T]:
    """``items`` one by one, with the phase's display advancing and closed at the end."""
    with progress_bar(total, desc=desc, unit=unit, enabled=enabled, file=file) as display:
        for item in items:
            yield item
            display.update(1)
