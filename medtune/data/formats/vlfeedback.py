"""VLFeedback (Li et al., 2023; the Silkie model's data): ranked replies from several models, read as preference
pairs. Read only.

Layout, from the dataset card of MMInstruction/VLFeedback (``vlfeedback_80k.jsonl``; images in
``merged_images.zip``): ``id``, ``prompt`` (the instruction, without an image placeholder), ``models``,
``img_path`` (relative to the extracted images folder: pass it as the image root) and ``completions``, one per
model, each ``{"annotations": {aspect: {"Rating": "1".."5", "Rationale": ...}}, "model": ..., "response": ...}``
over three aspects (Helpfulness, Visual Faithfulness, Ethical Considerations). The same rows as Parquet (a
``datasets`` export, where ``image`` holds the picture and ``completions`` may be stored column-wise, a mapping of
lists) read too; images in Parquet are written beside the file as for every Parquet release.

Pairs are made as the Silkie authors' ``run_dpo.py`` makes them (vlf-silkie/VLFeedback at de0bff3): every two
completions of a prompt are compared by the mean of their aspects' ratings; the higher is chosen, the lower
rejected, a tie gives no pair. A completion with a rating that is not a number takes part in no pair (counted as
``unrated completion``); a prompt that gives no pair at all is skipped and counted (``no preference``). Each pair is
one preference sample (the user turn is the image then the prompt; ``method: dpo`` / ``simpo`` / ``orpo`` train
on them) with id ``<id>/<i>-<j>`` (the completions' positions, chosen first), the two models and mean ratings in
``meta.extra``.
"""
from __future__ import annotations

import itertools
import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from medtune.data.formats import parquet
from medtune.data.formats.records import Skip, convert_records, iter_records, record_id, require, text_value
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Message, Metadata, Part, Sample, qa_sample

READS_PARQUET = True
UNRATED = "unrated completion"


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False) -> Iterator[Sample]:
    convert = partial(vlfeedback_pairs, path=path, tally=tally)
    for pairs in convert_records(path, parquet.records_or(path, iter_records), convert, tally=tally, strict=strict):
        yield from pairs


def sniff(record: dict) -> bool:
    return {"prompt", "completions"} <= set(record) and bool({"img_path", "image"} & set(record))


def vlfeedback_pairs(record: Any, where: int | str, *, path, tally: Tally) -> list[Sample]:
    prompt, completions = require(record, "prompt", "completions")
    image = record.get("image") if record.get("image") not in (None, "") else record.get("img_path")
    if image in (None, ""):
        raise ValueError("missing field 'img_path' (or 'image')")
    completions = _completions(completions)
    base_id = record_id(record, path, where, "id")
    scores = [_mean_rating(c) for c in completions]
    for index, score in enumerate(scores):
        if score is None:
            tally.skip(UNRATED, f"{path}:{where} (id {base_id}, completion {index})")
    pairs = []
    for i, j in itertools.combinations(range(len(completions)), 2):
        if scores[i] is None or scores[j] is None or scores[i] == scores[j]:
            continue
        chosen, rejected = (i, j) if scores[i] > scores[j] else (j, i)
        pairs.append(_pair(f"{base_id}/{chosen}-{rejected}", text_value(prompt, "prompt"), image,
                           completions[chosen], completions[rejected], scores[chosen], scores[rejected]))
    if not pairs:
        raise Skip("no preference")
    return pairs


def _completions(value: Any) -> list[dict]:
    """The completions as a list of ``{annotations, model, response}``, from a list or a mapping of lists."""
    if isinstance(value, dict):   # datasets' Sequence of a struct, stored column-wise
        keys = list(value)
        value = [dict(zip(keys, row)) for row in zip(*(value[k] for k in keys))]
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise ValueError("'completions' must be a list of {annotations, model, response}")
    for index, completion in enumerate(value):
        if not isinstance(completion.get("response"), str) or not completion["response"].strip():
            raise ValueError(f"completion {index} has no 'response' text")
    return value


def _mean_rating(completion: dict) -> float | None:
    """The mean of the completion's aspect ratings, or None when one is missing or not a number."""
    annotations = completion.get("annotations")
    if not isinstance(annotations, dict) or not annotations:
        return None
    try:
        ratings = [float(aspect["Rating"]) for aspect in annotations.values()]
    except (KeyError, TypeError, ValueError):
        return None
    return sum(ratings) / len(ratings)


def _pair(sample_id: str, prompt: str, image: Any, chosen: dict, rejected: dict, chosen_score: float,
          rejected_score: float) -> Sample:
    meta = Metadata(source="vlfeedback", task="preference",
                    extra={"chosen_model": chosen.get("model"), "rejected_model": rejected.get("model"),
                           "chosen_rating": chosen_score, "rejected_rating": rejected_score})
    sample = qa_sample(sample_id, prompt, chosen["response"], images=[ImageRef.from_dict(image)], meta=meta)
    return Sample(id=sample.id, messages=sample.messages, meta=sample.meta,
                  rejected=Message("assistant", (Part.of_text(rejected["response"]),)))


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
