"""Statistics over seeds: the 95 % t-interval of a mean, the paired difference of two arms, the
area under a curve, and the convergence rule.

A t-interval over n seeds is ``mean ± t(0.975, n - 1) · s / sqrt(n)`` (``scipy.stats``' one-sample
t-test's ``confidence_interval``); with fewer than two values it is undefined (NaN bounds). A
difference between arms pairs the runs by seed (same data order and initialisation seed), which
removes the part of the seed's effect the arms share.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
# Converged: the last CONVERGED_POINTS evaluations of AP50 lie within CONVERGED_TOLERANCE.
CONVERGED_POINTS = 3
CONVERGED_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its ``CONFIDENCE`` t-interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (False when it is undefined)."""
        return bool(self.low > 0 or self.high < 0)

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``0.512 [0.498, 0.526]``, or just the mean when the interval is undefined."""
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.low):
            return f.format(self.mean)
        return f"{f.format(self.mean)} [{f.format(self.low)}, {f.format(self.high)}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n,
                "resolved": self.resolved}


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` (NaNs left out) and its t-interval."""
    x = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    if np.all(x == x[0]):  # no spread: scipy warns and divides by zero
        return Interval(mean, mean, mean, int(x.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = scipy.stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return Interval(mean, float(ci.low), float(ci.high), int(x.size))


def paired_difference(arm: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Interval:
    """Mean and t-interval of ``arm[seed] - baseline[seed]`` over the seeds both have."""
    seeds = sorted(s for s in set(arm) & set(baseline)
                   if not (math.isnan(arm[s]) or math.isnan(baseline[s])))
    return t_interval([arm[s] - baseline[s] for s in seeds], confidence)


def curve_area(curve: Sequence[tuple[int, float]]) -> float:
    """Area under ``[(step, value), ...]`` by the trapezoid rule over the evaluated steps, divided
    by the steps it spans: the curve's mean height (a value in the metric's units), higher for an
    arm that learns sooner. NaN with fewer than two points."""
    if len(curve) < 2:
        return math.nan
    steps = np.asarray([s for s, _ in curve], np.float64)
    values = np.asarray([v for _, v in curve], np.float64)
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def converged(curve: Sequence[tuple[int, float]], points: int = CONVERGED_POINTS,
              tolerance: float = CONVERGED_TOLERANCE) -> bool | None:
    """Whether the last ``points`` values lie within ``tolerance`` of each other (None: fewer
    points than that)."""
    if len(curve) < points:
        return None
    tail = [v for _, v in curve[-points:]]
    return bool(max(tail) - min(tail) <= tolerance + 1e-9)  # 0.91 - 0.90 is 0.0100...01 in floats
