"""The sweep's statistics on synthetic cells: intervals, paired SIM-CoT gains, the rendered table."""

import math
import statistics

import pytest

from simcot.train.sweep import summarize, write_table
from simcot.train.sweep_stats import bootstrap_interval, paired_gain, t975, t_interval


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30, 100):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)


def test_t_interval_by_hand():
    # mean 2, sd 1, n 3: half-width 4.303 / sqrt(3)
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))


def test_bootstrap_interval_brackets_the_mean_within_the_range_and_is_deterministic():
    v = [0.50, 0.55, 0.60, 0.62, 0.70]
    lo, hi = bootstrap_interval(v)
    assert min(v) <= lo < statistics.fmean(v) < hi <= max(v)
    assert bootstrap_interval(v) == (lo, hi)
    assert bootstrap_interval([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4))
    assert bootstrap_interval([0.3]) == (0.3, 0.3)


def test_paired_gain_uses_the_per_seed_differences():
    base = {0: 0.40, 1: 0.60, 2: 0.50, 3: 0.70, 4: 0.45}
    # a constant +5 points on every seed: significant although the seeds spread by 30 points
    steady = paired_gain({s: a + 0.05 + 0.001 * s for s, a in base.items()}, base)
    assert steady["seeds"] == 5 and steady["gain"] == pytest.approx(0.052)
    assert steady["significant"] and 0 < steady["lo"] < steady["hi"]
    # +20 on two seeds, -10 on three: the mean is positive, the interval holds 0
    mixed = paired_gain({0: 0.60, 1: 0.80, 2: 0.40, 3: 0.60, 4: 0.35}, base)
    assert mixed["gain"] == pytest.approx(0.02) and not mixed["significant"] and mixed["lo"] < 0 < mixed["hi"]
    # only the seeds both cells have count; fewer than two pairs: no gain
    assert paired_gain({0: 0.9, 7: 0.1}, base) is None


def _cell(method, L, seed, acc):
    return {"method": method, "latents": L, "seed": seed, "train_seconds": 1.0,
            "metrics": {"test/accuracy": acc, "test/latent_cos_within": 0.5}}


def test_summary_and_table_carry_intervals_and_the_significance_column(tmp_path):
    results = [_cell("cot", 0, s, 1.0) for s in range(5)]
    results += [_cell("coconut", 4, s, 0.40 + 0.02 * s) for s in range(5)]
    results += [_cell("simcot-coconut", 4, s, 0.50 + 0.02 * s) for s in range(5)]  # +10 on every seed
    results += [_cell("codi", 4, s, 0.50) for s in range(5)]
    results += [_cell("simcot-codi", 4, s, 0.50 + (0.1 if s % 2 else -0.1)) for s in range(5)]
    rows = {(r["method"], r["latents"]): r for r in summarize(results, [4])}
    sc = rows[("simcot-coconut", 4)]
    assert sc["gain_over"] == "coconut" and sc["gain"] == pytest.approx(0.10)
    assert sc["gain_ci_lo"] == pytest.approx(0.10) and sc["gain_significant"] == "yes"  # no spread in the gain
    assert rows[("simcot-codi", 4)]["gain_significant"] == "no"
    assert rows[("coconut", 4)]["gain_over"] == ""
    assert rows[("coconut", 4)]["accuracy_ci_lo"] < 0.44 < rows[("coconut", 4)]["accuracy_ci_hi"]
    _, md = write_table(list(rows.values()), [4], tmp_path)
    text = md.read_text()
    assert "| simcot-coconut | coconut | 4 | 5 | +10.0 | [+10.0, +10.0] | yes |" in text
    assert "| simcot-codi | codi | 4 | 5 | -2.0 |" in text and text.count("| no |") == 1
    assert "| cot | 100.0 [100.0, 100.0] |" in text
