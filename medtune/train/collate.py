"""Batching encoded samples: pad to the longest sample (right for training, left for generation).

Samples with no image, one image or several mix freely: every image-side tensor (``pixel_values`` and, for
native VLMs, e.g. ``image_grid_thw``) is concatenated over the batch's images in sample order, which is the
order in which LLaVA-style models scatter image features into image-token positions (row-major over the
batch). A batch without any image carries no ``pixel_values`` key.

Inputs are what :func:`medtune.models.processing.encode_sample` returns: lists of ints for the token
columns, tensors (or None) for the image columns.
"""
from __future__ import annotations

from typing import Any, Sequence

IGNORE_INDEX = -100
TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


def _image_columns(examples: Sequence[dict]) -> dict[str, Any]:
    """Concatenate each image-side tensor column over the samples that have one (dim 0 = images/patches)."""
    import torch

    columns: dict[str, list] = {}
    for example in examples:
        for key, value in example.items():
            if key in TOKEN_KEYS or key == "position_ids" or value is None:
                continue
            if not isinstance(value, torch.Tensor):
                continue  # bookkeeping columns (ids, lengths, image references) stay out of the batch
            columns.setdefault(key, []).append(value)
    return {key: torch.cat(values, dim=0) for key, values in columns.items()}


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
    return batch


class PadCollator:
    """A DataCollator for Trainer: right padding to the longest sample (``pad_to_multiple_of`` for kernels)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        return pad_batch(examples, self.pad_token_id, padding_side="right",
                         pad_to_multiple_of=self.pad_to_multiple_of)


def collate_prompts(prompts: Sequence[dict], pad_token_id: int) -> dict[str, Any]:
    """Left-padded batch of generation prompts (each from ``encode_prompt``; tensors of shape [1, L] allowed).

    Left padding keeps every prompt's last token in the last column, where generation continues.
    """
    flat = []
    for prompt in prompts:
        item = dict(prompt)
        for key in ("input_ids", "attention_mask"):
            value = item.get(key)
            if value is not None and hasattr(value, "dim") and value.dim() == 2:
                item[key] = value[0].tolist()
        item.pop("labels", None)
        flat.append(item)
    return pad_batch(flat, pad_token_id, padding_side="left")
