"""Which format a data file is in, told from its content: what every verb and recipe uses when it names none.

* The first records that parse (up to :data:`SAMPLED_RECORDS`) are matched against every format's ``sniff``,
  which knows the keys that format's reader needs (vqa-rad: ``qid`` + ``image_name``; slake: ``qid`` +
  ``img_name``; medmax: ``text`` + MedMax's image fields; llava: ``conversations`` of ``{from, value}``; ...).
  CSV and TSV files are matched on their header row, Parquet files on their schema's column names
  (:func:`detect_from_columns`; reading rows would write their embedded images out), against the formats that
  read Parquet only. The file name plays no part: ``data.json`` can be anything.
* The format that fits the most sampled records wins. Where one format refines another (:data:`REFINES`:
  every canonical record is also a messages record, a LLaVA-Med VQA record is a LLaVA record with an
  ``answer_type``), the refinement wins when both fit.
* A tie is an error naming the candidates, and a file whose records fit no format is an error naming the keys
  its first record has: guessing would read the file wrongly and silently, which is what detection must not do.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from medtune.data.files import readable_text_file
from medtune.data.jsonl import RecordError
from medtune.errors import InputFileError

SAMPLED_RECORDS = 20
_MAX_ATTEMPTS = 5 * SAMPLED_RECORDS   # records tried (parsed or not) before giving up on finding samples
# refinement -> the format it refines: when both fit, the refinement is meant.
REFINES = {"canonical": "messages", "llava-med-vqa": "llava", "quilt-vqa": "pathvqa", "vlmevalkit": "pathvqa"}
HOW_TO_NAME = "name the format (--from / --format FMT, or format: in a recipe)"


class FormatDetectionError(InputFileError):
    """A file's format cannot be told from its content; the message names the candidates or the keys seen."""


def detect_format(path: str | os.PathLike, sniffers: dict[str, Callable[[dict], bool]],
                  records_of: Callable[[Path], Iterable[tuple[object, object]]]) -> str:
    """The one format in ``sniffers`` that ``path``'s first records fit (see the module docstring)."""
    path = readable_text_file(path)
    sampled, first_error = _sample(records_of(path))
    if not sampled:
        reason = f"its first records do not parse ({first_error})" if first_error else "it holds no records"
        raise FormatDetectionError(f"{path}: cannot tell its format: {reason}; {HOW_TO_NAME}")
    return _best_fit(path, sampled, sniffers, "records with keys")


def detect_from_columns(path: str | os.PathLike, columns: list[str],
                        sniffers: dict[str, Callable[[dict], bool]]) -> str:
    """The one format in ``sniffers`` whose keys a table's ``columns`` hold (each sniffer sees the column names
    as a record with empty values)."""
    if not columns:
        raise FormatDetectionError(f"{path}: cannot tell its format: it has no columns; {HOW_TO_NAME}")
    return _best_fit(Path(path), [dict.fromkeys(columns)], sniffers, "columns")


def _best_fit(path: Path, sampled: list[dict], sniffers: dict[str, Callable[[dict], bool]], seen: str) -> str:
    scores = {name: sum(1 for record in sampled if _fits(sniff, record)) for name, sniff in sniffers.items()}
    best = max(scores.values())
    if best == 0:
        keys = sorted(sampled[0])
        raise FormatDetectionError(f"{path}: cannot tell its format: {seen} {keys} fit none of "
                                   f"{', '.join(sniffers)}; {HOW_TO_NAME}")
    candidates = [name for name, score in scores.items() if score == best]
    candidates = [name for name in candidates if not any(REFINES.get(other) == name for other in candidates)]
    if len(candidates) > 1:
        raise FormatDetectionError(f"{path}: its {seen.split()[0]} fit several formats equally "
                                   f"({', '.join(sorted(candidates))}); {HOW_TO_NAME}")
    return candidates[0]


def _sample(records: Iterable[tuple[object, object]]) -> tuple[list[dict], str | None]:
    """Up to SAMPLED_RECORDS parsed JSON objects from the start of a file, and the first parse error seen."""
    sampled, first_error = [], None
    iterator: Iterator = iter(records)
    with contextlib.closing(iterator) if hasattr(iterator, "close") else contextlib.nullcontext():
        for attempt, (_, record) in enumerate(iterator):
            if isinstance(record, RecordError):
                first_error = first_error or str(record)
            elif isinstance(record, dict):
                sampled.append(record)
            if len(sampled) >= SAMPLED_RECORDS or attempt + 1 >= _MAX_ATTEMPTS:
                break
    return sampled, first_error


def _fits(sniff: Callable[[dict], bool], record: dict) -> bool:
    try:
        return bool(sniff(record))
    except (TypeError, ValueError, AttributeError):  # a sniffer meeting an odd value: simply not a fit
        return False
