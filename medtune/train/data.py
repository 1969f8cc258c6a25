"""A stage's training data: canonical file or mixture -> encoded (cached) samples -> batches for Trainer.

Design choices:

* Samples are read through the format registry (``medtune.data.formats``) or a mixture
  (``medtune.data.mixture``) and encoded once, before training, by the model's kind
  (:mod:`medtune.models.kinds`). Kinds whose encoded samples are cacheable go through the Arrow token cache
  (``medtune.train.cache``): a second run or a second stage on the same data and tokenizer skips encoding and
  reports the same skips; the others (native VLMs, whose processor outputs depend on the images) are encoded
  in memory. A sample that cannot be used (too long, no reply, unreadable image) is counted in the stage's
  Tally with its reason, never dropped silently; with ``strict`` the first one stops the run.
* Pixels are not kept in the cache: rows hold image references and images are decoded when the DataLoader
  asks for them.
* Rows are samples, or (packing) ``packing.PackedDataset`` rows; the kind chooses the collator.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Iterator

from medtune.data.jsonl import Tally
from medtune.models.batch import IGNORE_INDEX
from medtune.errors import RecipeError
from medtune.paths import resolve_data_path

log = logging.getLogger(__name__)


# ---- reading --------------------------------------------------------------------------------------------


def iter_stage_samples(spec, tally: Tally, *, seed: int = 0, mixture=None) -> Iterator[tuple[Any, Path]]:
    """``(sample, image_root)`` pairs of a stage's data, at most ``spec.limit`` of them (``mixture``: the stage's
    mixture when the caller has loaded it already, so that its datasets' formats are detected once)."""
    if spec.mixture is not None:
        stream = (mixture or stage_mixture(spec)).iter_samples(seed=seed, tally=tally)
    else:
        from medtune.data.formats import default_image_root, read_records, resolve_format

        path = resolve_data_path(spec.path)
        fmt = resolve_format(spec.format, path)   # not given: detected from the content (ambiguity is an error)
        root = Path(spec.image_root) if spec.image_root else default_image_root(fmt, path)
        stream = ((sample, root) for sample in read_records(fmt, path, tally=tally, strict=spec.strict))
    if spec.image_codes:
        stream = with_image_codes(stream, resolve_data_path(spec.image_codes))
    return itertools.islice(stream, spec.limit) if spec.limit else stream


def with_image_codes(pairs, codes_file: Path):
    """Samples carrying their images' precomputed codes (meta.extra ``image_tokens``, one list per image) where
    the codes file has them: by (sample id, image index), or by image path (MedMax's Parquet)."""
    import dataclasses

    from medtune.models.tokenize_images import read_codes

    codes = read_codes(codes_file)
    for sample, root in pairs:
        found = [codes.get((sample.id, index), codes.get(ref.path)) for index, ref in enumerate(sample.images)]
        if sample.images and all(row is not None for row in found):
            meta = dataclasses.replace(sample.meta, extra={**sample.meta.extra, "image_tokens": found})
            sample = dataclasses.replace(sample, meta=meta)
        yield sample, root


def stage_mixture(spec):
    """The stage's mixture, loaded (each dataset's format detected where the mixture names none)."""
    from medtune.data.mixture import load_mixture

    return load_mixture(resolve_data_path(spec.mixture))


