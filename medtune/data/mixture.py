"""Dataset mixtures: several datasets, each sampled by a ratio or a count, as one deterministic stream.

A mixture comes from one of two files, read by :func:`load_mixture`:

* a medtune mix recipe (YAML)::

      seed: 0                      # default seed for iter_samples / `medtune data mix`
      shuffle: full                # full | interleave | none (true = full, false = none)
      include_credentialed: false  # samples with meta.credential true ship without images: kept out by default
      datasets:
        - name: vqa-rad            # unique; prefixes output ids ("vqa-rad/17")
          path: ../data/vqa_rad/trainset.json   # relative paths are relative to the recipe file
          format: vqa-rad          # any reader in medtune.data.formats (default: detected from the content)
          image_root: ../data/vqa_rad/images    # default: the format's default image root
          ratio: 0.5               # or count: 200 (not both; neither means ratio 1)
          replacement: false

* a GMAI-VL dataset list (JSON), parsed by :mod:`medtune.data.formats.gmai_vl`: ``sample_ratio`` is the ratio
  below; ``length`` is checked against the records actually read and a difference is reported;
  ``data_augment`` is a training-time switch, recorded, not applied.

Sampling. For a dataset with N usable records the target is ``count``, or ``ratio * N`` rounded to the nearest
integer (halves up). Without replacement the target is met with whole copies first, then a remainder drawn
without replacement: ratio 0.3 is a random 30% subset, ratio 2.5 is every record twice plus a random half of
them once more (so no record appears more than once above the others). With ``replacement: true`` every one of
the target draws is independent and uniform (a record may appear any number of times). Each dataset's draw uses
its own generator seeded by (seed, dataset name), so adding a dataset does not change what the others select.

Streaming. A mixture is read in two passes: the first counts each dataset's usable records (bad records and
credentialed ones are not usable), the second streams the records again and emits the selected indices. No
dataset is held in memory. Order: ``none`` emits dataset after dataset in file order; ``interleave`` streams
too, drawing which dataset comes next from a seeded shuffle of the dataset labels (so datasets are spread
through the stream in proportion, each in file order); ``full`` is a uniform shuffle of the whole mixture and
therefore holds the *selected* samples (not the source datasets) in memory.

Ids. Output ids are ``NAME/ID`` and extra copies of a record ``NAME/ID#2``, ``NAME/ID#3`` ..., so ids stay unique
across datasets and copies (``medtune data check`` flags duplicate ids).

Images in ``medtune data mix`` output. Image paths in a canonical file are relative to one image root, but a
mixture has one root per dataset. ``mix`` takes the deepest directory containing every dataset's image root
(their common path), rewrites each image path relative to it (``vqa_rad/images/synpic1.jpg``), prints it and
records it as ``image_root`` in the manifest (``OUT`` with suffix ``.manifest.json``); pass it as
``--image-root`` to later commands. Image paths that are absolute or climb out of their dataset's root with
``..`` are refused (counted as skipped) rather than rewritten into something that points elsewhere.

Readers. Every dataset is read through ``medtune.data.formats.read_records`` (``canonical`` included), so a
mixture accepts any format the registry knows; GMAI-VL annotations are read as ``llava``.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import posixpath
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medtune.data.jsonl import RecordError, SampleWriter, Tally, write_json
from medtune.data.schema import Message, Part, Sample
from medtune.errors import RecipeError

SHUFFLE_MODES = ("full", "interleave", "none")
_RECIPE_KEYS = {"seed", "shuffle", "include_credentialed", "datasets"}
_DATASET_KEYS = {"name", "path", "format", "image_root", "ratio", "count", "replacement"}
CREDENTIAL_SKIP = "credentialed (images not shipped)"   # the reason the MedMax reader counts them under


@dataclass
class DatasetSpec:
    """One dataset of a mixture and how much of it to take."""

    name: str
    path: Path
    format: str | None = None        # None: detected from the file's content
    image_root: Path | None = None   # None: the format's default image root
    ratio: float | None = None       # fraction (<= 1) or multiplier (> 1) of the usable records
    count: int | None = None         # an exact number of samples instead of a ratio
    replacement: bool = False
    declared_length: int | None = None   # GMAI-VL "length": what the list claims the annotations hold
    data_augment: Any = None              # GMAI-VL "data_augment": recorded, not applied

    def __post_init__(self):
        if self.ratio is not None and self.count is not None:
            raise RecipeError(f"dataset {self.name!r}: give ratio or count, not both")
        if self.ratio is None and self.count is None:
            self.ratio = 1.0
        if self.ratio is not None and (not _is_number(self.ratio) or self.ratio < 0):
            raise RecipeError(f"dataset {self.name!r}: ratio must be a number >= 0, got {self.ratio!r}")
        if self.count is not None and (not isinstance(self.count, int) or isinstance(self.count, bool)
                                       or self.count < 0):
            raise RecipeError(f"dataset {self.name!r}: count must be an integer >= 0, got {self.count!r}")
        if not isinstance(self.replacement, bool):
            raise RecipeError(f"dataset {self.name!r}: replacement must be true or false")
        if self.format is None:
            from medtune.data.formats import detect_format
            from medtune.errors import UserError

            try:
                self.format = detect_format(self.path)
            except (UserError, FileNotFoundError) as error:
                raise RecipeError(f"dataset {self.name!r}: {error}") from None
        if self.image_root is None:
            self.image_root = default_image_root(self.format, self.path)

    def target(self, available: int) -> int:
        """How many samples this dataset contributes when ``available`` records are usable."""
        if self.count is not None:
            if available == 0 and self.count > 0:
                raise RecipeError(f"dataset {self.name!r}: count {self.count} requested but {self.path} "
                                  "has no usable records")
            return self.count
        return math.floor(self.ratio * available + 0.5)

    def describe_sampling(self, available: int) -> str:
        """How the target is met, in words, e.g. "2 whole copies + 766 drawn without replacement"."""
        target = self.target(available)
        asked = f"count {self.count}" if self.count is not None else f"ratio {self.ratio:g}"
        if self.replacement:
            return f"{asked}: {target} independent draws with replacement"
        copies, remainder = divmod(target, available) if available else (0, 0)
        parts = [f"{copies} whole {'copy' if copies == 1 else 'copies'}"] if copies else []
        if remainder or not copies:
            parts.append(f"{remainder} drawn without replacement")
        return f"{asked}: {' + '.join(parts)}"


@dataclass
class Selection:
    """Which records of a dataset are taken: each ``base`` times, plus ``extra[index]`` more."""

    base: int = 0
    extra: collections.Counter = field(default_factory=collections.Counter)

    def multiplicity(self, index: int) -> int:
        return self.base + self.extra.get(index, 0)


def select_indices(available: int, target: int, replacement: bool, rng: random.Random) -> Selection:
    """Pick ``target`` records out of ``available`` as described in the module docstring."""
    if target == 0 or available == 0:
        return Selection()
    if replacement:
        return Selection(0, collections.Counter(rng.randrange(available) for _ in range(target)))
    copies, remainder = divmod(target, available)
    return Selection(copies, collections.Counter(rng.sample(range(available), remainder)))


@dataclass
class Entry:
    """One emitted sample: its dataset, the sample as read, and which copy of it this is (1-based)."""

    dataset: DatasetSpec
    sample: Sample
    copy: int

    def renamed(self) -> Sample:
        """The sample with its mixture id (``NAME/ID``, copies ``NAME/ID#k``) and a source if it had none."""
        suffix = "" if self.copy == 1 else f"#{self.copy}"
        meta = self.sample.meta
        if meta.source is None:
            meta = dataclasses.replace(meta, source=self.dataset.name)
        return dataclasses.replace(self.sample, id=f"{self.dataset.name}/{self.sample.id}{suffix}", meta=meta)


@dataclass
class Mixture:
    """Datasets with their sampling, read lazily; ``iter_samples`` streams one deterministic mixture."""

    datasets: list[DatasetSpec]
    seed: int = 0
    shuffle: str = "full"
    include_credentialed: bool = False
    strict: bool = False
    source: Path | None = None
    _available: dict[bool, dict[str, int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        names = [d.name for d in self.datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RecipeError(f"{self.source or 'recipe'}: dataset names must be unique, repeated: {duplicates}")
        if not self.datasets:
            raise RecipeError(f"{self.source or 'recipe'}: no datasets")
        if self.shuffle not in SHUFFLE_MODES:
            raise RecipeError(f"{self.source or 'recipe'}: shuffle must be one of {SHUFFLE_MODES}, "
                              f"got {self.shuffle!r}")

    def available(self) -> dict[str, int]:
        """Usable records per dataset (first pass; cached per credential setting)."""
        key = self.include_credentialed
        if key not in self._available:
            self._available[key] = {d.name: sum(1 for _ in self._usable(d, Tally())) for d in self.datasets}
        return self._available[key]

    def targets(self) -> dict[str, int]:
        """Samples each dataset contributes (requested counts)."""
        available = self.available()
        return {d.name: d.target(available[d.name]) for d in self.datasets}

    def selections(self, seed: int) -> dict[str, Selection]:
        available, targets = self.available(), self.targets()
        return {d.name: select_indices(available[d.name], targets[d.name], d.replacement,
                                       random.Random(f"medtune-mix:{seed}:{d.name}"))
                for d in self.datasets}

    def iter_samples(self, seed: int | None = None, tally: Tally | None = None
                     ) -> Iterator[tuple[Sample, Path]]:
        """Yield ``(sample, image_root)``; image paths stay relative to their own dataset's root.

        ``seed`` None uses the recipe's seed. ``tally`` counts records read and skipped in the second pass.
        """
        for entry in self.iter_entries(seed, tally):
            yield entry.renamed(), entry.dataset.image_root

    def iter_entries(self, seed: int | None = None, tally: Tally | None = None) -> Iterator[Entry]:
        seed = self.seed if seed is None else seed
        tally = tally if tally is not None else Tally()
        selections = self.selections(seed)
        streams = {d.name: self._selected(d, selections[d.name], tally) for d in self.datasets}
        if self.shuffle == "none":
            yield from itertools.chain.from_iterable(streams[d.name] for d in self.datasets)
            return
        order_rng = random.Random(f"medtune-mix-order:{seed}")
        if self.shuffle == "full":
            entries = [entry for d in self.datasets for entry in streams[d.name]]
            order_rng.shuffle(entries)
            yield from entries
            return
        targets = self.targets()
        labels = [d.name for d in self.datasets for _ in range(targets[d.name])]
        order_rng.shuffle(labels)
        for name in labels:
            entry = next(streams[name], None)
            if entry is None:
                raise RecipeError(f"dataset {name!r}: fewer usable records on the second pass than the first; "
                                  "did the file change while mixing?")
            yield entry
        # Read each file to its end so the tally counts every record, and check nothing selected is left over.
        for name, stream in streams.items():
            if next(stream, None) is not None:
                raise RecipeError(f"dataset {name!r}: more usable records on the second pass than the first; "
                                  "did the file change while mixing?")

    def _selected(self, dataset: DatasetSpec, selection: Selection, tally: Tally) -> Iterator[Entry]:
        for index, sample in enumerate(self._usable(dataset, tally)):
            for copy in range(1, selection.multiplicity(index) + 1):
                yield Entry(dataset, sample, copy)

    def _usable(self, dataset: DatasetSpec, tally: Tally) -> Iterator[Sample]:
        """The dataset's samples minus credentialed ones (unless included) and unsafe image paths, counted."""
        for sample in read_dataset(dataset.format, dataset.path, tally=tally, strict=self.strict,
                                   include_credentialed=self.include_credentialed):
            if sample.meta.credential and not self.include_credentialed:
                tally.skip(CREDENTIAL_SKIP, f"{dataset.path}: {sample.id}")
                continue
            unsafe = next((i.path for i in sample.images if not _stays_inside(i.path)), None)
            if unsafe is not None:
                error = RecordError(dataset.path, sample.id, f"image path {unsafe!r} leaves the image root")
                if self.strict:
                    raise error
                tally.skip("image path leaves the image root", str(error))
                continue
            yield sample


def _stays_inside(path: str) -> bool:
    normal = posixpath.normpath(path.replace("\\", "/"))
    return not (posixpath.isabs(normal) or normal == ".." or normal.startswith("../"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- loading recipes

def load_mixture(recipe: str | os.PathLike | dict, *, strict: bool = False) -> Mixture:
    """A :class:`Mixture` from a mix recipe (YAML path or dict) or a GMAI-VL dataset list (JSON path or dict).

    Relative paths in a file are relative to that file's directory; in a dict, to the working directory.
    """
    if isinstance(recipe, dict):
        return _mixture_from_dict(recipe, Path.cwd(), None, strict)
    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mix recipe")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # a core dependency; imported here to keep `medtune --help` fast
            data = yaml.safe_load(text)
    except (ValueError, ImportError) as error:
        raise RecipeError(f"{path}: cannot parse ({error})") from None
    except Exception as error:  # yaml.YAMLError does not derive from ValueError
        raise RecipeError(f"{path}: cannot parse YAML ({error})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    return _mixture_from_dict(data, path.parent, path, strict)


def _mixture_from_dict(data: dict, base: Path, source: Path | None, strict: bool) -> Mixture:
    where = source or "recipe"
    if "datasets" not in data:
        return _gmai_list(data, base, source, strict)
    unknown = set(data) - _RECIPE_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown keys {sorted(unknown)} (expected {sorted(_RECIPE_KEYS)})")
    if not isinstance(data["datasets"], list):
        raise RecipeError(f"{where}: 'datasets' must be a list")
    shuffle = data.get("shuffle", "full")
    shuffle = {True: "full", False: "none"}.get(shuffle, shuffle) if isinstance(shuffle, (bool, str)) else shuffle
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"{where}: seed must be an integer, got {seed!r}")
    include = data.get("include_credentialed", False)
    if not isinstance(include, bool):
        raise RecipeError(f"{where}: include_credentialed must be true or false")
    datasets = [_dataset_spec(entry, base, where, number) for number, entry in enumerate(data["datasets"], 1)]
    return Mixture(datasets, seed=seed, shuffle=shuffle, include_credentialed=include, strict=strict,
                   source=source)


def _dataset_spec(entry: Any, base: Path, where: Any, number: int) -> DatasetSpec:
    if not isinstance(entry, dict):
        raise RecipeError(f"{where}: dataset {number} must be a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise RecipeError(f"{where}: dataset {number} needs a 'name' without '/', got {name!r}")
    unknown = set(entry) - _DATASET_KEYS
    if unknown:
        raise RecipeError(f"{where}: dataset {name!r} has unknown keys {sorted(unknown)}")
    if not isinstance(entry.get("path"), str):
        raise RecipeError(f"{where}: dataset {name!r} needs a 'path'")
    root = entry.get("image_root")
    try:
        return DatasetSpec(name=name, path=base / entry["path"], format=entry.get("format"),
                           image_root=base / root if root else None, ratio=entry.get("ratio"),
                           count=entry.get("count"), replacement=entry.get("replacement", False))
    except RecipeError as error:
        raise RecipeError(f"{where}: {error}") from None


def _gmai_list(data: dict, base: Path, source: Path | None, strict: bool) -> Mixture:
    from medtune.data.formats import gmai_vl

    where = source or "dataset list"
    datasets = []
    for entry in gmai_vl.parse_list(data, base, where):
        try:
            datasets.append(DatasetSpec(
                name=entry.name, path=entry.annotations, format=gmai_vl.ANNOTATION_FORMAT,
                image_root=entry.image_dir, ratio=entry.sample_ratio, declared_length=entry.length,
                data_augment=entry.data_augment))
        except RecipeError as error:
            raise RecipeError(f"{where}: {error}") from None
    return Mixture(datasets, source=source, strict=strict)


# ------------------------------------------------------------------------------------------- reading datasets

def read_dataset(fmt: str, path: str | os.PathLike, *, tally: Tally, strict: bool = False,
                 include_credentialed: bool = False) -> Iterator[Sample]:
    """Canonical samples from ``path`` in format ``fmt`` (any reader of the formats registry).

    Readers that drop credentialed rows themselves (MedMax: those rows ship without image paths) are asked to
    keep them when ``include_credentialed``; otherwise the mixture filters on ``meta.credential``.
    """
    from medtune.data import formats

    if fmt not in formats.FORMATS:
        raise RecipeError(f"{path}: unknown format {fmt!r} (known: {', '.join(formats.FORMATS)})")
    options = {}
    if include_credentialed and "include_credentialed" in formats.FORMATS[fmt].options:
        options["include_credentialed"] = True
    return formats.read_records(fmt, path, tally=tally, strict=strict, **options)


def default_image_root(fmt: str, path: str | os.PathLike) -> Path:
    """Where a format keeps its images by default (the registry's answer)."""
    from medtune.data import formats

    if fmt not in formats.FORMATS:
        raise RecipeError(f"{path}: unknown format {fmt!r} (known: {', '.join(formats.FORMATS)})")
    return Path(formats.default_image_root(fmt, path))


# ------------------------------------------------------------------------------------------ `medtune data mix`

def common_image_root(mixture: Mixture) -> tuple[Path, dict[str, str]]:
    """The common directory of all image roots, and each dataset's root relative to it (POSIX, '' for same)."""
    roots = {d.name: Path(os.path.abspath(d.image_root)) for d in mixture.datasets}
    common = Path(os.path.commonpath([str(r) for r in roots.values()]))
    prefixes = {name: "" if root == common else root.relative_to(common).as_posix() for name, root in roots.items()}
    return common, prefixes


def rebase_images(sample: Sample, prefix: str) -> Sample:
    """``sample`` with every image path prefixed by ``prefix`` (a folder relative to the new image root)."""
    if not prefix:
        return sample

    def moved(part: Part) -> Part:
        if part.type != "image":
            return part
        image = dataclasses.replace(part.image, path=posixpath.normpath(posixpath.join(prefix, part.image.path)))
        return Part(type="image", image=image)

    messages = [Message(m.role, tuple(moved(p) for p in m.content)) for m in sample.messages]
    return dataclasses.replace(sample, messages=messages)


def write_mixture(mixture: Mixture, out: Path, *, seed: int | None = None, progress: bool = True) -> tuple[Tally, dict]:
    """Write the mixture as canonical JSONL at ``out`` plus its manifest; return the tally and the manifest."""
    from tqdm import tqdm

    seed = mixture.seed if seed is None else seed
    tally = Tally()
    common, prefixes = common_image_root(mixture)
    targets = mixture.targets()
    written = collections.Counter()
    with SampleWriter(out, tally) as writer:
        entries = tqdm(mixture.iter_entries(seed, tally), total=sum(targets.values()), unit="sample",
                       desc="mixing", disable=not progress)
        for entry in entries:
            writer.write(rebase_images(entry.renamed(), prefixes[entry.dataset.name]))
            written[entry.dataset.name] += 1
    manifest = _manifest(mixture, seed, common, prefixes, written, tally)
    write_json(manifest_path(out), manifest)
    return tally, manifest


def manifest_path(out: str | os.PathLike) -> Path:
    return Path(out).with_suffix(".manifest.json")


def _manifest(mixture: Mixture, seed: int, common: Path, prefixes: dict[str, str],
              written: collections.Counter, tally: Tally) -> dict:
    available, targets = mixture.available(), mixture.targets()
    datasets = []
    for d in mixture.datasets:
        info = {"name": d.name, "path": os.path.abspath(d.path), "format": d.format,
                "image_root": os.path.abspath(d.image_root), "image_prefix": prefixes[d.name],
                "sampling": d.describe_sampling(available[d.name]),
                "ratio": d.ratio, "count": d.count, "replacement": d.replacement,
                "available": available[d.name], "requested": targets[d.name], "written": written[d.name]}
        if d.declared_length is not None:
            info["declared_length"] = d.declared_length
        if d.data_augment is not None:
            info["data_augment"] = d.data_augment
        datasets.append(info)
    return {"recipe": os.path.abspath(mixture.source) if mixture.source else None, "seed": seed,
            "shuffle": mixture.shuffle,
            "include_credentialed": mixture.include_credentialed, "image_root": str(common),
            "datasets": datasets, "tally": tally.to_dict()}
