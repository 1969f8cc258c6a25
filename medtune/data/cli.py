"""``medtune data ...``: convert, check, stats, mix, leakage: argument parsing and what each verb prints.

The work itself lives in the modules named after the verbs (convert.py, checks.py, stats.py, mixture.py,
leakage.py), which take typed arguments and know nothing of argparse; this module turns parsed options into
those calls and prints their summaries. Nothing heavy is imported at import time (``medtune --help`` stays fast).
Every verb detects a file's format from its content when ``--from`` / ``--format`` is not given, and says so.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from medtune.data import checks, convert, leakage, mixture, stats
from medtune.data.formats import (
    FORMATS, IncompleteInput, default_image_root, get_format, read_records, resolve_format, without_pairs,
    write_records,
)
from medtune.data.jsonl import UNREADABLE_TAIL, Tally, write_json
from medtune.data.schema import Sample
from medtune.progress import track


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="convert, check, describe, mix and de-leak datasets",
        description="Work on dataset files in any known format (see docs/data-format.md); each file's format is "
                    "detected from its content unless you name it. `medtune data VERB --help` for each verb.")
    verbs = parser.add_subparsers(dest="data_verb", metavar="VERB")
    for add_verb in (_add_convert, _add_check, _add_stats, _add_mix, _add_leakage, _add_preferences):
        add_verb(verbs)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


# ---- convert ----------------------------------------------------------------------------------------------

def _add_convert(subparsers) -> None:
    writable = [name for name, fmt in FORMATS.items() if fmt.writable]
    parser = subparsers.add_parser(
        "convert", help="convert a dataset between formats",
        description=f"Convert IN (format --from) to OUT (format --to). Formats: {', '.join(FORMATS)}; "
                    f"writable: {', '.join(writable)}. See docs/data-format.md.")
    parser.add_argument("--from", dest="source_format", default=None, choices=list(FORMATS), metavar="FMT",
                        help="format of IN (default: detected from its content)")
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
    _add_burned_in_flag(parser, "with --materialise: ")
    parser.add_argument("--keep-image-names", action="store_true",
                        help="without --materialise: copy DICOM/NIfTI file names into OUT as they are (a file name "
                             "can hold patient identifiers, so this is refused unless asked)")
    parser.set_defaults(func=_run_convert)


def _add_burned_in_flag(parser, prefix: str = "") -> None:
    parser.add_argument("--allow-burned-in", action="store_true",
                        help=f"{prefix}accept DICOM that may show patient text in its pixels (BurnedInAnnotation "
                             "YES, secondary captures, ultrasound); refused by default, counted when accepted")


def _format_of(fmt: str | None, path) -> tuple[str, str]:
    """The format to read ``path`` in and how it was chosen ("" or ", detected") for the summary."""
    return resolve_format(fmt, path), ("" if fmt else ", detected")


def _run_convert(args: argparse.Namespace) -> int:
    from medtune.errors import UserError

    if args.window and not args.materialise:
        raise UserError("--window applies only with --materialise")
    if args.allow_burned_in and not args.materialise:
        raise UserError("--allow-burned-in applies only with --materialise (without it no pixel is read)")
    if args.keep_image_names and args.materialise:
        raise UserError("--keep-image-names applies only without --materialise (which names images by content)")
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise UserError(f"{args.output}: output would overwrite the input")
    args.source_format, args.detected = _format_of(args.source_format, args.input)
    options = _reader_options(args)
    image_root = Path(args.image_root) if args.image_root else default_image_root(args.source_format, args.input)
    tally = Tally()
    samples = read_records(args.source_format, args.input, tally=tally, strict=args.strict, require_complete=False,
                           **options)
    if args.materialise:
        samples = convert.materialised(samples, image_root, Path(args.materialise), args.window,
                                       tally=tally, strict=args.strict, allow_burned_in=args.allow_burned_in)
    elif not args.keep_image_names:
        samples = convert.without_volume_names(samples, args.input)
    samples = without_pairs(samples, args.target_format, tally)   # counted here, so "nothing usable" sees it
    write_records(args.target_format, args.output, _something_written(_with_progress(samples), tally, args),
                  tally=tally)
    output_root = default_image_root(args.target_format, args.output)
    if output_root.resolve() != image_root.resolve():
        tally.notes.append(f"image paths are relative to {image_root}: use --image-root {image_root} "
                           f"(or image_root in a recipe) with {args.output}")
    _print_summary(tally, args)
    if tally.incomplete:
        raise IncompleteInput(f"{tally.examples[UNREADABLE_TAIL]}, so the records there are not counted; "
                              f"{args.output} holds the {tally.written} written before it, and nothing was written "
                              "from the rest: repair the file and convert again")
    return 0


def _something_written(samples: Iterable[Sample], tally: Tally, args) -> Iterator[Sample]:
    """``samples``; at their end, an input that had records but gave none to write fails (nothing is written)."""
    from medtune.errors import UserError

    count = 0
    for sample in samples:
        count += 1
        yield sample
    if count == 0 and tally.read:
        _print_summary(tally, args)
        first = tally.details()[0] if tally.skipped else "no record could be used"
        raise UserError(f"{args.input}: nothing usable, so nothing was written ({tally.summary()}; {first})")


def _reader_options(args: argparse.Namespace) -> dict:
    """CLI flags that are reader options, refused for formats that do not take them."""
    from medtune.errors import UserError

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
    print(f"{args.input} ({args.source_format}{args.detected}) -> {args.output} ({args.target_format})")
    for line in tally.details() + tally.notes:
        print(f"  {line}")
    print(tally.summary())


# ---- check ------------------------------------------------------------------------------------------------

def _add_check(subparsers) -> None:

    parser = subparsers.add_parser(
        "check", help="report every problem in a dataset (exit code 1 when there are errors)",
        description="Check FILE: records that do not parse, empty or misordered turns, placeholder/image count "
                    "mismatches, duplicate ids, unknown answer types, and every image that is missing, "
                    "unreadable, outside the image root or too large (--no-images: the annotations only). "
                    "One line per problem with its location, the first few of each kind, then each kind's "
                    "count; --report writes them all. Exit code 1 when there are errors (or, with --strict, "
                    "warnings), 0 otherwise.")
    parser.add_argument("file", metavar="FILE", help="dataset file")
    _add_format_option(parser)
    parser.add_argument("--image-root", metavar="DIR",
                        help="folder image paths are relative to (default: depends on the format, usually FILE's)")
    parser.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                        help="also allow images under DIR (repeatable); paths outside every root are errors")
    parser.add_argument("--max-pixels", type=int, default=checks.DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"refuse images with more pixels than N (default {checks.DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--no-images", dest="check_images", action="store_false",
                        help="check the annotations only: no image is looked for (annotations shipped without "
                             "their images)")
    parser.add_argument("--examples", type=_count, default=5, metavar="N",
                        help="print the first N problems of each kind and count the rest (default %(default)s; "
                             "0 prints every one)")
    parser.add_argument("--strict", action="store_true", help="count warnings as errors")
    _add_burned_in_flag(parser)
    parser.add_argument("--report", metavar="OUT.json", help="also write every problem as JSON")
    parser.set_defaults(func=_run_check)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def _print_kind_counts(by_kind: dict[str, int], examples: int, report: str | None) -> None:
    """A line for each kind with more problems than were printed: how many, and where to see them all."""
    where_all = f"all in {report}" if report else "--report OUT.json writes them all"
    for kind, count in by_kind.items():
        if examples and count > examples:
            print(f"{kind}: {count:,} problems, the first {examples} shown above ({where_all}; --examples 0 "
                  "prints every one)")


def _add_format_option(parser) -> None:
    parser.add_argument("--format", default=None, choices=list(FORMATS), metavar="FMT",
                        help=f"format of FILE (default: detected from its content; known: {', '.join(FORMATS)})")


def _run_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    fmt, detected = _format_of(args.format, path)
    if detected:  # flushed: before the problems, and before the progress bar on stderr
        print(f"format: {fmt} (detected from the file's content; --format to choose)", flush=True)
    image_root = Path(args.image_root) if args.image_root else default_image_root(fmt, path)
    tally = Tally()
    problems, images = checks.check_dataset(path, fmt, image_root, allowed_roots=args.allow_root,
                                            max_pixels=args.max_pixels, tally=tally, progress=sys.stderr.isatty(),
                                            allow_burned_in=args.allow_burned_in, check_images=args.check_images)
    for problem in checks.first_of_each_kind(problems, args.examples):
        print(problem.line())
    report = checks.summarise(problems, images, tally, path=path, fmt=fmt, image_root=image_root)
    _print_kind_counts(report["by_kind"], args.examples, args.report)
    if any(kind in checks.IMAGE_PROBLEM_KINDS for kind in report["by_kind"]):
        print(f"image paths were looked up under {os.path.abspath(image_root)} (--image-root DIR to change it; "
              "--no-images checks the annotations only)")
    print(report["summary"])
    if report["by_kind"]:
        print("  " + ", ".join(f"{n} {kind}" for kind, n in report["by_kind"].items()))
    if images is not None and images.burned_in_accepted:
        tally.notes.append(convert.burned_in_note(images.burned_in_accepted))
        report["tally"] = tally.to_dict()
    print(tally.summary())
    for note in tally.notes:
        print(f"note: {note}")
    if args.report:
        write_json(args.report, report)
    failed = report["errors"] > 0 or (args.strict and report["warnings"] > 0)
    return 1 if failed else 0


# ---- stats ------------------------------------------------------------------------------------------------

def _add_stats(subparsers) -> None:

    parser = subparsers.add_parser(
        "stats", help="counts by source, task, modality, answer type; images per sample; text lengths",
        description="Describe FILE: counts by source, task, modality, organ, answer type, split and credential, "
                    "images and turns per sample, and text length percentiles in characters.")
    parser.add_argument("file", metavar="FILE", help="dataset file")
    _add_format_option(parser)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--json", metavar="OUT.json", help="also write the statistics as JSON")
    parser.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    tally = Tally()
    fmt, detected = _format_of(args.format, args.file)
    samples = read_records(fmt, Path(args.file), tally=tally, strict=args.strict)
    found = stats.collect(tqdm(samples, desc="reading", unit=" records", disable=not sys.stderr.isatty(),
                               file=sys.stderr)).to_dict()
    found["tally"], found["format"] = tally.to_dict(), fmt
    if detected:
        print(f"format: {fmt} (detected from the file's content; --format to choose)")
    print(stats.format_table(found, tally))
    for line in tally.details():
        print(f"skipped: {line}")
    if args.json:
        write_json(args.json, found)
    print(tally.summary())
    return 0


# ---- mix --------------------------------------------------------------------------------------------------

def _add_mix(subparsers) -> None:
    parser = subparsers.add_parser(
        "mix", help="sample several datasets into one canonical JSONL (mix recipe YAML or GMAI-VL list JSON)",
        description="Write a deterministic mixture of datasets as canonical JSONL, with OUT.manifest.json "
                    "recording per-dataset counts, the seed and the common image root of the output.")
    parser.add_argument("recipe", help="mix recipe (.yaml) or GMAI-VL dataset list (.json)")
    parser.add_argument("out", type=Path, help="output canonical JSONL")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--include-credentialed", action="store_true",
                        help="keep credentialed samples (once you have supplied their images)")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping")
    parser.set_defaults(func=_run_mix)


def _run_mix(args) -> int:
    from medtune.data.files import readable_text_file

    mix = mixture.load_mixture(readable_text_file(args.recipe, "mix recipe"), strict=args.strict)
    if args.include_credentialed:
        mix.include_credentialed = True
    tally, manifest = mixture.write_mixture(mix, args.out, seed=args.seed)
    for info in manifest["datasets"]:
        length = info.get("declared_length")
        mismatch = f" (list says length {length})" if length is not None and length != info["available"] else ""
        print(f"{info['name']}: {info['written']} samples from {info['available']} usable records{mismatch} "
              f"[{info['sampling']}]")
    print(f"image root for {args.out}: {manifest['image_root']} (pass as --image-root; also in "
          f"{mixture.manifest_path(args.out)})")
    for line in tally.details():
        print(f"  skipped {line}")
    print(tally.summary())
    return 0


# ---- leakage ----------------------------------------------------------------------------------------------

def _add_leakage(subparsers) -> None:
    parser = subparsers.add_parser(
        "leakage", help="overlap between a training and an evaluation set; optionally write a cleaned training set",
        description="Report shared images (content hash), exact question/answer pairs, templated rephrasings "
                    "and near-duplicate questions between TRAIN and TEST.")
    parser.add_argument("train", type=Path, help="training set")
    parser.add_argument("test", type=Path, help="evaluation set")
    parser.add_argument("--format", default=None, choices=list(FORMATS), metavar="FMT",
                        help="format of both files (default: each detected from its content)")
    parser.add_argument("--format-train", default=None, choices=list(FORMATS), metavar="FMT",
                        help="format of TRAIN (overrides --format)")
    parser.add_argument("--format-test", default=None, choices=list(FORMATS), metavar="FMT",
                        help="format of TEST (overrides --format)")
    parser.add_argument("--image-root", type=Path, default=None, metavar="DIR", help="image root of both files")
    parser.add_argument("--image-root-train", type=Path, default=None, metavar="DIR", help="image root of TRAIN")
    parser.add_argument("--image-root-test", type=Path, default=None, metavar="DIR", help="image root of TEST")
    parser.add_argument("--near-threshold", type=_threshold, metavar="J", default=leakage.DEFAULT_NEAR_THRESHOLD,
                        help=f"token-set Jaccard for near-duplicate questions (default {leakage.DEFAULT_NEAR_THRESHOLD})")
    parser.add_argument("--clean", type=Path, default=None, metavar="OUT",
                        help="write TRAIN without the leaking records as canonical JSONL")
    parser.add_argument("--remove", type=_categories, metavar="leakage.CATEGORIES", default=leakage.DEFAULT_REMOVE,
                        help="comma-separated categories --clean drops: exact, rephrasing, near "
                             "(default: exact,rephrasing)")
    parser.add_argument("--report", type=Path, default=None, metavar="FILE", help="write the findings as JSON")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping")
    parser.set_defaults(func=_run_leakage)


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"near threshold must be in (0, 1], got {text}")
    return value


def _categories(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in leakage.CATEGORIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown categories {unknown or text!r} (choose from {', '.join(leakage.CATEGORIES)})")
    return names


def _side(args, side: str) -> tuple[Path, str, Path]:
    from medtune.data.images import require_image_root

    path = getattr(args, side)
    fmt = resolve_format(getattr(args, f"format_{side}") or args.format, path)
    root = getattr(args, f"image_root_{side}") or args.image_root or default_image_root(fmt, path)
    return path, fmt, require_image_root(root, f"image root of {side.upper()}")


def _stream(path: Path, fmt: str, root: Path, tally: Tally, strict: bool) -> Iterator[tuple[Sample, Path]]:
    for sample in mixture.read_dataset(fmt, path, tally=tally, strict=strict):
        yield sample, root


def _run_leakage(args) -> int:
    (train_path, train_fmt, train_root), (test_path, test_fmt, test_root) = _side(args, "train"), _side(args, "test")
    tally, hasher = Tally(), leakage.ImageHasher()
    # a bar on a terminal, plain lines in a log (the training records stream: no total to show)
    train_stream = track(_stream(train_path, train_fmt, train_root, tally, args.strict), total=None,
                         desc="comparing", unit="training records")
    report = leakage.find_leakage(train_stream, _stream(test_path, test_fmt, test_root, tally, args.strict),
                          near_threshold=args.near_threshold, hasher=hasher)
    result = report.to_dict()
    result.update(train={"path": str(train_path), "format": train_fmt, "image_root": str(train_root)},
                  test={"path": str(test_path), "format": test_fmt, "image_root": str(test_root)},
                  unreadable_images=hasher.unreadable)
    for line in report.lines():
        print(line)
    if hasher.unreadable:
        print(f"warning: {len(hasher.unreadable)} images could not be read and were compared by path")
    if args.clean is not None:
        drop = report.positions(args.remove)
        leakage.write_clean(mixture.read_dataset(train_fmt, train_path, tally=Tally(), strict=args.strict), args.clean, drop, tally)
        result["cleaned"] = {"path": str(args.clean), "removed_categories": list(args.remove),
                             "removed": len(drop), "written": tally.written, "image_root": str(train_root)}
        print(f"cleaned training set: {args.clean} ({len(drop)} records removed: {', '.join(args.remove)}; "
              f"image root {train_root})")
    result["tally"] = tally.to_dict()
    if args.report is not None:
        write_json(args.report, result)
    for line in tally.details():
        print(f"  skipped {line}")
    print(tally.summary())
    return 0


# ---- preferences ------------------------------------------------------------------------------------------

def _add_preferences(subparsers) -> None:
    parser = subparsers.add_parser(
        "preferences", help="preference pairs (for a DPO stage) from a model's wrong answers on a labelled set",
        description="For every question of LABELLED that PREDICTIONS (medtune eval run's predictions.jsonl, or a "
                    "LLaVA-Med / Med-MoE answers file) answers wrong by the strict metric family, write a "
                    "preference pair to OUT (canonical JSONL): chosen = the reference answer, rejected = the "
                    "model's answer. Questions answered right or not answered are counted, not paired.")
    parser.add_argument("labelled", metavar="LABELLED", help="the labelled questions (any known format)")
    parser.add_argument("predictions", metavar="PREDICTIONS", help="the model's answers, by question id")
    parser.add_argument("output", metavar="OUT", help="the pairs, canonical JSON Lines (written atomically)")
    _add_format_option(parser)
    parser.add_argument("--image-root", metavar="DIR",
                        help="folder LABELLED's image paths are relative to (default: depends on its format)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.set_defaults(func=_run_preferences)


def _run_preferences(args: argparse.Namespace) -> int:
    from collections import Counter

    from medtune.errors import UserError
    from medtune.eval.predictions import read_predictions
    from medtune.eval.preferences import REASONS, preference_pairs

    fmt, detected = _format_of(args.format, args.labelled)
    image_root = Path(args.image_root) if args.image_root else default_image_root(fmt, args.labelled)
    predictions = read_predictions(args.predictions, strict=args.strict)
    tally, counts = Tally(), Counter()
    pairs = list(preference_pairs(read_records(fmt, args.labelled, tally=tally, strict=args.strict), predictions,
                                  counts))
    if not pairs:
        raise UserError(f"{args.predictions}: no wrong answer among the {sum(counts.values()):,} questions "
                        f"({', '.join(f'{counts[reason]:,} {reason}' for reason in REASONS)}), so there is no "
                        "pair to write")
    write_records("canonical", args.output, pairs, tally=tally)
    print(f"{args.labelled} ({fmt}{detected}) + {args.predictions} -> {args.output}")
    print(f"  {counts['pairs']:,} pairs (wrong answers); "
          + ", ".join(f"{counts[reason]:,} {reason}" for reason in REASONS))
    for line in tally.details():
        print(f"  {line}")
    if default_image_root("canonical", args.output).resolve() != image_root.resolve():
        print(f"  image paths are relative to {image_root}: use image_root: {image_root} in the DPO stage's data")
    return 0
