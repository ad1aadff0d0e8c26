"""The sweep statistics against hand-computed values and scipy's paired t-test."""

import math

import numpy as np
import pytest
import scipy.stats

from effdet_jax.ablation import report, stats

# t(0.975, df) from a printed table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T975 = {1: 12.706, 2: 4.303, 4: 2.776}


def test_t_interval_matches_hand_computation():
    values = [1.0, 2.0, 4.0]
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    half = T975[2] * sd / math.sqrt(3)
    interval = stats.t_interval(values)
    assert interval.n == 3 and interval.mean == pytest.approx(mean)
    assert interval.low == pytest.approx(mean - half, abs=2e-3)
    assert interval.high == pytest.approx(mean + half, abs=2e-3)
    assert not interval.resolved  # [-1.46, 6.13] contains 0

    two = stats.t_interval([0.5, 0.7])
    assert (two.high - two.low) / 2 == pytest.approx(T975[1] * 0.1 * math.sqrt(2) / math.sqrt(2), rel=1e-3)
    assert not two.resolved  # 0.6 ± 1.27 with one degree of freedom

    one = stats.t_interval([0.3, math.nan])  # NaN (a missing metric) is left out
    assert one.n == 1 and one.mean == 0.3 and math.isnan(one.low) and not one.resolved
    same = stats.t_interval([0.2, 0.2, 0.2])
    assert (same.low, same.high) == pytest.approx((0.2, 0.2))
    assert stats.t_interval([]).n == 0


def test_paired_difference_matches_scipy_ttest_rel():
    arm = {0: 0.50, 1: 0.61, 2: 0.70, 3: 0.64, 4: 0.58}
    base = {0: 0.42, 1: 0.55, 2: 0.60, 3: 0.60, 4: 0.49, 5: 0.90}  # seed 5 has no pair
    seeds = sorted(arm)
    expected = scipy.stats.ttest_rel([arm[s] for s in seeds],
                                     [base[s] for s in seeds]).confidence_interval(0.95)
    diff = stats.paired_difference(arm, base)
    assert diff.n == 5
    assert diff.mean == pytest.approx(np.mean([arm[s] - base[s] for s in seeds]))
    assert (diff.low, diff.high) == pytest.approx((expected.low, expected.high))
    d = np.array([arm[s] - base[s] for s in seeds])
    assert diff.high - diff.mean == pytest.approx(T975[4] * d.std(ddof=1) / math.sqrt(5), abs=1e-4)
    assert diff.resolved and diff.low > 0  # every seed better: resolved
    # The unpaired intervals overlap: pairing is what resolves it.
    a, b = stats.t_interval(list(arm.values())), stats.t_interval([base[s] for s in seeds])
    assert a.low < b.high


def test_curve_area_and_convergence():
    assert stats.curve_area([(0, 0.0), (10, 1.0), (20, 1.0)]) == pytest.approx(15 / 20)
    assert stats.curve_area([(250, 0.4), (500, 0.6)]) == pytest.approx(0.5)
    assert math.isnan(stats.curve_area([(5, 1.0)]))
    assert stats.converged([(1, 0.5), (2, 0.900), (3, 0.905), (4, 0.91)])
    assert not stats.converged([(1, 0.88), (2, 0.90), (3, 0.91)])
    assert stats.converged([(1, 0.9), (2, 0.9)]) is None


def test_summary_and_sentences():
    def run(seed, ap50, returncode=0):
        curve = [(1, ap50 - 0.2), (2, ap50 - 0.005), (3, ap50)]
        return {"seed": seed, "returncode": returncode, "ap": ap50 / 2, "ap50": ap50,
                "auc_ap50": stats.curve_area(curve), "converged": stats.converged(curve),
                "curve_ap50": curve, "curve_loss": [(1, 3.0), (2, 2.0), (3, 1.5)]}

    runs = {"base": [run(0, 0.50), run(1, 0.60), run(2, 0.55)],
            "better": [run(0, 0.60), run(1, 0.71), run(2, 0.64)],
            "broken": [run(0, 0.5), {"seed": 1, "returncode": 1, "error": "exit 1: boom"}]}
    summary = report.summarize(runs, "base")
    assert summary["better"]["vs_baseline"]["ap50"]["resolved"]
    assert summary["better"]["vs_baseline"]["ap50"]["mean"] == pytest.approx(0.1)
    assert summary["broken"]["failed"] == [{"seed": 1, "error": "exit 1: boom"}]
    assert summary["broken"]["vs_baseline"]["ap50"]["n"] == 1
    text = report.table(summary, "base", None, "t")
    assert "**better − base** over 3 paired seeds: AP +0.050" in text
    assert "AP50 +0.100 [+0.075, +0.125]: resolved, better higher" in text
    assert "**broken vs base**: 1 paired seed(s), too few for an interval" in text
    assert "| broken | 1 (1 failed) |" in text
    assert "broken seed 1: exit 1: boom" in text
    assert "Cost not measured yet" in text
