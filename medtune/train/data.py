"""A stage's training data: canonical file or mixture -> encoded samples -> batches for Trainer.

Design choices:

* Samples are read through the format registry (``medtune.data.formats``) or a mixture
  (``medtune.data.mixture``) and encoded once, before training, with the model's own template
  (``medtune.models.processing``). A sample that cannot be used (too long, no reply, unreadable image) is
  counted in the stage's :class:`~medtune.data.jsonl.Tally` with its reason, never dropped silently; with
  ``strict`` the first one stops the run.
* Token ids are kept in memory, pixels are not: a row keeps its image references and its image root and
  decodes the images when the DataLoader asks for it, so memory does not grow with image size. Images are
  decoded once during encoding too, so a broken image is counted at the start rather than crashing step 9,000.
* Every batch runs the vision tower. Under sharded training (FSDP, ZeRO-3) each rank must take part in the
  vision tower's all-gathers every step, and under DDP a projector without gradients on one rank breaks
  gradient reduction; a batch of text-only samples on one rank would hang the others. :class:`KeepVisionBusy`
  therefore gives a text-only batch one blank image whose tokens sit in masked padding positions (attention
  0, label -100): the vision tower and projector run and receive zero gradient, and no real token can see the
  blank image, so the loss is unchanged.
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
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file (stage data.path)")
        root = Path(spec.image_root) if spec.image_root else default_image_root(spec.format, path)
        stream = ((sample, root) for sample in read_records(spec.format, path, tally=tally, strict=spec.strict))
    return itertools.islice(stream, spec.limit) if spec.limit else stream


# ---- encoding -------------------------------------------------------------------------------------------


class EncodedDataset:
    """Encoded rows (ids, labels, image references); ``dataset[i]`` decodes row i's images."""

    def __init__(self, rows: list[dict], vlm):
        self.rows = rows
        self.vlm = vlm

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        from medtune.models.processing import load_pixel_values

        row = self.rows[index]
        item = {"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]),
                "labels": row["labels"]}
        if row.get("pixel_values") is not None:      # native VLMs: kept as the processor made them
            item["pixel_values"] = row["pixel_values"]
        elif row["images"]:
            item["pixel_values"] = load_pixel_values(row["images"], self.vlm, row["image_root"])
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(row["input_ids"]) for row in self.rows]

    def count_tokens(self) -> tuple[int, int]:
        """(all tokens, trained tokens) over the dataset."""
        total = sum(len(r["input_ids"]) for r in self.rows)
        trained = sum(sum(1 for label in r["labels"] if label != IGNORE_INDEX) for r in self.rows)
        return total, trained


def encode_stage_data(spec: DataSpec, vlm, *, max_length: int, tally: Tally, seed: int = 0,
                      progress: bool = True) -> EncodedDataset:
    """Read and encode a stage's samples; unusable samples are counted in ``tally`` (raised when strict)."""
    from tqdm.auto import tqdm

    from medtune.models.processing import SkipSample, encode_sample, encode_text, load_pixel_values

    rows = []
    samples = iter_stage_samples(spec, tally, seed=seed)
    for sample, root in tqdm(samples, desc="encoding", unit=" samples", disable=not progress, leave=False):
        try:
            if vlm.template == "native":
                row = encode_sample(sample, vlm, root, max_length=max_length, truncation=spec.truncation)
            else:
                row = encode_text(sample, vlm, max_length=max_length, truncation=spec.truncation)
                load_pixel_values(sample.images, vlm, root)   # decode once now: a bad image is counted here
                row["pixel_values"] = None
            row.update(images=sample.images, image_root=str(root))
        except SkipSample as skip:
            if spec.strict:
                raise RecipeError(f"sample {sample.id}: {skip}") from None
            tally.skip(skip.reason, f"{sample.id}: {skip}")
            continue
        rows.append(row)
    tally.written += len(rows)
    if not rows:
        raise RecipeError(f"no usable training samples ({tally.summary()})")
    return EncodedDataset(rows, vlm)


# ---- batching -------------------------------------------------------------------------------------------


def pad_batch(features: list[dict], pad_token_id: int) -> dict:
    """Right-pad ids / mask / labels to the longest row; stack the images of all rows in row order."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for feature in features:
        missing = longest - len(feature["input_ids"])
        batch["input_ids"].append(list(feature["input_ids"]) + [pad_token_id] * missing)
        batch["attention_mask"].append(list(feature["attention_mask"]) + [0] * missing)
        batch["labels"].append(list(feature["labels"]) + [IGNORE_INDEX] * missing)
    batch = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    images = [torch.as_tensor(f["pixel_values"]) for f in features if f.get("pixel_values") is not None]
    if images:
        batch["pixel_values"] = torch.cat([i if i.dim() == 4 else i.unsqueeze(0) for i in images])
    return batch


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


def make_collator(vlm, *, packing: bool = False, max_length: int | None = None) -> Callable[[list[dict]], dict]:
    """The batch collator for a composed VLM (padding, or packing), made to always run the vision tower."""
    pad_id = vlm.tokenizer.pad_token_id
    if packing:
        collator = _packing_collator(vlm, max_length)
    else:
        collator = lambda features: pad_batch(features, pad_id)  # noqa: E731
    if vlm.image_tokens_per_image is None:   # native VLMs: their processors decide image shapes
        return collator
    return KeepVisionBusy(collator, vlm.image_token_id, vlm.image_tokens_per_image, vlm.image_size, pad_id)


def _packing_collator(vlm, max_length):
    try:
        from medtune.train import packing
    except ImportError:
        raise RecipeError("packing: medtune.train.packing is not available in this install") from None
    return packing.PackingCollator(vlm, max_length=max_length)
