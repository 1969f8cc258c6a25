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

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from medtune.data.formats import FORMATS, default_image_root, get_format, read_records, write_records
from medtune.data.jsonl import RecordError, Tally
from medtune.data.schema import ImageRef, Message, Part, Sample

VOLUME_SUFFIXES = (".dcm", ".dicom", ".dic", ".nii", ".nii.gz")


def register(subparsers) -> None:
    writable = [name for name, fmt in FORMATS.items() if fmt.writable]
    parser = subparsers.add_parser(
        "convert", help="convert a dataset between formats",
        description=f"Convert IN (format --from) to OUT (format --to). Formats: {', '.join(FORMATS)}; "
                    f"writable: {', '.join(writable)}. See docs/data-format.md.")
    parser.add_argument("--from", dest="source_format", required=True, choices=list(FORMATS), metavar="FMT",
                        help="format of IN")
    parser.add_argument("--to", dest="target_format", required=True, choices=writable, metavar="FMT",
                        help="format of OUT")
    parser.add_argument("input", metavar="IN", help="input file")
    parser.add_argument("output", metavar="OUT", help="output file (written atomically)")
    parser.add_argument("--image-root", metavar="DIR",
                        help="folder the input's image paths are relative to (default: depends on the format, "
                             "usually the input file's folder)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--include-credentialed", action="store_true",
                        help="medmax: keep credential=YES rows (only once you have filled in their image_path)")
    parser.add_argument("--split", help="benchmark formats: the split to record, overriding the file name")
    parser.add_argument("--materialise", metavar="DIR",
                        help="write DICOM/NIfTI references as PNGs into DIR (inside the image root)")
    parser.add_argument("--window", metavar="PRESET",
                        help="with --materialise: VOI window preset for DICOM/NIfTI (lung, bone, brain, ...)")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from medtune.cli import UserError

    options = _reader_options(args)
    if args.window and not args.materialise:
        raise UserError("--window applies only with --materialise")
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise UserError(f"{args.output}: output would overwrite the input")
    image_root = Path(args.image_root) if args.image_root else default_image_root(args.source_format, args.input)
    tally = Tally()
    samples = read_records(args.source_format, args.input, tally=tally, strict=args.strict, **options)
    if args.materialise:
        samples = materialised(samples, image_root, Path(args.materialise), args.window,
                               tally=tally, strict=args.strict)
    write_records(args.target_format, args.output, _with_progress(samples), tally=tally)
    output_root = default_image_root(args.target_format, args.output)
    if output_root.resolve() != image_root.resolve():
        tally.notes.append(f"image paths are relative to {image_root}: use --image-root {image_root} "
                           f"(or image_root in a recipe) with {args.output}")
    _print_summary(tally, args)
    return 0


def _reader_options(args: argparse.Namespace) -> dict:
    """CLI flags that are reader options, refused for formats that do not take them."""
    from medtune.cli import UserError

    wanted = {"include_credentialed": args.include_credentialed or None, "split": args.split}
    options = {name: value for name, value in wanted.items() if value is not None}
    accepted = get_format(args.source_format).options
    for name in options:
        if name not in accepted:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} does not apply to --from {args.source_format}")
    return options


def _with_progress(samples: Iterable[Sample]) -> Iterator[Sample]:
    from tqdm import tqdm

    yield from tqdm(samples, desc="converting", unit=" samples", mininterval=1.0, file=sys.stderr,
                    disable=None)  # None: no bar when stderr is not a terminal (CI logs)


def _print_summary(tally: Tally, args: argparse.Namespace) -> None:
    print(f"{args.input} ({args.source_format}) -> {args.output} ({args.target_format})")
    for line in tally.details() + tally.notes:
        print(f"  {line}")
    print(tally.summary())


# ------------------------------------------------------------------------------------------- materialise

def needs_materialising(ref: ImageRef) -> bool:
    """DICOM / NIfTI files, and any reference that selects a frame or slice of a volume."""
    return (ref.frame is not None or ref.axis is not None or ref.slice is not None
            or ref.path.lower().endswith(VOLUME_SUFFIXES))


def materialised(samples: Iterable[Sample], image_root: Path, out_dir: Path, window: str | None, *,
                 tally: Tally, strict: bool) -> Iterator[Sample]:
    """Samples with their volume references replaced by PNGs in ``out_dir`` (paths relative to the root)."""
    from medtune.cli import UserError
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
