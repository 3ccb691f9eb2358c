"""The scale-fidelity benchmark's measurements: the product's footprint and the confidence intervals.

The benchmark itself trains LoRAs (minutes); what it measures is checked here on images whose product size is
known: the same scene with the product painted at 0.6x-1.5x the mask's box (:func:`data.synthetic.scaled_insertions`).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from data.synthetic import scaled_insertions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scale_fidelity", ROOT / "benchmarks" / "scale_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scale_fidelity"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("scale_fidelity", None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_footprint_tracks_the_painted_size(bench, seed):
    scales = (0.6, 0.8, 1.0, 1.25, 1.5)
    t, painted = scaled_insertions(np.random.default_rng(seed), 128, 128, area=0.06, scales=scales)
    scene = np.asarray(t.context.convert("RGB"))
    mask = np.asarray(t.mask.convert("L")) >= 128
    ratios = []
    for s in scales:
        row = bench.footprint_row(np.asarray(painted[s].convert("RGB")), scene, mask)
        assert row["found"] == 1.0
        assert row["area_log_error_found"] == pytest.approx(row["area_log_error"])
        assert row["area_log_error_found"] == pytest.approx(abs(row["log_area_ratio_found"]))
        if s != 1.0:  # signed: too small is negative, too large positive
            assert (row["log_area_ratio_found"] > 0) == (s > 1.0)
        ratios.append(row["area_ratio"])
    # The box area goes as the square of the scale (within a few pixels of rounding at 128 px).
    np.testing.assert_allclose(ratios, np.square(scales), rtol=0.2)
    assert ratios == sorted(ratios)
    at_size = bench.footprint_row(np.asarray(t.target.convert("RGB")), scene, mask)
    assert at_size["iou"] > 0.85 and at_size["area_log_error"] < 0.15


def test_missing_product_scores_area_zero(bench):
    t, _ = scaled_insertions(np.random.default_rng(3), 128, 128, area=0.05, scales=(1.0,))
    scene = np.asarray(t.context.convert("RGB"))
    mask = np.asarray(t.mask.convert("L")) >= 128
    row = bench.footprint_row(scene, scene, mask)  # nothing painted
    ys, xs = np.nonzero(mask)
    box_area = float((xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min()))
    assert row["found"] == 0.0 and row["iou"] == 0.0 and row["area_ratio"] == 0.0
    assert row["area_log_error"] == pytest.approx(math.log(box_area + 1.0))
    assert math.isnan(row["area_log_error_found"]) and math.isnan(row["log_area_ratio_found"])


def test_mean_ci_is_the_student_t_interval_over_finite_values(bench):
    from scipy import stats

    v = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    got = bench.mean_ci(v)
    half = stats.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2.0  # 3.18, not the normal 1.96
    assert got["n"] == 4 and got["mean"] == pytest.approx(2.5)
    assert got["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert bench.mean_ci(np.array([np.nan]))["mean"] is None
    assert bench.mean_ci(np.array([5.0]))["ci95"] == [None, None]  # one sample: no interval


def _rows(values_by_seed, **other):
    """Rows ordered seed-major, as the benchmark stores them: ``values_by_seed[seed][sample]``."""
    return [{"area_log_error": v, **{k: other.get(k, 0.0) for k in ("found", "log_area_ratio_found",
             "area_log_error_found", "iou", "boundary_f", "psnr_outside", "change_iou")}}
            for seed in values_by_seed for v in seed]


def test_seeds_are_averaged_per_sample_before_the_interval(bench):
    """Three samples, two seeds: the interval is over the three sample means, not the six rows."""
    rows = _rows([[1.0, 2.0, 6.0], [3.0, 4.0, 8.0]])
    np.testing.assert_allclose(bench.per_sample(rows, 3, "area_log_error"), [2.0, 3.0, 7.0])
    got = bench.summarise({"masked": rows}, ["in_band"] * 3)["variants"]["masked"]["area_log_error"]
    want = bench.mean_ci(np.array([2.0, 3.0, 7.0]))
    assert got["n"] == 3 and got["ci95"] == pytest.approx(want["ci95"])
    # a metric defined only where the product was found averages the seeds where it was (NaN where never)
    found_rows = [dict(r, log_area_ratio_found=x) for r, x in zip(rows, [-1.0, math.nan, math.nan, 0.5, 2.0, math.nan])]
    np.testing.assert_allclose(bench.per_sample(found_rows, 3, "log_area_ratio_found"), [-0.25, 2.0, math.nan])
    with pytest.raises(ValueError, match="whole seeds"):
        bench.per_sample(rows[:5], 3, "area_log_error")


def test_paired_differences_against_masked_per_sample_and_bucket(bench):
    """A variant that is better than masked by exactly 0.5 on every sample, on top of a between-sample spread far
    larger than 0.5: paired, the difference is -0.5 with a zero-width interval, in every bucket; unpaired intervals
    would overlap."""
    base = [[1.0, 5.0, 9.0, 2.0], [3.0, 7.0, 11.0, 4.0]]
    better = [[v - 0.5 for v in seed] for seed in base]
    buckets = ["in_band", "extrapolation", "in_band", "extrapolation"]
    s = bench.summarise({"masked": _rows(base), "geometry": _rows(better, psnr_outside=1.0)}, buckets)
    p = s["paired"]["geometry"]
    assert p["vs"] == "masked" and "masked" not in s["paired"]
    assert p["area_log_error"]["mean"] == pytest.approx(-0.5) and p["area_log_error"]["n"] == 4
    assert p["area_log_error"]["ci95"] == pytest.approx([-0.5, -0.5])
    assert p["psnr_outside"]["mean"] == pytest.approx(1.0)
    for b in ("in_band", "extrapolation"):
        assert p["by_bucket"][b]["area_log_error"]["mean"] == pytest.approx(-0.5)
        assert p["by_bucket"][b]["area_log_error"]["n"] == 2
    a, m = s["variants"]["geometry"]["area_log_error"], s["variants"]["masked"]["area_log_error"]
    assert a["ci95"][1] > m["ci95"][0]  # unpaired, the intervals overlap
    assert s["variants_by_bucket"]["masked"]["in_band"]["area_log_error"]["mean"] == pytest.approx((2 + 10) / 2)
