"""Mask-region metrics against independent computations (hand counts, formulas, brute-force references)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kontext.evaluation.metrics import (
    PSNR_CAP_DB,
    aggregate,
    area_log_error,
    area_ratio,
    as_image,
    as_mask,
    boundary_f_score,
    iou,
    latent_change_mask,
    latent_sample_metrics,
    pixel_change_mask,
    psnr,
    sample_metrics,
    ssim,
    ssim_map,
)
from losses import soft_change_mask_from_latents


def square(h: int, w: int, top: int, left: int, size: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


def scene(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth, textured background in [0, 1]: gradients plus low-frequency blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.3 + 0.3 * xx, 0.4 + 0.2 * yy, 0.5 - 0.2 * xx * yy], axis=-1)
    coarse = rng.uniform(-0.1, 0.1, size=(h // 8, w // 8, 3)).repeat(8, 0).repeat(8, 1)
    return np.clip(base + coarse, 0, 1)


def with_object(img: np.ndarray, m: np.ndarray, colour=(0.95, 0.1, 0.1), drift: float = 0.03, seed: int = 1):
    """``img`` re-generated: per-pixel drift noise everywhere, an object of ``colour`` painted on ``m``."""
    rng = np.random.default_rng(seed)
    out = img + rng.normal(0, drift, size=img.shape)
    out[m] = colour
    return np.clip(out, 0, 1)


# ------------------------------------------------------------------------------------------- regions
def test_iou_and_area_by_hand():
    m = square(10, 10, 2, 2, 5)  # 25 px
    shifted = square(10, 10, 4, 2, 5)  # rows 4..8: overlap rows 4..6 = 3 * 5 = 15
    assert iou(shifted, m) == pytest.approx(15 / 35)
    assert area_ratio(shifted, m) == pytest.approx(1.0)
    small = square(10, 10, 3, 3, 3)  # 9 px, inside
    assert iou(small, m) == pytest.approx(9 / 25)
    assert area_ratio(small, m) == pytest.approx(9 / 25)
    assert area_log_error(small, m) == pytest.approx(abs(math.log(10 / 26)))
    empty = np.zeros_like(m)
    assert iou(empty, empty) == 1.0 and iou(empty, m) == 0.0
    assert math.isnan(area_ratio(m, empty))
    assert area_log_error(empty, empty) == 0.0


def _brute_boundary(m: np.ndarray) -> np.ndarray:
    """Contour pixels: in the mask with an 8-neighbour (inside the image) outside it."""
    h, w = m.shape
    b = np.zeros_like(m)
    for i in range(h):
        for j in range(w):
            if not m[i, j]:
                continue
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, c = i + di, j + dj
                    if 0 <= a < h and 0 <= c < w and not m[a, c]:
                        b[i, j] = True
    return b


def _brute_boundary_f(pred: np.ndarray, gt: np.ndarray, tol: float) -> float:
    bp, bg = np.argwhere(_brute_boundary(pred)), np.argwhere(_brute_boundary(gt))
    d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    p = (d.min(axis=1) <= tol).mean()
    r = (d.min(axis=0) <= tol).mean()
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


@pytest.mark.parametrize("shift,tol", [(1, 1.0), (3, 1.0), (3, 2.5), (6, 2.0)])
def test_boundary_f_matches_brute_force(shift, tol):
    gt = square(40, 40, 10, 10, 12)
    pred = square(40, 40, 10 + shift // 2, 10 + shift, 12)
    got = boundary_f_score(pred, gt, tol)
    assert got == pytest.approx(_brute_boundary_f(pred, gt, tol))


def test_boundary_f_perfect_and_shifted():
    gt = square(40, 40, 10, 10, 12)
    assert boundary_f_score(gt, gt, 1.0) == 1.0
    f_small = boundary_f_score(square(40, 40, 10, 13, 12), gt, 1.0)
    f_big = boundary_f_score(square(40, 40, 10, 18, 12), gt, 1.0)
    assert 0 < f_big < f_small < 1
    # a mask touching the image edge has no contour along the edge
    edge = square(40, 40, 0, 0, 12)
    assert boundary_f_score(edge, edge) == 1.0
    assert boundary_f_score(np.zeros_like(gt), gt) == 0.0


# ------------------------------------------------------------------------------------------ fidelity
def test_psnr_formula_and_region():
    a = np.full((8, 8, 3), 0.5)
    b = a + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    c = a.copy()
    c[:4] += 0.2  # half the pixels off by 0.2 -> MSE 0.02 overall, 0.04 on the top half
    top = np.zeros((8, 8), bool)
    top[:4] = True
    assert psnr(a, c) == pytest.approx(10 * math.log10(1 / 0.02))
    assert psnr(a, c, top) == pytest.approx(10 * math.log10(1 / 0.04))
    assert psnr(a, c, ~top) == PSNR_CAP_DB
    assert math.isnan(psnr(a, c, np.zeros((8, 8), bool)))


def _reference_ssim_map(x: np.ndarray, y: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Straightforward SSIM: an explicit 2-D Gaussian window slid over half-sample-mirrored images."""
    g = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    win = np.outer(g, g)
    win /= win.sum()
    c1, c2 = 0.01**2, 0.03**2
    h, w, ch = x.shape
    xp = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    yp = np.pad(y, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    out = np.zeros((h, w, ch))
    for i in range(h):
        for j in range(w):
            for k in range(ch):
                px = xp[i : i + 2 * radius + 1, j : j + 2 * radius + 1, k]
                py = yp[i : i + 2 * radius + 1, j : j + 2 * radius + 1, k]
                mx, my = (win * px).sum(), (win * py).sum()
                vx = (win * (px - mx) ** 2).sum()
                vy = (win * (py - my) ** 2).sum()
                cv = (win * (px - mx) * (py - my)).sum()
                out[i, j, k] = ((2 * mx * my + c1) * (2 * cv + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return out.mean(-1)


def test_ssim_matches_reference_and_is_one_on_identical():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, size=(13, 17, 3))
    y = np.clip(x + rng.normal(0, 0.1, size=x.shape), 0, 1)
    np.testing.assert_allclose(ssim_map(x, y), _reference_ssim_map(x, y), atol=1e-10)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    noisier = np.clip(x + rng.normal(0, 0.3, size=x.shape), 0, 1)
    assert ssim(x, noisier) < ssim(x, y) < 1.0


# ------------------------------------------------------------------------------------- change masks
def test_change_mask_recovers_inserted_square_in_noisy_images():
    ctx = scene()
    m = square(64, 64, 20, 24, 16)
    res = with_object(ctx, m)
    cm = pixel_change_mask(res, ctx, m)
    assert iou(cm.mask, m) > 0.9
    assert 0.9 < area_ratio(cm.mask, m) < 1.15
    # the threshold sits above the drift: it came from the background statistics, not the floor
    assert cm.threshold > 0.05
    # Otsu finds it too, without the mask
    assert iou(pixel_change_mask(res, ctx, method="otsu").mask, m) > 0.9
    # without the opening, isolated drift pixels above the threshold add to the changed area
    raw = pixel_change_mask(res, ctx, m, open_px=0, fill_holes=False)
    assert (raw.mask & ~m).sum() > (cm.mask & ~m).sum()
    # with it, nothing outside the mask survives here (all the drift is pixel-scale)
    assert (cm.mask & ~m).sum() == 0


def test_change_mask_is_empty_when_nothing_was_inserted():
    ctx = scene(seed=4)
    res = with_object(ctx, np.zeros((64, 64), bool), drift=0.03)
    cm = pixel_change_mask(res, ctx, square(64, 64, 20, 20, 16))
    assert cm.mask.mean() < 0.02  # a few tail pixels of the drift at most
    identical = pixel_change_mask(ctx, ctx)
    assert not identical.mask.any() and identical.threshold == 0.05


@pytest.mark.parametrize("size,expected", [(8, 0.25), (16, 1.0), (24, 2.25)])
def test_scale_error_shows_in_area_ratio(size, expected):
    ctx = scene(seed=2)
    m = square(64, 64, 20, 20, 16)
    painted = square(64, 64, 28 - size // 2, 28 - size // 2, size)
    res = with_object(ctx, painted)
    got = sample_metrics(res, ctx, m)
    assert got.area_ratio == pytest.approx(expected, rel=0.15)
    if expected < 1:
        assert got.area_ratio < 1 and got.iou < 0.4
    elif expected > 1:
        assert got.area_ratio > 1 and got.iou < 0.6
    else:
        assert got.iou > 0.9 and got.boundary_f > 0.9


def test_latent_change_mask_is_the_training_soft_mask_rounded():
    g = torch.Generator().manual_seed(0)
    z_ctx = torch.randn(2, 16, 12, 12, generator=g)
    region = torch.zeros(2, 1, 12, 12)
    region[:, :, 3:8, 4:9] = 1
    z_res = z_ctx + 0.05 * torch.randn(z_ctx.shape, generator=g) + 2.0 * region
    hard = latent_change_mask(z_res, z_ctx, region)
    soft, _, _ = soft_change_mask_from_latents(z_res, z_ctx, mask_latent=region)
    assert hard.shape == (2, 1, 12, 12) and hard.dtype == torch.bool
    assert torch.equal(hard, soft > 0.5)
    # the whole region, plus at most the drift's upper tail (mean + 2 std passes a few percent)
    assert bool(hard[region.bool()].all())
    assert hard[~region.bool()].float().mean() < 0.05
    assert torch.equal(latent_change_mask(z_res, z_ctx, region, k_sigma=5.0), region.bool())
    m = latent_sample_metrics(
        z_res[:1], z_ctx[:1], region[0, 0].repeat_interleave(8, 0).repeat_interleave(8, 1), k_sigma=5.0
    )
    assert m.iou == 1.0 and m.area_ratio == 1.0 and m.mask_area == 25


# -------------------------------------------------------------------------------------- per sample
def test_sample_metrics_end_to_end_and_formats():
    ctx = scene(seed=5)
    m = square(64, 64, 16, 16, 20)
    target = ctx.copy()
    target[m] = (0.9, 0.1, 0.1)
    res = with_object(ctx, m, colour=(0.8, 0.1, 0.1), drift=0.02)
    got = sample_metrics(res, ctx, m, target)
    d = got.as_dict()
    assert all(isinstance(v, float) for v in d.values())
    assert got.iou > 0.9 and got.boundary_f > 0.9
    # inside: 0.1 error in one channel -> MSE 0.01 / 3 (plus clipping noise none: colour is set exactly)
    assert got.psnr_inside == pytest.approx(10 * math.log10(3 / 0.01), abs=1e-6)
    # outside: drift noise sigma 0.02 -> PSNR about 10 log10(1 / 0.0004) = 34 dB (clipping trims a little)
    assert 33.0 < got.psnr_outside < 35.5
    assert 0.5 < got.ssim_outside < 1.0
    # torch CHW, uint8 HWC and the numpy HWC floats agree
    as_torch = sample_metrics(torch.from_numpy(res).permute(2, 0, 1), torch.from_numpy(ctx).permute(2, 0, 1),
                              torch.from_numpy(m.astype(np.float32)), torch.from_numpy(target).permute(2, 0, 1))
    assert as_torch.as_dict() == pytest.approx(d)
    u8 = sample_metrics((res * 255).round().astype(np.uint8), (ctx * 255).round().astype(np.uint8),
                        (m * 255).astype(np.uint8))
    assert u8.iou == pytest.approx(got.iou, abs=0.03)
    # no target -> NaN, and background damage shows up outside
    damaged = res.copy()
    damaged[50:60, 2:30] = 0.0
    worse = sample_metrics(damaged, ctx, m)
    assert math.isnan(worse.psnr_inside)
    assert worse.psnr_outside < got.psnr_outside - 5 and worse.ssim_outside < got.ssim_outside


def test_aggregate_means_ignore_nan():
    ctx = scene(seed=6)
    m = square(64, 64, 16, 16, 16)
    a = sample_metrics(with_object(ctx, m), ctx, m, ctx)
    b = sample_metrics(with_object(ctx, square(64, 64, 20, 20, 8)), ctx, m)
    agg = aggregate([a, b])
    assert agg["count"] == 2.0
    assert agg["iou"] == pytest.approx((a.iou + b.iou) / 2)
    assert agg["area_ratio"] == pytest.approx((a.area_ratio + b.area_ratio) / 2)
    assert agg["psnr_inside"] == pytest.approx(a.psnr_inside)  # b has no target
    assert aggregate([]) == {"count": 0.0}
    assert aggregate([{"x": 1.0}, {"x": 3.0}]) == {"x": 2.0, "count": 2.0}


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match=r"result must be \[H, W, 3\]"):
        as_image(np.zeros((4, 4, 3, 1)), "result")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_image(np.full((4, 4, 3), 200.0))
    with pytest.raises(ValueError, match="differ in size"):
        pixel_change_mask(np.zeros((4, 4, 3)), np.zeros((5, 4, 3)))
    with pytest.raises(ValueError, match=r"mask must be \[H, W\]"):
        as_mask(np.zeros((2, 5, 7)))
    with pytest.raises(ValueError, match="method"):
        pixel_change_mask(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), method="magic")


def test_holes_where_the_object_matches_the_scene_are_filled():
    ctx = scene(seed=7)
    m = square(64, 64, 16, 16, 24)
    res = with_object(ctx, m, drift=0.02)
    res[24:32, 24:32] = ctx[24:32, 24:32]  # the product shows the scene's own colour here
    filled = pixel_change_mask(res, ctx, m)
    holed = pixel_change_mask(res, ctx, m, fill_holes=False)
    assert iou(filled.mask, m) > 0.95
    assert not holed.mask[25:31, 25:31].any() and filled.mask[25:31, 25:31].all()


# ------------------------------------------------------------------------------- threshold bounds
def test_threshold_is_bounded_and_a_bounded_one_is_flagged():
    from kontext.evaluation.metrics import MAX_RGB_DISTANCE, MAX_THRESHOLD

    assert MAX_THRESHOLD < MAX_RGB_DISTANCE
    m = square(64, 64, 16, 16, 24)
    # a dark scene whose background the result turned (noisily) white: background drift mean + 3 std > sqrt(3)
    ctx = np.zeros((64, 64, 3))
    rng = np.random.default_rng(0)
    res = np.clip(1.0 - np.abs(rng.normal(0, 0.3, size=ctx.shape)), 0, 1)
    res[m] = 1.0  # the object: the brightest possible change
    assert np.sqrt((res ** 2).sum(-1))[~m].mean() + 3 * np.sqrt((res ** 2).sum(-1))[~m].std() > MAX_THRESHOLD
    cm = pixel_change_mask(res, ctx, m)
    assert cm.degenerate and cm.threshold == pytest.approx(MAX_THRESHOLD)
    assert cm.mask[m].all(), "a bounded threshold still sees the object (an unbounded one saw no change at all)"
    sm = sample_metrics(res, ctx, m)
    assert sm.threshold_degenerate == 1.0 and sm.threshold == pytest.approx(MAX_THRESHOLD)
    # an ordinary sample is not flagged, and a given change mask has no threshold to judge
    ok_ctx = scene(seed=3)
    ok = sample_metrics(with_object(ok_ctx, m), ok_ctx, m)
    assert ok.threshold_degenerate == 0.0 and ok.threshold < MAX_THRESHOLD
    assert math.isnan(sample_metrics(res, ctx, m, changed=m).threshold_degenerate)
    # bounds that cannot hold are refused
    with pytest.raises(ValueError, match="max_threshold"):
        pixel_change_mask(res, ctx, m, max_threshold=2.0)
    with pytest.raises(ValueError, match="min_threshold"):
        pixel_change_mask(res, ctx, m, min_threshold=0.9, max_threshold=0.5)


def test_evaluation_report_names_the_degenerate_samples():
    from types import SimpleNamespace

    from kontext.tools.evaluate import degenerate_threshold_lines

    samples = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    fine = SimpleNamespace(label="base", rows=[{"threshold_degenerate": 0.0}] * 2)
    assert "none degenerate" in "\n".join(degenerate_threshold_lines(samples, [fine]))
    bad = SimpleNamespace(label="geo", rows=[{"threshold_degenerate": 0.0}, {"threshold_degenerate": 1.0}])
    text = "\n".join(degenerate_threshold_lines(samples, [fine, bad]))
    assert "## Degenerate change-mask thresholds" in text and "`geo`: b (1 of 2)" in text and "`base`" not in text
