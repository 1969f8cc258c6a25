"""medtune's progress display: plain, complete lines in a log file (a line per tenth, a heartbeat without a
total, the final line once) and a tqdm bar on a terminal."""
from __future__ import annotations

import io

from medtune.progress import LineProgress, progress_bar


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_line_progress_writes_a_line_per_tenth_with_eta_and_the_final_line_once():
    out, clock = io.StringIO(), Clock()
    display = LineProgress(200, desc="encoding", unit="samples", file=out, clock=clock)
    for _ in range(200):
        clock.now += 0.5
        display.update(1)
    display.set_postfix({"loss": "1.2345"})
    display.close()
    display.close()   # closing twice (an exception path and the normal one) still ends with one line
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b[" not in out.getvalue()
    assert lines[0] == "encoding: 20/200 samples (10%), 0:10 elapsed, ETA 1:30, 2.00 samples/s"
    assert len(lines) == 10   # 10% ... 90%, then the final line; no second 100% line
    assert lines[-1] == "encoding: 200/200 samples in 1:40 (2.00 samples/s), loss=1.2345"


def test_line_progress_without_a_total_beats_every_minute_and_resumed_counts_are_not_a_rate():
    out, clock = io.StringIO(), Clock()
    display = LineProgress(None, desc="encoding", unit="samples", initial=0, file=out, clock=clock)
    for _ in range(150):
        clock.now += 1.0
        display.update(1)
    display.close()
    assert out.getvalue().splitlines() == ["encoding: 60 samples, 1:00 elapsed, 1.00 samples/s",
                                           "encoding: 120 samples, 2:00 elapsed, 1.00 samples/s",
                                           "encoding: 150 samples in 2:30 (1.00 samples/s)"]
    out, clock = io.StringIO(), Clock()
    resumed = LineProgress(100, desc="training", unit="steps", initial=50, file=out, clock=clock)
    clock.now += 10.0
    resumed.update(10)
    assert out.getvalue() == "training: 60/100 steps (60%), 0:10 elapsed, ETA 0:40, 1.00 steps/s\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_with_its_total_and_a_file_gets_lines():
    terminal = Terminal()
    with progress_bar(16, desc="encoding", unit="samples", file=terminal) as bar:
        bar.update(16)
    assert "encoding: 100%" in terminal.getvalue() and "16/16" in terminal.getvalue()
    log = io.StringIO()
    assert isinstance(progress_bar(16, desc="encoding", unit="samples", file=log), LineProgress)
    silent = progress_bar(16, desc="encoding", unit="samples", file=log, enabled=False)
    silent.update(3)
    silent.close()
    assert log.getvalue() == ""
