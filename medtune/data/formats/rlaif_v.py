"""RLAIF-V (Yu et al., 2024) preference pairs: the columns of openbmb/RLAIF-V-Dataset. Read only.

Layout, from the dataset card's features and field table: ``ds_name``, ``image`` (a ``datasets`` image, stored
in the Parquet files as a ``{bytes, path}`` struct), ``question``, ``chosen`` and ``rejected`` (the two replies),
``origin_dataset``, ``origin_split`` (a JSON string naming the models that wrote the pair, the labelling model
and the question type), ``idx``, ``image_path``. The Parquet files read as downloaded
(:mod:`medtune.data.formats.parquet`: rows streamed, each image's bytes written unchanged to
``<file stem>_images/`` beside the file, named by content hash); the same rows as JSON or JSON Lines with
``image`` a path (or ``{"path": ...}``), or only ``image_path``, read too.

Each row becomes one preference sample: the user turn is the image then the question, the last message the
chosen reply and :attr:`~medtune.data.schema.Sample.rejected` the rejected one (``method: dpo`` trains on them).
``idx`` is the id (the file's stem and row number where absent); the other columns are kept in ``meta.extra``.
A row whose two replies are equal is refused (it prefers nothing).
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from medtune.data.formats import parquet
from medtune.data.formats.records import convert_records, iter_records, record_id, require, text_value
from medtune.data.jsonl import Tally
from medtune.data.schema import ImageRef, Message, Metadata, Part, Sample, qa_sample

MAPPED_KEYS = {"idx", "image", "image_path", "question", "chosen", "rejected"}
READS_PARQUET = True


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False) -> Iterator[Sample]:
    convert = partial(rlaif_v_sample, path=path)
    return convert_records(path, parquet.records_or(path, iter_records), convert, tally=tally, strict=strict)


def sniff(record: dict) -> bool:
    return {"question", "chosen", "rejected"} <= set(record) and bool({"image", "image_path"} & set(record))


def rlaif_v_sample(record: Any, where: int | str, *, path) -> Sample:
    question, chosen, rejected = require(record, "question", "chosen", "rejected")
    image = record.get("image") if record.get("image") not in (None, "") else record.get("image_path")
    if image in (None, ""):
        raise ValueError("missing field 'image' (or 'image_path')")
    meta = Metadata(source="rlaif-v", task="preference",
                    extra={k: v for k, v in record.items() if k not in MAPPED_KEYS})
    sample = qa_sample(record_id(record, path, where, "idx"), text_value(question, "question"),
                       text_value(chosen, "chosen"), images=[ImageRef.from_dict(image)], meta=meta)
    return Sample(id=sample.id, messages=sample.messages, meta=sample.meta,
                  rejected=Message("assistant", (Part.of_text(text_value(rejected, "rejected")),)))


def image_root(path: str | os.PathLike) -> Path:
    return Path(path).parent
