"""GMAI-MMBench (Chen et al., 2024): VLMEvalKit TSVs ``GMAI-MMBench_VAL.tsv`` / ``GMAI-MMBench_TEST.tsv``. Read only.

The GMAI-MMBench README (uni-medical/GMAI-MMBench) says the benchmark is stored directly in VLMEvalKit's TSV
layout with base64 images, and that the test file has no ``answer`` column (answers are withheld to prevent
leakage; its questions read and are counted, but an evaluation scores only the VAL file). So this is the
:mod:`~medtune.data.formats.vlmevalkit` reader with ``source`` ``gmai-mmbench``; GMAI's lexical-tree columns
(clinical task, department, modality, perceptual granularity, whatever they are named in the file) stay in
``meta.extra`` under their own names, with ``modality`` also copied to ``meta.modality`` for per-modality rows.

Content alone cannot tell a GMAI-MMBench TSV from any other VLMEvalKit TSV, so this format never claims a file in
detection (``sniff`` is always False): such a file is detected as ``vlmevalkit``, and the ``gmai-mmbench`` task
names this format.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

from medtune.data.formats import vlmevalkit
from medtune.data.jsonl import Tally
from medtune.data.schema import Sample

raw_records = vlmevalkit.raw_records
image_root = vlmevalkit.image_root


def read(path: str | os.PathLike, *, tally: Tally, strict: bool = False, split: str | None = None) -> Iterator[Sample]:
    for sample in vlmevalkit.read(path, tally=tally, strict=strict, split=split, source="gmai-mmbench"):
        modality = sample.meta.extra.get("modality")
        if isinstance(modality, str) and modality:
            sample.meta.modality = modality
        yield sample


def sniff(record: dict) -> bool:
    return False


__all__ = ["image_root", "raw_records", "read", "sniff"]
