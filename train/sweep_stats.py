"""Statistics of a sweep's cells over seeds: 95 % intervals and paired SIM-CoT gains.

- :func:`bootstrap_interval`: percentile bootstrap of the mean over seeds (a cell's interval).
  With few seeds it is narrow (3 seeds have 10 distinct resample means), so the gains below use
  a t-interval instead.
- :func:`paired_gain`: SIM-CoT minus its base method, paired by seed (both start from the same
  seed's CoT run and data), mean difference with a Student-t 95 % interval; the gain is called
  significant when that interval excludes 0 (a two-sided paired t-test at 5 %).

No scipy: the two-sided 95 % t quantiles are tabulated.
"""

from __future__ import annotations

import math
import random
import statistics

# two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: a Cornish-Fisher expansion)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def bootstrap_interval(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of `values` (deterministic for a seed)."""
    if not values:
        raise ValueError("no values")
    if len(values) == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[min(int(math.ceil(0.975 * n_boot)) - 1, n_boot - 1)]


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean +- t_{0.975, n-1} * sd / sqrt(n)."""
    m = statistics.fmean(values)
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m - half, m + half


def paired_gain(method: dict[int, float], base: dict[int, float]) -> dict | None:
    """Gain of `method` over `base` on the seeds both have ({seed: accuracy}); None under 2 pairs."""
    seeds = sorted(set(method) & set(base))
    if len(seeds) < 2:
        return None
    diffs = [method[s] - base[s] for s in seeds]
    lo, hi = t_interval(diffs)
    return {"seeds": len(seeds), "gain": statistics.fmean(diffs), "lo": lo, "hi": hi,
            "significant": lo > 0 or hi < 0}
