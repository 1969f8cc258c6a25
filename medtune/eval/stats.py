"""Confidence intervals for per-item scores: a seeded percentile bootstrap.

Every figure medtune reports is a mean of per-item values (0/1 hits, or fractions such as token recall), so
one method serves all of them. The interval comes from ``resamples`` resamples of the items with
replacement, drawn by ``numpy.random.default_rng(seed)``: the same scores and seed give the same interval
on every machine, so two reports can be compared line by line. With fewer than two items there is nothing
to resample and the interval collapses to the mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A mean (in the units given, e.g. percent) with its n and 95% bootstrap interval."""

    value: float
    n: int
    low: float
    high: float

    def overlaps(self, other: "Estimate") -> bool:
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict:
        """JSON-ready: an undefined figure (no items) is ``null``, not NaN, which JSON does not have."""
        def finite(x: float) -> float | None:
            return None if math.isnan(x) else x
        return {"value": finite(self.value), "n": self.n, "ci_low": finite(self.low), "ci_high": finite(self.high)}

    @classmethod
    def from_dict(cls, data: dict) -> "Estimate":
        def number(x) -> float:
            return float("nan") if x is None else float(x)
        return cls(number(data["value"]), int(data["n"]), number(data["ci_low"]), number(data["ci_high"]))


def bootstrap_ci(values: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    if data.size == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    # One (resamples, n) index matrix: fast, and the draw order is fixed by the seed alone.
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def estimate(values: Sequence[float], *, scale: float = 100.0, resamples: int = DEFAULT_RESAMPLES,
             seed: int = DEFAULT_SEED) -> Estimate:
    """Mean × ``scale`` with n and the 95% interval (also × ``scale``). The mean is summed in item order,
    as the reference scripts do, so compatibility figures match them to the last digit."""
    values = list(values)
    if not values:
        return Estimate(float("nan"), 0, float("nan"), float("nan"))
    mean = sum(values) / len(values) * scale
    low, high = bootstrap_ci(values, resamples=resamples, seed=seed)
    return Estimate(mean, len(values), low * scale, high * scale)


def weighted_estimate(values: Sequence[float], weights: Sequence[float], *, scale: float = 100.0,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Estimate:
    """The weighted mean × ``scale`` (a reference script's weighting of its units), n = the units, and the
    95% interval of the same weighted mean over resamples of the units (drawn as :func:`bootstrap_ci` draws)."""
    data, weight = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if data.size == 0 or weight.sum() <= 0:
        return Estimate(float("nan"), int(data.size), float("nan"), float("nan"))
    mean = float((data * weight).sum() / weight.sum()) * scale
    if data.size == 1:
        return Estimate(mean, 1, mean, mean)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, data.size, size=(resamples, data.size))
    means = (data[draws] * weight[draws]).sum(axis=1) / weight[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(mean, int(data.size), float(low) * scale, float(high) * scale)
