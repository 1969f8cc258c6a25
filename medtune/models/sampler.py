"""A length-grouped sampler: the alternative to packing for runs that pad.

Each epoch the indices are shuffled (seeded by ``seed + epoch``), cut into mega-batches of
``batch_size * mega_batch_factor`` samples, and each mega-batch is sorted by length, longest first; consecutive
``batch_size`` slices of that order are the batches. Batches therefore hold samples of similar length (little
padding) while the epoch order stays random at the scale of mega-batches. The longest batch is moved to the
front so an out-of-memory error shows at the first step, not hours in. Same seed and epoch, same order.

Under distributed training, give each process the same seed: the DataLoader/Accelerate sharding splits the
one global order, so ranks see different samples of similar lengths.

Why not transformers' ``LengthGroupedSampler``: it draws from a torch generator and has no ``set_epoch``, so the
sampler a resumed run builds starts again with the first epoch's order, and a run resumed in a later epoch would
not see the order the uninterrupted run saw (tests/train/test_collate.py shows both).
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence


DEFAULT_MEGA_BATCH_FACTOR = 50
"""Batches per mega-batch for ``group_by_length: true`` (transformers' LengthGroupedSampler uses 50)."""


def mega_batch_factor(group_by_length: bool | int) -> int:
    """Batches per mega-batch for a stage's ``group_by_length`` setting: an integer as given, else the default."""
    if isinstance(group_by_length, bool):
        return DEFAULT_MEGA_BATCH_FACTOR
    return group_by_length


class LengthGroupedSampler:
    """Yield dataset indices so that consecutive ``batch_size`` indices have similar lengths."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0,
                 mega_batch_factor: int = DEFAULT_MEGA_BATCH_FACTOR):
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError("batch_size and mega_batch_factor must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.mega_batch_size = batch_size * mega_batch_factor
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A different (still reproducible) order for each epoch; Trainer/Accelerate call this."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(order)
        grouped: list[int] = []
        for start in range(0, len(order), self.mega_batch_size):
            mega = order[start:start + self.mega_batch_size]
            grouped += sorted(mega, key=lambda index: -self.lengths[index])
        batches = [grouped[i:i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        full = [b for b in range(len(batches)) if len(batches[b]) == self.batch_size]
        if full:  # only full batches move, so the DataLoader's batch boundaries stay where they were
            longest = max(full, key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return (index for batch in batches for index in batch)


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions when each batch is padded to its longest sample."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches if batch)
    return 1 - real / padded if padded else 0.0
