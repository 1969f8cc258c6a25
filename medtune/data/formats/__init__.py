"""Every external data format medtune reads or writes, by name.

Each format is a module with ``read(path, *, tally, strict, **options) -> Iterator[Sample]``, an optional
``write(path, samples, *, tally)`` and ``image_root(path)``; this registry is the only place that knows which
modules exist. Everything else goes through :func:`read_records`, :func:`write_records` and
:func:`default_image_root`. Readers stream (memory does not grow with the file), count each record in the
tally, and skip-and-count bad records with a reason naming file and record (raised instead when ``strict``).
The formats and their field mappings are documented in docs/data-format.md. A GMAI-VL dataset list is not a
sample format but a list of datasets (:mod:`medtune.data.formats.gmai_vl`, read by ``medtune.data.mixture``).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Iterator

from medtune.data.formats import (
    canonical, llava, llava_med_vqa, medmax, messages, pathvqa, pmc_vqa, slake, vqa_rad,
)
from medtune.data.jsonl import Tally
from medtune.data.schema import Sample


@dataclass(frozen=True)
class Format:
    """One external format: what it is, how to read it, how to write it (None: read only)."""

    name: str
    description: str
    read: Callable[..., Iterator[Sample]]
    write: Callable[..., None] | None
    image_root: Callable[[Path], Path]

    @property
    def writable(self) -> bool:
        return self.write is not None

    @property
    def options(self) -> tuple[str, ...]:
        """Reader options beyond path/tally/strict (e.g. ``include_credentialed``, ``split``)."""
        names = inspect.signature(self.read).parameters
        return tuple(n for n in names if n not in ("path", "tally", "strict"))


def _format(name: str, module: ModuleType, description: str) -> Format:
    return Format(name, description, module.read, getattr(module, "write", None), module.image_root)


FORMATS: dict[str, Format] = {f.name: f for f in (
    _format("canonical", canonical, "medtune sample JSON Lines"),
    _format("llava", llava, "LLaVA / LLaVA-Med / PathChat conversation JSON"),
    _format("messages", messages, "OpenAI / ShareGPT messages JSON Lines with image parts"),
    _format("medmax", medmax, "MedMax JSON Lines (text with <image>, image_path, credential)"),
    _format("vqa-rad", vqa_rad, "VQA-RAD: MEVF trainset/testset.json or the official public JSON"),
    _format("slake", slake, "SLAKE: official train/validate/test JSON"),
    _format("pathvqa", pathvqa, "PathVQA image/question/answer records"),
    _format("pmc-vqa", pmc_vqa, "PMC-VQA style multiple choice (CSV or JSON)"),
    _format("llava-med-vqa", llava_med_vqa, "LLaVA-Med / Med-MoE VQA test JSON (conversations + answer_type)"),
)}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def read_records(fmt: str, path: str | os.PathLike, *, tally: Tally, strict: bool = False,
                 **options) -> Iterator[Sample]:
    """Stream canonical samples from ``path`` in format ``fmt``; bad records are counted in ``tally``."""
    reader = get_format(fmt)
    unknown = set(options) - set(reader.options)
    if unknown:
        raise ValueError(f"format {fmt!r} takes no option {sorted(unknown)[0]!r} "
                         f"(its options: {', '.join(reader.options) or 'none'})")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return reader.read(path, tally=tally, strict=strict, **options)


def write_records(fmt: str, path: str | os.PathLike, samples: Iterable[Sample], *, tally: Tally) -> None:
    """Write samples to ``path`` in format ``fmt``, atomically; samples it cannot express are counted."""
    writer = get_format(fmt)
    if not writer.writable:
        writable = [name for name, f in FORMATS.items() if f.writable]
        raise ValueError(f"format {fmt!r} is read only (writable: {', '.join(writable)})")
    writer.write(path, samples, tally=tally)


def default_image_root(fmt: str, path: str | os.PathLike) -> Path:
    """Where a file's relative image paths start when the user names no ``--image-root``."""
    return get_format(fmt).image_root(Path(path))


__all__ = ["FORMATS", "Format", "default_image_root", "get_format", "read_records", "write_records"]
