"""Every external data format medtune reads or writes, by name.

Each format is a module with ``read(path, *, tally, strict, **options) -> Iterator[Sample]``, an optional
``write(path, samples, *, tally)``, ``image_root(path)`` and ``sniff(record) -> bool`` (does a raw record look
like this format); this registry is the only place that knows which modules exist. Everything else goes through
:func:`read_records`, :func:`write_records`, :func:`default_image_root` and :func:`detect_format`. Readers
stream (memory does not grow with the file), count each record in the tally, and skip-and-count bad records
with a reason naming file, record and the record's id (raised instead when ``strict``).

Nothing vanishes silently. :func:`read_records` checks the path first (a folder, an empty, unreadable or binary
file is one clear error), detects the format from content when none is named, and once the reader is done
refuses two outcomes that would otherwise pass as success: a file whose end could not be read record by record
(:class:`IncompleteInput`: its records are not counted) and a non-empty file of which no record was usable
because of bad input (:class:`NothingUsable`, which says which format the file looks like when that is another
one). Callers that report problems themselves (``data check``, ``data convert``) can take either outcome instead.
The formats and their field mappings are documented in docs/data-format.md. A GMAI-VL dataset list is not a
sample format but a list of datasets (:mod:`medtune.data.formats.gmai_vl`, read by ``medtune.data.mixture``).

Parquet: a format module that sets ``READS_PARQUET = True`` (mmmu, quilt-vqa, medmax-eval: their releases are
Parquet) also reads a Parquet file, row by row (:mod:`medtune.data.formats.parquet`); :func:`read_records` refuses
one for any other format with a line naming those that read it, and :func:`detect_format` tells a Parquet file's
format from its column names among those formats.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Iterator

from medtune.data.files import readable_text_file
from medtune.data.formats import (
    canonical, detect, gmai_mmbench, llava, llava_med_vqa, medmax, medmax_eval, medxpertqa, messages, mmmu,
    omnimedvqa, parquet, pathmmu, pathvqa, pmc_vqa, probmed, quilt_vqa, rlaif_v, slake, vlfeedback, vlmevalkit,
    vqa_rad,
)
from medtune.data.formats.records import iter_records
from medtune.data.jsonl import UNREADABLE_TAIL, Tally
from medtune.data.schema import Sample
from medtune.errors import InputFileError, UserError


@dataclass(frozen=True)
class Format:
    """One external format: what it is, how to read it, how to write it (None: read only)."""

    name: str
    description: str
    read: Callable[..., Iterator[Sample]]
    write: Callable[..., None] | None
    image_root: Callable[[Path], Path]
    sniff: Callable[[dict], bool]
    raw_records: Callable[[Path], Iterator] = iter_records   # what ``sniff`` is shown: the file's raw records
    reads_parquet: bool = False                              # also reads the Parquet release, row by row

    @property
    def writable(self) -> bool:
        return self.write is not None

    @property
    def options(self) -> tuple[str, ...]:
        """Reader options beyond path/tally/strict (e.g. ``include_credentialed``, ``split``)."""
        names = inspect.signature(self.read).parameters
        return tuple(n for n in names if n not in ("path", "tally", "strict"))


def _format(name: str, module: ModuleType, description: str) -> Format:
    return Format(name, description, module.read, getattr(module, "write", None), module.image_root, module.sniff,
                  getattr(module, "raw_records", iter_records), getattr(module, "READS_PARQUET", False))


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
    _format("quilt-vqa", quilt_vqa, "Quilt-VQA test JSON (conversations + answer_type, or table rows with context)"),
    _format("omnimedvqa", omnimedvqa, "OmniMedVQA QA_information JSON (question_id, gt_answer, option_A..)"),
    _format("pathmmu", pathmmu, "PathMMU data.json ({subset: {split: [questions]}})"),
    _format("probmed", probmed, "ProbMed probmed.json (yes/no probes with qa_type, image_type)"),
    _format("medxpertqa", medxpertqa, "MedXpertQA MM/Text JSON Lines (id, question, options, label, images)"),
    _format("mmmu", mmmu, "MMMU rows as JSON/JSONL (medical subjects, validation split by default)"),
    _format("medmax-eval", medmax_eval, "MedMax evaluation release (task_name, question_type, prompt, answer)"),
    _format("vlmevalkit", vlmevalkit, "VLMEvalKit benchmark TSV (index, question, A.., answer, base64 image)"),
    _format("gmai-mmbench", gmai_mmbench, "GMAI-MMBench VLMEvalKit TSV (VAL has answers; never detected)"),
    _format("rlaif-v", rlaif_v, "RLAIF-V preference pairs (image, question, chosen, rejected; Parquet or JSON)"),
    _format("vlfeedback", vlfeedback, "VLFeedback ranked completions as preference pairs (JSON Lines or Parquet)"),
)}


class NothingUsable(UserError, ValueError):
    """A non-empty file of which no record could be read in the format it was read as."""


class IncompleteInput(UserError, ValueError):
    """A file whose end could not be read record by record, so its records are not all counted."""


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def detect_format(path: str | os.PathLike) -> str:
    """The format ``path`` is in, from its content (see :mod:`medtune.data.formats.detect`).

    Raises :class:`~medtune.data.formats.detect.FormatDetectionError` (a UserError) naming the candidates when
    the records fit several formats equally, or the keys seen when they fit none.
    """
    path = readable_text_file(path, parquet=True)
    if parquet.is_parquet(path):
        return detect.detect_from_columns(path, parquet.column_names(path),
                                          {name: fmt.sniff for name, fmt in FORMATS.items() if fmt.reads_parquet})
    # Table files are matched on their rows; vlmevalkit's row reader allows cells that hold a whole base64 image.
    raw = vlmevalkit.raw_records if path.suffix.lower() in (".csv", ".tsv") else iter_records
    return detect.detect_format(path, {name: fmt.sniff for name, fmt in FORMATS.items()}, raw)


def guess_format(path: str | os.PathLike) -> str | None:
    """:func:`detect_format`, or None when the content does not say (for hints in error messages)."""
    try:
        return detect_format(path)
    except (UserError, OSError):
        return None


def resolve_format(fmt: str | None, path: str | os.PathLike) -> str:
    """``fmt`` when given (checked against the registry), else the format detected from ``path``'s content."""
    if fmt is None:
        return detect_format(path)
    get_format(fmt)
    return fmt


