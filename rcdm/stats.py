"""The interval estimates every analysis, table and report uses: one place for each.

- ``wilson``: a proportion's 95 % Wilson score interval (sound at 0, 1 and small n);
- ``mean_ci``: a mean and its 95 % percentile-bootstrap interval (resampling the values, torch's seeded generator);
- ``bootstrap``: the 95 % percentile-bootstrap interval of any statistics of a sample (numpy's seeded generator).
A fixed seed: the same numbers always give the same interval. ``Estimate`` is a value with its interval, and the
one way every table, report and log line writes one ("0.61 [0.49, 0.72]").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Estimate:
    """A value and, where one was computed, its 95 % interval; None where nothing was measured."""

    value: float | None
    ci95: tuple[float, float] | None = None

    @classmethod
    def of(cls, record: dict, key: str) -> Estimate:
        """``record[key]`` with ``record[key + "_ci95"]``, the layout of every analysis's numbers."""
        ci = record.get(f"{key}_ci95")
        return cls(record.get(key), tuple(ci) if ci else None)

    def format(self, digits: int = 2) -> str:
        if self.value is None:
            return "n/a"
        v = f"{self.value:.{digits}f}"
        return f"{v} [{self.ci95[0]:.{digits}f}, {self.ci95[1]:.{digits}f}]" if self.ci95 else v

    __str__ = format


    @classmethod
    def checked(cls, record: dict, key: str, what: str = "") -> Estimate:
        """``Estimate.of`` for a record someone else wrote: the value and its interval finite numbers, else a
        ValueError naming the field."""
        return cls(finite(record.get(key), f"{what}{key}"), tuple(interval(record.get(f"{key}_ci95"),
                                                                          f"{what}{key}_ci95")))


def finite(x, what: str, optional: bool = False) -> float | None:
    """``x`` as a finite number (None where ``optional``), else a ValueError naming ``what``."""
    if optional and x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{what} is not a finite number")
    return x


def interval(x, what: str) -> list:
    """``x`` as an interval [lo, hi] of finite numbers, else a ValueError naming ``what``."""
    if not (isinstance(x, list) and len(x) == 2):
        raise ValueError(f"{what} is not an interval [lo, hi]")
    return [finite(v, what) for v in x]


def mapping(x, what: str) -> dict:
    """``x`` as a JSON object, else a ValueError naming ``what``."""
    if not isinstance(x, dict):
        raise ValueError(f"{what} is not an object")
    return x


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score 95 % interval of ``successes`` out of ``n``."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 and n the bound is exact (rounding left 1 - 1e-16, below the estimate itself)
    return [0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half)]


def mean_ci(values, resamples: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    """The mean of ``values`` (a list or a 1-d tensor) and its 95 % percentile-bootstrap interval."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (resamples, len(x)), generator=g)].mean(1)
    return float(x.mean()), [float(means.quantile(0.025)), float(means.quantile(0.975))]


def bootstrap(x: np.ndarray, stats: Callable[[np.ndarray], np.ndarray], resamples: int = 1000,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): the 95 % percentile-bootstrap interval of ``stats`` ([..., n] -> [..., k]) over the n values of
    ``x``, each of the k statistics on its own."""
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    lo, hi = np.percentile(stats(x[idx]), [2.5, 97.5], axis=0)
    return lo, hi
