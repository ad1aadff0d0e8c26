"""``benchmarks/common.pool_processes``: one case timed in several fresh processes, merged."""

import pathlib
import statistics
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
from common import pool_processes  # noqa: E402


def _run(times, **extra):
    return {"model": "efficientdet-d0", "mode": "infer", "batch": 2, "image_size": 256,
            "side": "jax", "median_ms": statistics.median(times), "min_ms": min(times),
            "max_ms": max(times), "runs": len(times), "times_ms": list(times),
            "images_per_s": 2 / (statistics.median(times) / 1e3), **extra}


def test_pooled_median_is_over_every_timed_call_not_over_process_medians():
    # Medians of medians would give 10.0; the median of all nine calls is 12.
    runs = [_run([9, 10, 11], peak_rss_steady_mb=500, compile_s=3.0),
            _run([14, 15, 16], peak_rss_steady_mb=700, compile_s=5.0),
            _run([10, 12, 30], peak_rss_steady_mb=600, compile_s=4.0)]
    pooled = pool_processes(runs)
    assert pooled["median_ms"] == 12
    assert (pooled["min_ms"], pooled["max_ms"], pooled["runs"]) == (9, 30, 9)
    assert pooled["process_median_ms"] == [10, 15, 12]
    assert pooled["fastest_process_ms"] == 10
    assert pooled["images_per_s"] == pytest.approx(2 / 0.012)
    assert pooled["peak_rss_steady_mb"] == 700  # the largest process's peak, not a mean
    assert pooled["compile_s"] == 4.0
    assert pooled["processes"] == 3


def test_one_process_is_returned_unchanged_in_its_figures():
    run = _run([20, 21, 25, 22, 23])
    pooled = pool_processes([run])
    for key in ("median_ms", "min_ms", "max_ms", "runs", "images_per_s"):
        assert pooled[key] == run[key]


def test_a_failed_process_makes_the_case_an_error():
    failed = {"model": "efficientdet-d0", "error": "exit 1: out of memory"}
    assert pool_processes([_run([10, 11]), failed])["error"] == "exit 1: out of memory"
