"""``medtune data convert --from FMT --to FMT IN OUT``: read any known format, write any writable one.

The conversion streams: one sample is in memory at a time, and the output is written atomically (nothing
appears at OUT unless the whole run succeeds). Bad input records are skipped and counted unless ``--strict``;
the run ends with the "N read, N written, N skipped (reasons)" line, then one line per skip reason with its
first example and any notes (e.g. how many leading assistant turns were dropped).

``--materialise DIR`` turns DICOM and NIfTI references (and any reference naming a frame or slice) into PNG
files in DIR through :func:`medtune.data.images.materialise`, so training needs no DICOM reader. The output
keeps one image root, the input's, so DIR must lie inside it; the new references are written relative to it.
A reference that cannot be materialised (missing, unreadable) skips its sample with the image error's reason.
"""
from __future__ import annotations

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


def materialised(samples: Iterable[Sample], image_root: Path, out_dir: Path, window: str | None, *,
                 tally: Tally, strict: bool) -> Iterator[Sample]:
    """Samples with their volume references replaced by PNGs in ``out_dir`` (paths relative to the root)."""
    from medtune.errors import UserError
    from medtune.data.images import ImageError, WindowError, materialise, window_bounds

    try:
        window_bounds(window)
    except WindowError as error:
        raise UserError(f"--window: {error}") from error
    root, out_dir = image_root.resolve(), out_dir.resolve()
    if out_dir != root and root not in out_dir.parents:
        raise UserError(f"--materialise {out_dir} must lie inside the image root {root}, so the converted "
                        "dataset keeps a single root")
    prefix = out_dir.relative_to(root)

    def convert(ref: ImageRef) -> ImageRef:
        if not needs_materialising(ref):
            return ref
        png = materialise(ref, image_root, out_dir, window=window)
        return ImageRef((prefix / png.path).as_posix())

    for sample in samples:
        try:
            converted = _map_images(sample, convert)
        except ImageError as error:
            record_error = RecordError(os.fspath(image_root), f"sample {sample.id}", str(error))
            if strict:
                raise record_error from error
            tally.skip_error(record_error, "image could not be materialised")
            continue
        yield converted


def _map_images(sample: Sample, convert) -> Sample:
    messages = [Message(m.role, tuple(Part.of_image(convert(p.image)) if p.type == "image" else p
                                      for p in m.content)) for m in sample.messages]
    return Sample(id=sample.id, messages=messages, meta=sample.meta)
