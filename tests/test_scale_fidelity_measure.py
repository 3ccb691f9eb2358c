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
    assert math.isnan(row["area_log_error_found"])


def test_mean_ci_is_the_normal_interval_over_finite_values(bench):
    v = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    got = bench.mean_ci(v)
    half = 1.96 * np.std([1, 2, 3, 4], ddof=1) / 2.0
    assert got["n"] == 4 and got["mean"] == pytest.approx(2.5)
    assert got["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert bench.mean_ci(np.array([np.nan]))["mean"] is None
