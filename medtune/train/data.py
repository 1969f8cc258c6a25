"""A stage's training data: canonical file or mixture -> encoded (cached) samples -> batches for Trainer.

Design choices:

* Samples are read through the format registry (``medtune.data.formats``) or a mixture
  (``medtune.data.mixture``) and encoded once, before training, with the model's own template. Composed
  models go through the Arrow token cache (``medtune.train.cache``): a second run or a second stage on the
  same data and tokenizer skips encoding and reports the same skips. A sample that cannot be used (too long,
  no reply, unreadable image) is counted in the stage's Tally with its reason, never dropped silently; with
  ``strict`` the first one stops the run. Native VLMs (their own processor) are encoded in memory.
* Pixels are not kept: rows hold image references and images are decoded when the DataLoader asks for them.
* Batches are padded (``collate.PadCollator``) or packed (``packing.PackedDataset`` + ``PackingCollator``).
* Every batch runs the vision tower. Under sharded training (FSDP, ZeRO-3) each rank must take part in the
  vision tower's all-gathers every step, and under DDP a projector without gradients on one rank breaks
  gradient reduction; a batch of text-only samples on one rank would hang the others. :class:`KeepVisionBusy`
  therefore gives a text-only batch one blank image whose tokens sit in masked padding positions (attention
  0, label -100; with packing, a separate sequence of its own): the vision tower and projector run and
  receive zero gradient, and no real token can see the blank image, so the loss is unchanged.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from medtune.data.jsonl import Tally
from medtune.train.recipe import DataSpec, RecipeError, resolve_data_path

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---- reading --------------------------------------------------------------------------------------------


def iter_stage_samples(spec: DataSpec, tally: Tally, *, seed: int = 0) -> Iterator[tuple[Any, Path]]:
    """``(sample, image_root)`` pairs of a stage's data, at most ``spec.limit`` of them."""
    if spec.mixture is not None:
        from medtune.data.mixture import load_mixture

        stream = load_mixture(resolve_data_path(spec.mixture)).iter_samples(seed=seed, tally=tally)
    else:
        from medtune.data.formats import default_image_root, read_records

        path = resolve_data_path(spec.path)
        root = Path(spec.image_root) if spec.image_root else default_image_root(spec.format, path)
        stream = ((sample, root) for sample in read_records(spec.format, path, tally=tally, strict=spec.strict))
    return itertools.islice(stream, spec.limit) if spec.limit else stream


