"""Batching encoded samples: pad to the longest sample (right for training, left for generation).

Samples with no image, one image or several mix freely: every image-side tensor (``pixel_values`` and, for
native VLMs, e.g. ``image_grid_thw``) is concatenated over the batch's images in sample order, which is the
order in which LLaVA-style models scatter image features into image-token positions (row-major over the
batch). A batch without any image carries no ``pixel_values`` key.

Inputs are what a model kind's ``encode_sample`` returns (:mod:`medtune.models.kinds`): lists of ints for the
token columns, tensors (or None) for the image columns, and, when the kind carries sample metadata, a
``sample_metadata`` dict, which the batch keeps as a list in sample order, with ``sample_index`` ([B, L]: the
sample each position holds, -1 for padding). The model never sees either: the kind's training loss takes them
out.

:class:`KeepVisionBusy` wraps a collator so that a batch without images still runs the vision tower. Under
sharded training (FSDP, ZeRO-3) each rank must take part in the vision tower's all-gathers every step, and under
DDP a projector without gradients on one rank breaks gradient reduction; a batch of text-only samples on one
rank would hang the others. A text-only batch therefore gets one blank image whose tokens sit in masked padding
positions (attention 0, label -100; with packing, a separate sequence of its own): the vision tower and
projector run and receive zero gradient, and no real token can see the blank image, so the loss is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from medtune.models.batch import IGNORE_INDEX, SAMPLE_INDEX, SAMPLE_METADATA, TOKEN_KEYS


def _image_columns(examples: Sequence[dict]) -> dict[str, Any]:
    """Concatenate each image-side tensor column over the samples that have one (dim 0 = images/patches)."""
    import torch

    columns: dict[str, list] = {}
    for example in examples:
        for key, value in example.items():
            if key in TOKEN_KEYS or key in ("position_ids", SAMPLE_METADATA, SAMPLE_INDEX) or value is None:
                continue
            if not isinstance(value, torch.Tensor):
                continue  # bookkeeping columns (ids, lengths, image references) stay out of the batch
            columns.setdefault(key, []).append(value)
    return {key: torch.cat(values, dim=0) for key, values in columns.items()}


def sample_metadata(examples: Sequence[dict]) -> dict[str, list]:
    """``{"sample_metadata": [one dict per sample]}`` when the samples carry metadata, else nothing."""
    if not any(SAMPLE_METADATA in example for example in examples):
        return {}
    return {SAMPLE_METADATA: [example.get(SAMPLE_METADATA) for example in examples]}


def pad_batch(examples: Sequence[dict], pad_token_id: int, *, padding_side: str = "right",
              pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """[B, L] input_ids / attention_mask (/ labels when present), padded to the longest sample."""
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be right or left, got {padding_side!r}")
    if not examples:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    has_labels = all("labels" in example for example in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        where = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[row, where] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, where] = torch.as_tensor(example.get("attention_mask", [1] * n), dtype=torch.long)
        if has_labels:
            labels[row, where] = torch.as_tensor(example["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if has_labels:
        batch["labels"] = labels
    batch.update(_image_columns(examples))
    carried = sample_metadata(examples)
    if carried:
        carried[SAMPLE_INDEX] = torch.where(attention_mask.bool(), torch.arange(len(examples))[:, None], -1)
    batch.update(carried)
    return batch


class PadCollator:
    """A DataCollator for Trainer: right padding to the longest sample (``pad_to_multiple_of`` for kernels)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        return pad_batch(examples, self.pad_token_id, padding_side="right",
                         pad_to_multiple_of=self.pad_to_multiple_of)


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
    if SAMPLE_INDEX in batch:     # the blank image belongs to no sample
        out[SAMPLE_INDEX] = torch.cat([batch[SAMPLE_INDEX], torch.full_like(extra_ids, -1)], dim=1)
    out["pixel_values"] = torch.zeros(1, 3, image_size, image_size)
    return out


# ---- prompts for generation: left padding ------------------------------------------------------------------


def flat_ids(value) -> list[int]:
    """input_ids as a flat list whether the encoder returned a list, a (L,) or a (1, L) tensor."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if value and isinstance(value[0], list):
        if len(value) != 1:
            raise ValueError(f"encode_prompt returned {len(value)} rows for one conversation")
        value = value[0]
    return [int(v) for v in value]


def collate_prompts(encodings: list[dict], pad_token_id: int, model) -> dict:
    """Prompts for generation as one batch: per-token tensors padded on the left; image tensors concatenated along dim 0.

    input_ids, attention_mask and any other (1, L) per-token tensor a processor returns (token_type_ids,
    mm_token_type_ids) become (B, L_max), padded on the left; pixel_values (sum of images, ...) in the model's
    dtype; other tensors (image_sizes, image_grid_thw) are concatenated as they are. Encodings without images
    contribute nothing to those.
    """
    import torch

    rows = [flat_ids(e["input_ids"]) for e in encodings]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    skip = {"input_ids", "attention_mask", "labels"}
    for key in sorted({k for e in encodings for k in e} - skip):
        parts = [torch.as_tensor(e[key]) for e in encodings if e.get(key) is not None]
        if not parts:
            continue
        per_token = len(parts) == len(rows) and all(p.dim() == 2 and p.shape == (1, len(r))
                                                     for p, r in zip(parts, rows))
        if per_token:
            value = torch.zeros((len(rows), width), dtype=parts[0].dtype)
            for i, (part, row) in enumerate(zip(parts, rows)):
                value[i, width - len(row):] = part[0]
        else:
            value = torch.cat(parts, dim=0)
        if value.is_floating_point():
            value = value.to(model.dtype)
        batch[key] = value
    return {key: value.to(model.device) for key, value in batch.items()}