def data_files(spec, mixture=None) -> list[Path]:
    """The files whose content a stage's encoded data depends on (the token cache's key)."""
    codes = [resolve_data_path(spec.image_codes)] if spec.image_codes else []
    if spec.mixture is None:
        path = resolve_data_path(spec.path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file (stage data.path)")
        return [path, *codes]
    mixture = mixture or stage_mixture(spec)
    return [resolve_data_path(spec.mixture), *(Path(d.path) for d in mixture.datasets), *codes]


# ---- encoding -------------------------------------------------------------------------------------------


def stage_dataset(spec, vlm, *, max_length: int, seed: int, cache_dir: str | Path | None,
                  progress: bool = True):
    """(dataset, tally): encoded rows of a stage's data; ``dataset[i]`` decodes row i's images."""
    try:
        vlm.use_label_rule(spec.labels)
    except ValueError as error:
        raise RecipeError(f"data.{error}") from None
    if vlm.cache_settings() is None:
        tally = Tally()
        return encode_in_memory(spec, vlm, max_length=max_length, tally=tally, seed=seed), tally
    from medtune.train.cache import CachedDataset, encode_with_cache

    mixture = stage_mixture(spec) if spec.mixture is not None else None   # read once, for the key and the samples
    files = data_files(spec, mixture)
    reader_tally = Tally()
    encoded = encode_with_cache(
        lambda: iter_stage_samples(spec, reader_tally, seed=seed, mixture=mixture), vlm, data_files=files,
        cache_dir=cache_dir or default_cache_dir(), max_length=max_length, truncation=spec.truncation,
        # paths, not only contents: relative image paths resolve against the data file's location
        extra={"paths": [str(f.resolve()) for f in files], "format": spec.format, "image_root": spec.image_root,
               "limit": spec.limit, "seed": seed, "labels": spec.labels},
        strict=spec.strict, progress=progress)
    tally = _with_reader_skips(encoded, reader_tally)
    if encoded.from_cache:
        log.info("encoded data from the token cache %s", encoded.path)
    if len(encoded.rows) == 0:
        raise RecipeError(f"no usable training samples in {files[0]} ({tally.summary()})")
    return CachedDataset(encoded.rows, vlm), tally


READER_TALLY = "reader-tally.json"


def _with_reader_skips(encoded, reader_tally: Tally) -> Tally:
    """The encoder's Tally plus the records the reader skipped (bad JSON, bad schema), cached beside it.

    The token cache counts what reached the encoder; records the format reader rejected never did, so their
    count is stored next to the cache entry on a cold run and read back on a warm one.
    """
    import collections
    import json

    from medtune.data.jsonl import write_json

    sidecar = Path(encoded.path) / READER_TALLY
    if not encoded.from_cache:
        write_json(sidecar, {"read": reader_tally.read, "skipped": dict(reader_tally.skipped),
                             "examples": reader_tally.examples})
    saved = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    tally = encoded.tally
    merged = Tally(read=max(tally.read, saved.get("read", 0)), written=tally.written,
                   skipped=tally.skipped + collections.Counter(saved.get("skipped", {})),
                   examples={**saved.get("examples", {}), **tally.examples}, notes=list(tally.notes))
    return merged


def default_cache_dir() -> Path:
    from medtune.models.tokenizer import cache_root

    return cache_root() / "tokens"


class EncodedDataset:
    """Rows kept in memory as the model's kind encoded them (kinds whose samples are not cacheable)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    @property
    def lengths(self) -> list[int]:
        return [len(row["input_ids"]) for row in self.rows]


def encode_in_memory(spec, vlm, *, max_length: int, tally: Tally, seed: int = 0) -> EncodedDataset:
    return EncodedDataset(encode_each(
        spec, lambda sample, root: vlm.encode_sample(sample, root, max_length=max_length, truncation=spec.truncation),
        tally=tally, seed=seed, what="training samples"))


def encode_each(spec, encode, *, tally: Tally, seed: int = 0, what: str) -> list:
    """``encode(sample, image_root)`` of every sample of the stage's data, kept in memory. A sample it refuses
    (:class:`~medtune.models.processing.SkipSample`) is counted in ``tally`` with its reason, or stops the run
    with ``strict``; no usable row at all is an error naming ``what`` was looked for."""
    from medtune.models.processing import SkipSample

    rows = []
    for sample, root in iter_stage_samples(spec, tally, seed=seed):
        try:
            rows.append(encode(sample, root))
        except SkipSample as skip:
            if spec.strict:
                raise RecipeError(f"sample {sample.id}: {skip}") from None
            tally.skip(skip.reason, f"{sample.id}: {skip}")
    tally.written += len(rows)
    if not rows:
        raise RecipeError(f"no usable {what} ({tally.summary()})")
    return rows


def count_tokens(dataset) -> tuple[int, int]:
    """(all tokens, trained tokens) over an encoded dataset, without decoding images."""
    rows = dataset.rows
    labels = rows["labels"] if hasattr(rows, "column_names") else [r["labels"] for r in rows]
    total = sum(dataset.lengths)
    trained = sum(sum(1 for label in row if label != IGNORE_INDEX) for row in labels)
    return total, trained
