"""``medtune data convert [--from FMT] --to FMT IN OUT``: read any known format, write any writable one.

The conversion streams: one sample is in memory at a time, and the output is written atomically. Bad input
records are skipped and counted unless ``--strict``; the run ends with the "N read, N written, N skipped
(reasons)" line, in which every record of IN appears, then one line per skip reason with its first example and
any notes (e.g. how many leading assistant turns were dropped). Without ``--from`` the format is detected from
IN's content. Two outcomes are failures (exit code 2) although records were read: nothing at all could be
written (nothing appears at OUT; the error says which format IN looks like when it was read as another), and
IN's end could not be read record by record (OUT holds what came before it; the summary counts the rest as
one unreadable record).

``--materialise DIR`` turns DICOM and NIfTI references (and any reference naming a frame or slice) into PNG
files in DIR through :func:`medtune.data.images.materialise`, so training needs no DICOM reader. The output
keeps one image root, the input's, which must exist, so DIR must lie inside it; the new references are written
relative to it. A reference that cannot be materialised (missing, unreadable, DICOM that may show burned-in
patient text) skips its sample with the image error's reason; ``--allow-burned-in`` accepts the latter, and the
summary says how many were.
"""
from __future__ import annotations

import dataclasses

import os
from pathlib import Path
from typing import Iterable, Iterator

from medtune.data.jsonl import RecordError, Tally
from medtune.data.schema import ImageRef, Message, Part, Sample

VOLUME_SUFFIXES = (".dcm", ".dicom", ".dic", ".nii", ".nii.gz")


# ------------------------------------------------------------------------------------------- materialise

def needs_materialising(ref: ImageRef) -> bool:
    """DICOM / NIfTI files, and any reference that selects a frame or slice of a volume."""
    return (ref.frame is not None or ref.axis is not None or ref.slice is not None
            or ref.path.lower().endswith(VOLUME_SUFFIXES))


BURNED_IN_REFUSED = "burned-in annotation refused"


def without_volume_names(samples: Iterable[Sample], source) -> Iterator[Sample]:
    """``samples``, stopping at the first that names a DICOM or NIfTI file: clinical exports name such files
    after the patient, so copying the name into an output could carry an identifier (the error gives the
    record's number, never the name). ``--materialise`` writes them as PNGs named by content instead."""
    from medtune.errors import UserError

    for number, sample in enumerate(samples, 1):
        if any(needs_materialising(ref) for ref in sample.images):
            raise UserError(f"{source}: record {number} refers to a DICOM or NIfTI file by its name, which can "
                            "hold patient identifiers, so nothing was written: convert with --materialise DIR "
                            "(PNGs named by content) or, where the names are known to hold none, "
                            "--keep-image-names")
        yield sample


def materialised(samples: Iterable[Sample], image_root: Path, out_dir: Path, window: str | None, *,
                 tally: Tally, strict: bool, allow_burned_in: bool = False) -> Iterator[Sample]:
    """Samples with their volume references replaced by PNGs in ``out_dir`` (paths relative to the root)."""
    from medtune.errors import UserError
    from medtune.data.images import (BurnedInError, ImageError, WindowError, materialise, require_image_root,
                                     window_bounds)

    try:
        window_bounds(window)
    except WindowError as error:
        raise UserError(f"--window: {error}") from error
    require_image_root(image_root)
    root, out_dir = image_root.resolve(), out_dir.resolve()
    if out_dir != root and root not in out_dir.parents:
        raise UserError(f"--materialise {out_dir} must lie inside the image root {root}, so the converted "
                        "dataset keeps a single root")
    prefix = out_dir.relative_to(root)

    accepted: set[ImageRef] = set()   # burned-in images let through by --allow-burned-in, for the summary

    def convert(ref: ImageRef) -> ImageRef:
        if not needs_materialising(ref):
            return ref
        try:
            png = materialise(ref, image_root, out_dir, window=window)
        except BurnedInError:
            if not allow_burned_in:
                raise
            accepted.add(ref)
            png = materialise(ref, image_root, out_dir, window=window, allow_burned_in=True)
        return ImageRef((prefix / png.path).as_posix())

    for sample in samples:
        try:
            converted = _map_images(sample, convert)
        except ImageError as error:
            record_error = RecordError(os.fspath(image_root), f"sample {sample.id}", str(error))
            if strict:
                raise record_error from error
            reason = BURNED_IN_REFUSED if isinstance(error, BurnedInError) else "image could not be materialised"
            tally.skip_error(record_error, reason)
            continue
        yield converted
    if accepted:
        tally.notes.append(burned_in_note(len(accepted)))


def burned_in_note(count: int) -> str:
    """The line a summary or report carries when --allow-burned-in let images through."""
    return (f"{count} image{'s' * (count != 1)} with possible burned-in annotation accepted (--allow-burned-in): "
            "check that no patient text shows in the pixels")


def _map_images(sample: Sample, convert) -> Sample:
    messages = [Message(m.role, tuple(Part.of_image(convert(p.image)) if p.type == "image" else p
                                      for p in m.content)) for m in sample.messages]
    return dataclasses.replace(sample, messages=messages)
