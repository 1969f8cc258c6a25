"""What a person sees while a stage trains: one progress display per phase and a metrics file.

* :func:`~medtune.progress.progress_bar` (in :mod:`medtune.progress`, shared with the other stages): the display
  of one phase (encoding, training). On a terminal it is a tqdm bar with its total, rate and ETA; anywhere else
  (a log file, a pipe, CI) plain lines with the same figures and no carriage returns or escape codes.
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
import time
from pathlib import Path

from transformers import TrainerCallback

from medtune.progress import progress_bar


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
