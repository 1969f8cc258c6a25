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


def write(path: str | os.PathLike, samples: Iterable[Sample], *, tally: Tally) -> None:
    with SampleWriter(path, tally) as writer:
        for sample in samples:
            writer.write(sample)


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
