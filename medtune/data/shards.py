"""Row jobs run in shards that resume and merge: which rows a shard owns, which it still has to do, and whether
the shards' outputs hold every row exactly once.

Two verbs are such jobs: ``medtune eval run`` (a predictions file per shard, resumed by question id) and
``medtune tokenize-images`` (Parquet chunks per shard, resumed by sample id and image). Each keeps its own file
format; this module is what they share, so that a shard is chosen, resumed and checked the same way in both.

Shard modes, for ``num_shards`` shards:

* ``modulo`` (evaluation's default): row ``i`` in input order belongs to shard ``i % num_shards``; every shard
  gets a similar mix of the input, so shards finish together.
* ``contiguous``: the ``i``-th of ``num_shards`` equal blocks; each shard's output is a slice of the input.
* ``hash``: by a stable hash of the row's key (tokenize-images hashes the sample id, so every image of a
  sample is in one shard whatever else the input holds); equal across runs, processes and machines.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

SHARD_MODES = ("modulo", "contiguous", "hash")
T = TypeVar("T")


def shard_of(key: str, num_shards: int) -> int:
    """The shard a key belongs to in ``hash`` mode."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def shard_rows(rows: Sequence[T], num_shards: int, shard_index: int, mode: str = "modulo", *,
               key: Callable[[T], str] | None = None) -> list[T]:
    """The rows shard ``shard_index`` of ``num_shards`` owns, in input order (``key``: for ``hash`` mode)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is not in 0..{num_shards - 1}")
    if mode == "modulo":
        return list(rows[shard_index::num_shards])
    if mode == "contiguous":
        size, extra = divmod(len(rows), num_shards)
        start = shard_index * size + min(shard_index, extra)
        return list(rows[start:start + size + (shard_index < extra)])
    if mode == "hash" and key is not None:
        return [row for row in rows if shard_of(key(row), num_shards) == shard_index]
    raise ValueError(f"unknown shard mode {mode!r} (expected one of {', '.join(SHARD_MODES)}; hash needs a key)")


def pending(rows: Iterable[T], done: set, key: Callable[[T], Hashable]) -> list[T]:
    """The rows whose key is not done yet, in order: what a resumed shard still has to do."""
    return [row for row in rows if key(row) not in done]


@dataclass
class Coverage:
    """How the keys the shards wrote compare with the keys expected: each expected key exactly once."""

    missing: list
    duplicated: list
    unexpected: list

    @property
    def complete(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)

    def describe(self, what: str, limit: int = 20) -> str:
        """``3 missing ids: a, b, c; 1 duplicated ids: d`` (``what``: the keys' name)."""
        return "; ".join(f"{len(keys)} {kind} {what}: {first_few(keys, limit)}"
                         for kind, keys in (("missing", self.missing), ("duplicated", self.duplicated),
                                            ("unexpected", self.unexpected)) if keys)


def coverage(expected: Iterable, found: Iterable) -> Coverage:
    """Compare the keys found over every shard's output with the expected ones (lists keep the input order)."""
    counts = Counter(found)
    expected = list(expected)
    known = set(expected)
    return Coverage(missing=[key for key in expected if key not in counts],
                    duplicated=[key for key, n in counts.items() if n > 1],
                    unexpected=[key for key in counts if key not in known])


def first_few(keys: Sequence, limit: int = 20) -> str:
    """``a, b, c`` or ``a, b, ... (8 more)``: keys an error names without printing thousands."""
    shown = ", ".join(map(str, keys[:limit]))
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