def read_records(fmt: str | None, path: str | os.PathLike, *, tally: Tally, strict: bool = False,
                 require_complete: bool = True, require_usable: bool = True, **options) -> Iterator[Sample]:
    """Stream canonical samples from ``path`` in format ``fmt`` (None: detected); bad records are counted in
    ``tally``. At the end, :class:`IncompleteInput` / :class:`NothingUsable` are raised unless not required."""
    path = readable_text_file(path, parquet=True)
    fmt = resolve_format(fmt, path)
    reader = get_format(fmt)
    if not reader.reads_parquet and parquet.is_parquet(path):
        readers = ", ".join(name for name, f in FORMATS.items() if f.reads_parquet)
        raise InputFileError(f"{path}: a Parquet file, which the {fmt} format does not read (Parquet is read by: "
                             f"{readers}); export it to JSON Lines, or name one of those formats")
    unknown = set(options) - set(reader.options)
    if unknown:
        raise ValueError(f"format {fmt!r} takes no option {sorted(unknown)[0]!r} "
                         f"(its options: {', '.join(reader.options) or 'none'})")
    samples = reader.read(path, tally=tally, strict=strict, **options)
    return _accounted(samples, fmt, path, tally, require_complete=require_complete, require_usable=require_usable)


def _accounted(samples: Iterator[Sample], fmt: str, path: Path, tally: Tally, *, require_complete: bool,
               require_usable: bool) -> Iterator[Sample]:
    """``samples``, then the end-of-file checks of :func:`read_records` on what this file added to ``tally``."""
    read_before, bad_before, skipped_before = tally.read, tally.bad_records, dict(tally.skipped)
    usable = 0
    for sample in samples:
        usable += 1
        yield sample
    new_skips = {reason: n - skipped_before.get(reason, 0) for reason, n in tally.skipped.items()
                 if n > skipped_before.get(reason, 0)}
    if require_complete and UNREADABLE_TAIL in new_skips:
        before = tally.read - read_before - 1
        raise IncompleteInput(f"{tally.examples[UNREADABLE_TAIL]}, so its records are not counted "
                              f"({before} record{'s' * (before != 1)} before it read)")
    read, bad = tally.read - read_before, tally.bad_records - bad_before
    if require_usable and read and not usable and bad:
        raise NothingUsable(nothing_usable_message(fmt, path, read, new_skips, tally))


def nothing_usable_message(fmt: str, path: Path, read: int, skips: dict[str, int], tally: Tally) -> str:
    """"none of its N records could be read as FMT (first: ...); it looks like OTHER" for a wrong format."""
    reason = max(skips, key=skips.get) if skips else None
    first = f" (first: {tally.examples[reason]})" if reason in tally.examples else ""
    guess = guess_format(path)
    hint = f"; it looks like {guess}, not {fmt}: read it as {guess}" if guess not in (None, fmt) else ""
    return f"{path}: none of its {read} records could be read as {fmt}{first}{hint}"


def write_records(fmt: str, path: str | os.PathLike, samples: Iterable[Sample], *, tally: Tally) -> None:
    """Write samples to ``path`` in format ``fmt``, atomically; samples it cannot express are counted."""
    writer = get_format(fmt)
    if not writer.writable:
        writable = [name for name, f in FORMATS.items() if f.writable]
        raise ValueError(f"format {fmt!r} is read only (writable: {', '.join(writable)})")
    writer.write(path, without_pairs(samples, fmt, tally), tally=tally)


def without_pairs(samples: Iterable[Sample], fmt: str, tally: Tally) -> Iterator[Sample]:
    """``samples`` for a writer of ``fmt``: a preference pair is counted and left out where ``fmt`` cannot hold its
    rejected reply (every format but canonical), never written as half a pair."""
    if fmt == "canonical":
        yield from samples
        return
    for sample in samples:
        if sample.rejected is not None:
            tally.skip("preference pair", f"{sample.id}: {fmt} cannot hold the rejected reply (write canonical)")
            continue
        yield sample


def default_image_root(fmt: str | None, path: str | os.PathLike) -> Path:
    """Where a file's relative image paths start when the user names no ``--image-root`` (``fmt`` None:
    the format detected from the file)."""
    return get_format(resolve_format(fmt, path)).image_root(Path(path))


__all__ = ["FORMATS", "Format", "IncompleteInput", "NothingUsable", "default_image_root", "detect_format",
           "get_format", "guess_format", "read_records", "resolve_format", "without_pairs", "write_records"]