def data_files(spec: DataSpec) -> list[Path]:
    """The files whose content a stage's encoded data depends on (the token cache's key)."""
    if spec.mixture is None:
        path = resolve_data_path(spec.path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file (stage data.path)")
        return [path]
    from medtune.data.mixture import load_mixture

    mixture_file = resolve_data_path(spec.mixture)
    return [mixture_file, *(Path(d.path) for d in load_mixture(mixture_file).datasets)]


# ---- encoding -------------------------------------------------------------------------------------------


def stage_dataset(spec: DataSpec, vlm, *, max_length: int, seed: int, cache_dir: str | Path | None,
                  progress: bool = True):
    """(dataset, tally): encoded rows of a stage's data; ``dataset[i]`` decodes row i's images."""
    if vlm.template == "native":
        tally = Tally()
        return encode_in_memory(spec, vlm, max_length=max_length, tally=tally, seed=seed), tally
    from medtune.train.cache import CachedDataset, encode_with_cache

    files = data_files(spec)
    reader_tally = Tally()
    encoded = encode_with_cache(
        lambda: iter_stage_samples(spec, reader_tally, seed=seed), vlm, data_files=files,
        cache_dir=cache_dir or default_cache_dir(), max_length=max_length, truncation=spec.truncation,
        # paths, not only contents: relative image paths resolve against the data file's location
        extra={"paths": [str(f.resolve()) for f in files], "format": spec.format, "image_root": spec.image_root,
               "limit": spec.limit, "seed": seed},
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
    """Rows kept in memory as the processor made them (native VLMs)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    @property
    def lengths(self) -> list[int]:
        return [len(row["input_ids"]) for row in self.rows]


def encode_in_memory(spec: DataSpec, vlm, *, max_length: int, tally: Tally, seed: int = 0) -> EncodedDataset:
    from medtune.models.processing import SkipSample, encode_sample

    rows = []
    for sample, root in iter_stage_samples(spec, tally, seed=seed):
        try:
            rows.append(encode_sample(sample, vlm, root, max_length=max_length, truncation=spec.truncation))
        except SkipSample as skip:
            if spec.strict:
                raise RecipeError(f"sample {sample.id}: {skip}") from None
            tally.skip(skip.reason, f"{sample.id}: {skip}")
    tally.written += len(rows)
    if not rows:
        raise RecipeError(f"no usable training samples ({tally.summary()})")
    return EncodedDataset(rows)


def count_tokens(dataset) -> tuple[int, int]:
    """(all tokens, trained tokens) over an encoded dataset, without decoding images."""
    rows = dataset.rows
    labels = rows["labels"] if hasattr(rows, "column_names") else [r["labels"] for r in rows]
    total = sum(dataset.lengths)
    trained = sum(sum(1 for label in row if label != IGNORE_INDEX) for row in labels)
    return total, trained


# ---- batching -------------------------------------------------------------------------------------------


@dataclass
class KeepVisionBusy:
    """Wrap a collator so a batch without images still runs the vision tower (see module docstring)."""

    collator: Callable[[list[dict]], dict]
    image_token_id: int
    tokens_per_image: int
    image_size: int
    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        if batch.get("pixel_values") is not None:
            return batch
        return add_blank_image(batch, self.image_token_id, self.tokens_per_image, self.image_size,
                               self.pad_token_id)


def add_blank_image(batch: dict, image_token_id: int, tokens_per_image: int, image_size: int,
                    pad_token_id: int) -> dict:
    """Append ``tokens_per_image`` masked columns; row 0 holds a blank image's tokens there."""
    import torch

    rows = batch["input_ids"].shape[0]
    extra_ids = torch.full((rows, tokens_per_image), pad_token_id, dtype=torch.long)
    extra_ids[0] = image_token_id
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], extra_ids], dim=1)
    out["labels"] = torch.cat([batch["labels"], torch.full_like(extra_ids, IGNORE_INDEX)], dim=1)
    if "attention_mask" in batch:
        out["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros_like(extra_ids)], dim=1)
    if "position_ids" in batch:   # packed rows: the blank image is a sequence of its own
        positions = torch.arange(tokens_per_image).expand(rows, -1)
        out["position_ids"] = torch.cat([batch["position_ids"], positions], dim=1)
    out["pixel_values"] = torch.zeros(1, 3, image_size, image_size)
    return out


def make_collator(vlm, *, packing: bool = False, max_length: int | None = None) -> Callable[[list], dict]:
    """The batch collator for a stage (padding, or packing), made to always run the vision tower."""
    from medtune.train.collate import PadCollator
    from medtune.train.packing import PackingCollator

    pad_id = vlm.tokenizer.pad_token_id
    collator = PackingCollator(vlm, max_length=max_length) if packing else PadCollator(pad_id)
    if vlm.image_tokens_per_image is None:   # native VLMs: their processors decide image shapes
        return collator
    return KeepVisionBusy(collator, vlm.image_token_id, vlm.image_tokens_per_image, vlm.image_size, pad_id)


def training_rows(dataset, *, packing: bool, max_length: int):
    """What Trainer iterates: samples, or (packing) rows of samples planned to fill ``max_length``."""
    if not packing:
        return dataset
    from medtune.train.packing import PackedDataset

    return PackedDataset(dataset, max_length, lengths=dataset.lengths)
