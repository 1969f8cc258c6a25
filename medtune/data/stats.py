"""``medtune data stats FILE``: what a dataset contains, as a readable table (and optionally JSON).

Counts by source, task, modality, organ, answer type, split and credential; the distribution of images and
turns per sample; and text length percentiles (p50/p90/p99/max) of questions (the first user turn), answers
(all assistant turns joined) and whole samples. Lengths are in **characters** of the text parts (image parts
count zero), because characters do not depend on a tokenizer. Percentiles use the nearest-rank method, so every
reported value is a length that occurs in the data.

The file is streamed: memory holds the counters and one integer per sample and length kind. No image is opened,
so no DICOM tag can reach the report.
"""
from __future__ import annotations

import array
import collections
import math
from dataclasses import dataclass, field
from typing import Iterable

from medtune.data.jsonl import Tally
from medtune.data.schema import Sample

COUNTED_FIELDS = ("source", "task", "modality", "organ", "answer_type", "split", "credential")
LENGTH_KINDS = ("question", "answer", "sample")
PERCENTILES = (50, 90, 99)
MISSING = "(none)"
TABLE_ROWS = 15  # per counted field in the printed table; the JSON has every value


@dataclass
class DatasetStats:
    samples: int = 0
    counts: dict[str, collections.Counter] = field(
        default_factory=lambda: {name: collections.Counter() for name in COUNTED_FIELDS})
    images_per_sample: collections.Counter = field(default_factory=collections.Counter)
    turns_per_sample: collections.Counter = field(default_factory=collections.Counter)
    lengths: dict[str, array.array] = field(default_factory=lambda: {k: array.array("q") for k in LENGTH_KINDS})

    def add(self, sample: Sample) -> None:
        self.samples += 1
        meta = sample.meta
        for name in COUNTED_FIELDS:
            value = getattr(meta, name)
            self.counts[name][MISSING if value is None else str(value).lower() if name == "credential" else value] += 1
        self.images_per_sample[len(sample.images)] += 1
        self.turns_per_sample[sum(m.role != "system" for m in sample.messages)] += 1
        answer = "\n".join(m.text for m in sample.turns("assistant"))
        self.lengths["question"].append(len(sample.question))
        self.lengths["answer"].append(len(answer))
        self.lengths["sample"].append(sum(len(m.text) for m in sample.messages))

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "counts": {name: dict(counter.most_common()) for name, counter in self.counts.items()},
            "images_per_sample": dict(sorted(self.images_per_sample.items())),
            "turns_per_sample": dict(sorted(self.turns_per_sample.items())),
            "text_length_chars": {kind: percentiles(values) for kind, values in self.lengths.items()},
        }


def percentiles(values: Iterable[int]) -> dict[str, int | None]:
    """Nearest-rank p50/p90/p99 and max (None for no values)."""
    ordered = sorted(values)
    out: dict[str, int | None] = {}
    for p in PERCENTILES:
        out[f"p{p}"] = ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)] if ordered else None
    out["max"] = ordered[-1] if ordered else None
    return out


def collect(samples: Iterable[Sample]) -> DatasetStats:
    stats = DatasetStats()
    for sample in samples:
        stats.add(sample)
    return stats


def format_table(stats: dict, tally: Tally | None = None) -> str:
    """The stats dict as aligned text sections."""
    total = stats["samples"]
    lines = [f"samples: {total}" + (f"   ({tally.summary()})" if tally else "")]
    for name, counter in stats["counts"].items():
        if set(counter) == {MISSING}:
            lines.append(f"{name}: not set in any sample")
            continue
        lines.append(f"{name}:")
        width = max([12] + [len(str(k)) for k in list(counter)[:TABLE_ROWS]])
        for value, n in list(counter.items())[:TABLE_ROWS]:
            lines.append(f"  {str(value):<{width}}  {n:>8}  {100 * n / max(total, 1):5.1f}%")
        if len(counter) > TABLE_ROWS:
            lines.append(f"  ... {len(counter) - TABLE_ROWS} more values (see --json)")
    for name in ("images_per_sample", "turns_per_sample"):
        lines.append(f"{name.replace('_', ' ')}: " + ", ".join(f"{k}: {n}" for k, n in stats[name].items()))
    lines.append("text length (characters)      p50      p90      p99      max")
    for kind, row in stats["text_length_chars"].items():
        cells = "".join(f"{'-' if v is None else v:>9}" for v in row.values())
        lines.append(f"  {kind:<26}{cells}")
    return "\n".join(lines)
