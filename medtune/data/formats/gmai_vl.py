"""GMAI-VL dataset lists: the JSON that names a training run's datasets, their image folders and sample ratios.

Layout (GMAI-VL's training configs, which follow InternVL's ``meta`` files)::

    {"pmc_oa": {"image_dir": "images/pmc", "annotations": "pmc_oa.jsonl", "sample_ratio": 0.5,
                "length": 1000, "data_augment": false}, ...}

InternVL's spellings ``root``, ``annotation`` and ``repeat_time`` are accepted for the same three keys. The
annotations are LLaVA conversation files (read by the ``llava`` format). This module only parses the list;
:mod:`medtune.data.mixture` turns its entries into a mixture (``sample_ratio`` is a mixture ratio, ``length`` is
checked against the records actually read, ``data_augment`` is recorded, not applied).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import RecipeError

ANNOTATION_FORMAT = "llava"

# Each key with its aliases (GMAI-VL's name first, then InternVL's).
ALIASES = {"image_dir": ("image_dir", "root"), "annotations": ("annotations", "annotation"),
           "sample_ratio": ("sample_ratio", "repeat_time")}
KEYS = {alias for names in ALIASES.values() for alias in names} | {"length", "data_augment"}


@dataclass(frozen=True)
class ListEntry:
    """One dataset of a GMAI-VL list, paths resolved against the list's folder."""

    name: str
    annotations: Path
    image_dir: Path | None
    sample_ratio: Any          # checked by the mixture (a number >= 0)
    length: int | None         # what the list claims the annotations hold
    data_augment: Any


def parse_list(data: dict, base: Path, where: Any = "dataset list") -> list[ListEntry]:
    """The entries of a GMAI-VL list; ``where`` names the file in errors."""
    entries = []
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: not a mix recipe (no 'datasets') nor a GMAI-VL list "
                              f"(entry {name!r} is not an object)")
        unknown = set(entry) - KEYS
        if unknown:
            raise RecipeError(f"{where}: dataset {name!r} has unknown keys {sorted(unknown)} "
                              f"(GMAI-VL list keys: image_dir, annotations, sample_ratio, length, data_augment)")
        fields = {key: next((entry[a] for a in aliases if a in entry), None) for key, aliases in ALIASES.items()}
        if not isinstance(fields["annotations"], str):
            raise RecipeError(f"{where}: dataset {name!r} needs 'annotations' (a LLaVA JSON or JSONL file)")
        length = entry.get("length")
        entries.append(ListEntry(
            name=str(name), annotations=base / fields["annotations"],
            image_dir=base / fields["image_dir"] if fields["image_dir"] else None,
            sample_ratio=1.0 if fields["sample_ratio"] is None else fields["sample_ratio"],
            length=length if isinstance(length, int) else None, data_augment=entry.get("data_augment")))
    return entries
