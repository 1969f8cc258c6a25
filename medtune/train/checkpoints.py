"""Checkpoints that are never half-written when taken as the latest, and rotation among complete ones.

Trainer writes ``checkpoint-N/`` file by file (weights, optimizer, scheduler, RNG, trainer state), so a kill
during a save leaves a directory that looks like a checkpoint but is not one; Trainer's own
``get_last_checkpoint`` would pick it. medtune adds a completion marker written last, atomically, listing
every file with its size; only a directory whose marker matches its files counts as a checkpoint. Resume
takes the newest complete one, deletes incomplete ones (they would otherwise be overwritten piecemeal), and
rotation keeps the last K complete checkpoints (never counting incomplete ones, never deleting the newest).

Directories that are not a checkpoint but a finished model (a stage's ``model/``) are written into a
temporary sibling and renamed into place (:func:`atomic_directory`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from medtune.data.jsonl import write_json

log = logging.getLogger(__name__)

COMPLETE_MARKER = "medtune-complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def mark_complete(checkpoint: str | os.PathLike) -> None:
    """Flush every file of ``checkpoint`` to disk, then write the marker listing them (last, atomically)."""
    checkpoint = Path(checkpoint)
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(path.relative_to(checkpoint))] = path.stat().st_size
    write_json(checkpoint / COMPLETE_MARKER, {"step": checkpoint_step(checkpoint), "files": files})


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """True when the marker exists and every file it lists is present with the recorded size."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, size in listed.items():
        path = Path(checkpoint) / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories under ``output_dir``, oldest step first (complete or not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def discard_incomplete(output_dir: str | os.PathLike) -> list[Path]:
    """Delete checkpoint directories without a valid marker (left by a crash); returns what was removed."""
    removed = []
    for path in list_checkpoints(output_dir):
        if not is_complete(path):
            log.warning("removing incomplete checkpoint %s (a save was interrupted)", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def rotate(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns what was removed."""
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
