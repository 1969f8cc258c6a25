"""The building blocks of canonical sample -> model inputs, shared by the model kinds (medtune.models.kinds).

Each kind assembles its inputs from these; they hold the choices that must not differ between kinds:

* Text goes through the model's chat template (:mod:`medtune.models.templates`) and is tokenised in ONE call
  on the whole rendered string, exactly as ``tokenizer.apply_chat_template(tokenize=True)`` does, so training
  ids equal serving ids. Labels come from the template's trainable segments mapped onto tokens through the
  tokenizer's character offsets (a token is trained when its last character lies in an assistant reply).
* An image placeholder (one special token) is expanded to a fixed number of copies after tokenisation
  (:func:`expand_image_tokens`): LLaVA-style models scatter one image feature into each copy, in order.
* Truncation never cuts image tokens. A sample over ``max_length`` is either dropped (``truncation="drop"``)
  or cut at the end (``"text"``) when what is kept still holds every image token and at least one trained
  token; otherwise :class:`SkipSample` says why, and callers count it in their Tally.
* Pixels come from the image processor the checkpoint saves (transformers' LlavaImageProcessor, made by
  :func:`medtune.models.vision.squaring_image_processor`), which makes an image square as ``pad_mode`` says
  (``pad`` on the LLaVA background colour, ``resize``, ``crop``) and normalises it; medtune has no pixel code of
  its own, so plain transformers and vLLM compute the same pixels. Images are decoded late
  (:func:`load_images`), so a tokenised cache stores ids and image references, not pixels.
"""
from __future__ import annotations

import bisect
import os
from typing import Sequence

from medtune.models.batch import IGNORE_INDEX
from medtune.models.templates import Segment

TRUNCATION_MODES = ("text", "drop")


class SkipSample(Exception):
    """A sample that cannot be used as it is; ``reason`` is the short phrase counted in the run's summary."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


# --------------------------------------------------------------------------------------------------------------
# Tokens and labels

def tokenize_segments(segments: Sequence[Segment], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the concatenated segments and, per token, whether it is trained.

    The ids are those of one tokenizer call on the whole text (no special tokens added), so they equal
    ``apply_chat_template(tokenize=True)``; segment boundaries never change the tokenisation.
    """
    text = "".join(segment.text for segment in segments)
    ends, flags, position = [], [], 0  # segment i covers characters [ends[i-1], ends[i])
    for segment in segments:
        position += len(segment.text)
        ends.append(position)
        flags.append(segment.trainable)
    if not getattr(tokenizer, "is_fast", False):
        return _tokenize_by_prefixes(segments, tokenizer)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trainable = []
    for start, end in encoding["offset_mapping"]:
        last_char = end - 1 if end > start else start
        trainable.append(flags[min(bisect.bisect_right(ends, last_char), len(flags) - 1)] if flags else False)
    return list(encoding["input_ids"]), trainable


def _tokenize_by_prefixes(segments: Sequence[Segment], tokenizer) -> tuple[list[int], list[bool]]:
    """Fallback for tokenizers without offsets: a segment owns the tokens its prefix adds."""
    text = "".join(segment.text for segment in segments)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    trainable, prefix, done = [False] * len(ids), "", 0
    for segment in segments:
        prefix += segment.text
        count = min(len(tokenizer(prefix, add_special_tokens=False)["input_ids"]), len(ids))
        trainable[done:count] = [segment.trainable] * (count - done)
        done = max(done, count)
    return ids, trainable


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int,
                        tokens_per_image: int) -> tuple[list[int], list[int]]:
    """Replace each image placeholder by ``tokens_per_image`` copies (labels ignored there)."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        if token == image_token_id:
            out_ids += [image_token_id] * tokens_per_image
            out_labels += [IGNORE_INDEX] * tokens_per_image
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def truncate(ids: list[int], labels: list[int], image_token_id: int, *, max_length: int,
             truncation: str) -> tuple[list[int], list[int]]:
    """Cut trailing text to ``max_length`` if that keeps every image token and a trained token, else skip."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if len(ids) <= max_length:
        return ids, labels
    if truncation == "drop":
        raise SkipSample("too long", f"{len(ids)} tokens > max_length {max_length}")
    kept_images = ids[:max_length].count(image_token_id)
    if kept_images != ids.count(image_token_id):
        raise SkipSample("too long", f"{len(ids)} tokens; cutting to {max_length} would cut image tokens")
    # labels[0] is never predicted (nothing comes before it), so it does not count as a trained token
    if all(label == IGNORE_INDEX for label in labels[1:max_length]):
        raise SkipSample("too long", f"{len(ids)} tokens; nothing to train on in the first {max_length}")
    return ids[:max_length], labels[:max_length]


# --------------------------------------------------------------------------------------------------------------
# Images

def _load_image(ref, image_root, allowed_roots):
    """One image as RGB PIL (PNG/JPEG/DICOM/NIfTI, path guard, pixel limit: medtune.data.images)."""
    from medtune.data.images import load_image

    return load_image(ref, image_root, allowed_roots=allowed_roots)


def load_images(image_refs: list, image_root: str | os.PathLike, *, allowed_roots=()) -> list:
    """Decode a sample's images; an unreadable or out-of-root image becomes SkipSample("bad image")."""
    images = []
    for ref in image_refs:
        try:
            images.append(_load_image(ref, image_root, allowed_roots))
        except (OSError, ValueError) as error:  # ImageError is a ValueError; PIL raises OSError subclasses
            raise SkipSample("bad image", str(error)) from error
    return images
