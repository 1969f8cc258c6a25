"""What a person sees while a stage trains: one progress display per phase and a metrics file.

* :func:`progress_bar`: the display of one phase (encoding, training). On a terminal it is a tqdm bar with its
  total, rate and ETA; anywhere else (a log file, a pipe, CI) it is :class:`LineProgress`, plain lines with the
  same figures and no carriage returns or escape codes, the final one printed once when the phase ends.
* :func:`quiet_libraries`: transformers, the hub and datasets draw bars of their own ("Loading weights",
  "Writing model shards" at every checkpoint); drawn while medtune's bar is open they interleave with it and
  leave duplicated 100% lines. medtune turns them off and reports what those steps did itself.
* :class:`ProgressBarCallback`: the training display (main process only) showing loss, learning rate and
  tokens per second (non-padding tokens, all ranks).
* :class:`MetricsFileCallback`: every Trainer log (loss, learning rate, grad norm, eval) becomes one JSON line
  in the stage's ``metrics.jsonl`` with the step, epoch, tokens seen, tokens per second and the current learning
  rate of every trained part (``lr_projector``, ``lr_llm`` ...). After a resume,
  lines past the checkpoint's step (written by the interrupted run) are dropped first, so the file reads as
  one run.

TensorBoard (and W&B / MLflow when asked for) come from Trainer's own integrations (``report_to``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from transformers import TrainerCallback

T = TypeVar("T")


def quiet_libraries() -> None:
    """Turn off the progress bars of transformers (and through it the hub's) and of datasets, for this
    process: each phase shows one display, medtune's."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        from datasets.utils import logging as datasets_logging
    except ImportError:  # pragma: no cover - datasets comes with the models extra
        return
    datasets_logging.disable_progress_bar()


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


def track(items: Iterable[T], *, total: int | None, desc: str, unit: str, enabled: bool = True,
          file: TextIO | None = None) -> Iterator[T]:
    """``items`` one by one, with the phase's display advancing and closed at the end."""
    with progress_bar(total, desc=desc, unit=unit, enabled=enabled, file=file) as display:
        for item in items:
            yield item
            display.update(1)


class _TokenRate:
    """Tokens per second since this process started training (resumed tokens excluded)."""

    def __init__(self):
        self.start_time = self.start_tokens = None

    def begin(self, state) -> None:
        self.start_time, self.start_tokens = time.monotonic(), state.num_input_tokens_seen or 0

    def rate(self, state) -> float:
        elapsed = time.monotonic() - (self.start_time or time.monotonic())
        done = (state.num_input_tokens_seen or 0) - (self.start_tokens or 0)
        return done / elapsed if elapsed > 0 else 0.0


class ProgressBarCallback(TrainerCallback):
    def __init__(self):
        self.bar = None
        self.tokens = _TokenRate()
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens.begin(state)
        if state.is_world_process_zero:
            self.bar = progress_bar(state.max_steps, initial=state.global_step, desc="training", unit="steps")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.shown["tok/s"] = f"{self.tokens.rate(state):,.0f}"
            self.bar.set_postfix(self.shown, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            if "loss" in logs:
                self.shown["loss"] = f"{logs['loss']:.4f}"
            if "learning_rate" in logs:
                self.shown["lr"] = f"{logs['learning_rate']:.2e}"

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.set_postfix(self.shown, refresh=False)   # the last step's loss, logged after its step ended
            self.bar.close()
            self.bar = None


class MetricsFileCallback(TrainerCallback):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tokens = _TokenRate()
        self.part_rates: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens.begin(state)
        if state.is_world_process_zero and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # the rates this step uses (the scheduler moves them after the step); Trainer logs only the first group's
        self.part_rates = {f"lr_{g['part']}": g["lr"] for g in getattr(optimizer, "param_groups", []) if "part" in g}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs,
                  "tokens_seen": state.num_input_tokens_seen, "tokens_per_second": round(self.tokens.rate(state), 1)}
        if "loss" in logs:
            record.update(self.part_rates)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
