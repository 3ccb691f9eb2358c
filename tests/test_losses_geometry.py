"""The geometry loss functions of ``losses.geometry``: hand-derived values, gradients, properties and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import (
    area_ratio_loss,
    background_preservation_mse_latent,
    boundary_loss,
    dice_loss,
    downsample_mask_area,
    signed_distance_map_from_mask,
    soft_change_mask_from_latents,
    weighted_masked_mse_latent,
)


def _square_mask(size: int, lo: int, hi: int, b: int = 1) -> torch.Tensor:
    m = torch.zeros(b, 1, size, size)
    m[..., lo:hi, lo:hi] = 1.0
    return m


def _latents(b: int, c: int, h: int, w: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g).to(dtype)


# ---------------------------------------------------------------- hand-derived values


def test_weighted_mse_hand_derived():
    m = _square_mask(7, 2, 5)  # 3x3 object; band (r=1) = 5x5 ring minus centre: 24 pixels
    z_tgt = torch.zeros(1, 2, 7, 7)
    z_pred = torch.zeros(1, 2, 7, 7)
    z_pred[0, 0, 3, 3] = 2.0  # interior: channel-mean error 2
    z_pred[0, 1, 1, 1] = 1.0  # band (outside the object): 0.5
    z_pred[0, 0, 6, 6] = 3.0  # far outside: 4.5
    want = (1.0 * 2.0 + 6.0 * 0.5 + 0.2 * 4.5) / 49
    got = weighted_masked_mse_latent(z_pred, z_tgt, m)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got_sum = weighted_masked_mse_latent(z_pred, z_tgt, m, channel_reduce="sum")
    assert got_sum.item() == pytest.approx(2 * want, rel=1e-6)
    with pytest.raises(ValueError, match="channel_reduce"):
        weighted_masked_mse_latent(z_pred, z_tgt, m, channel_reduce="max")


def test_weighted_mse_soft_mask_interpolates_weight():
    m = torch.full((1, 1, 1, 1), 0.25)  # no band in a single pixel thresholded below 0.5
    z = torch.ones(1, 1, 1, 1)
    got = weighted_masked_mse_latent(z, torch.zeros_like(z), m)
    assert got.item() == pytest.approx(0.25 * 1.0 + 0.75 * 0.2)


def test_background_preservation_hand_derived_and_full_mask_fallback():
    m = _square_mask(6, 0, 2)  # dilated by 1 -> rows/cols 0..2 -> outside = 36 - 9 = 27 pixels
    z_ctx = torch.zeros(1, 3, 6, 6)
    z_pred = z_ctx.clone()
    z_pred[0, :, 5, 5] = 3.0  # outside, channel-mean error 9
    z_pred[0, :, 0, 0] = 100.0  # inside: ignored
    assert background_preservation_mse_latent(z_pred, z_ctx, m).item() == pytest.approx(9 / 27)
    full = torch.ones(1, 1, 6, 6)
    assert background_preservation_mse_latent(z_pred, z_ctx, full).item() == 0.0


def test_dice_and_area_hand_derived():
    p = torch.zeros(2, 1, 4, 4)
    t = torch.zeros(2, 1, 4, 4)
    p[0, 0, :2, :2] = 1.0  # 4 px
    t[0, 0, :2, :4] = 1.0  # 8 px, overlap 4
    p[1, 0, 0, 0] = 0.5
    dice0 = 1 - (2 * 4 + 1) / (4 + 8 + 1)
    dice1 = 1 - (0 + 1) / (0.5 + 0 + 1)
    assert dice_loss(p, t).item() == pytest.approx((dice0 + dice1) / 2, rel=1e-6)
    area0 = math.log(5 / 9) ** 2
    area1 = math.log(1.5 / 1) ** 2
    assert area_ratio_loss(p, t).item() == pytest.approx((area0 + area1) / 2, rel=1e-6)


def test_dice_both_empty_is_zero_and_boundary_value():
    z = torch.zeros(3, 1, 5, 5, requires_grad=True)
    loss = dice_loss(z, torch.zeros(3, 1, 5, 5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert area_ratio_loss(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5)).item() == 0.0
    p = torch.tensor([[[[0.5, 1.0]]]])
    phi = torch.tensor([[[[2.0, -1.0]]]])
    assert boundary_loss(p, phi).item() == pytest.approx((1.0 - 1.0) / 2)


def test_soft_change_mask_statistics_by_hand():
    g = torch.Generator().manual_seed(0)
    z_ctx = torch.randn(2, 4, 8, 8, generator=g)
    z_pred = z_ctx + 0.3 * torch.randn(2, 4, 8, 8, generator=g)
    m = _square_mask(8, 2, 5, b=2)
    M_hat, stats, D = soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=m, k_sigma=2.0)
    assert stats.tau.shape == (2, 1, 1, 1) and stats.s.shape == (2, 1, 1, 1)
    assert M_hat.shape == D.shape == (2, 1, 8, 8)
    D_ref = (z_pred - z_ctx).norm(dim=1, keepdim=True)
    torch.testing.assert_close(D, D_ref)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[1:6, 1:6] = False
    for i in range(2):
        bg = D_ref[i, 0][outside]
        mean, std = bg.mean(), bg.std(unbiased=False)
        assert stats.tau[i].item() == pytest.approx((mean + 2 * std).item(), rel=1e-5)
        assert stats.s[i].item() == pytest.approx(std.item(), rel=1e-5)
    torch.testing.assert_close(M_hat, torch.sigmoid((D_ref - stats.tau) / stats.s))
    # fixed tau and s are used as given
    M_fix, st_fix, _ = soft_change_mask_from_latents(z_pred, z_ctx, tau=0.5, s=0.1)
    torch.testing.assert_close(M_fix, torch.sigmoid((D_ref - 0.5) / 0.1))
    assert st_fix.tau.shape == (2, 1, 1, 1)


def test_soft_change_mask_without_mask_uses_all_pixels():
    z_ctx = _latents(1, 4, 6, 6, seed=1)
    z_pred = _latents(1, 4, 6, 6, seed=2)
    _, stats, D = soft_change_mask_from_latents(z_pred, z_ctx)
    assert stats.tau.item() == pytest.approx((D.mean() + 2 * D.std(unbiased=False)).item(), rel=1e-5)


def test_scale_loss_spec_pipeline_uses_latent_mask():
    M_px = torch.zeros(64, 64)
    M_px[16:48, 16:48] = 1
    M_lat = downsample_mask_area(M_px, (8, 8))
    phi = signed_distance_map_from_mask(M_lat > 0.5, normalize=True)
    assert boundary_loss(M_lat, phi).item() < 0 < boundary_loss(1 - M_lat, phi).item()


# ---------------------------------------------------------------- gradients (float64)


def test_gradcheck_differentiable_losses_float64():
    g = torch.Generator().manual_seed(0)
    z_pred = torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z_tgt = torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64)
    m = _square_mask(5, 1, 3, b=2).double()
    m[1, 0, 4, 4] = 0.4
    assert torch.autograd.gradcheck(lambda z: weighted_masked_mse_latent(z, z_tgt, m), (z_pred,))
    assert torch.autograd.gradcheck(lambda z: background_preservation_mse_latent(z, z_tgt, m), (z_pred,))
    assert torch.autograd.gradcheck(
        lambda z: soft_change_mask_from_latents(z, z_tgt, tau=1.0, s=0.5)[0], (z_pred,)
    )
    assert torch.autograd.gradcheck(
        lambda z: soft_change_mask_from_latents(z, z_tgt, mask_latent=m, detach_stats=False)[0], (z_pred,)
    )
    p = torch.rand(2, 1, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    phi = signed_distance_map_from_mask(m > 0.5, normalize=True).double()
    assert torch.autograd.gradcheck(lambda q: dice_loss(q, m), (p,))
    assert torch.autograd.gradcheck(lambda q: area_ratio_loss(q, m), (p,))
    assert torch.autograd.gradcheck(lambda q: boundary_loss(q, phi), (p,))


def test_float64_stays_float64_and_bf16_computes_in_float32():
    z = _latents(1, 4, 8, 8, seed=0)
    m = _square_mask(8, 2, 6)
    assert weighted_masked_mse_latent(z.double(), 0 * z.double(), m).dtype == torch.float64
    lo = weighted_masked_mse_latent(z.bfloat16(), 0 * z.bfloat16(), m)
    assert lo.dtype == torch.float32
    ref = weighted_masked_mse_latent(z.bfloat16().float(), 0 * z, m)
    assert lo.item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------- properties


def _dice_area_cost(obj: int, mask: int, size: int = 32, seed: int = 0) -> float:
    """Dice + area cost of a prediction that inserts a centred square object of side ``obj``."""
    g = torch.Generator().manual_seed(seed)
    z_ctx = torch.randn(1, 4, size, size, generator=g)
    z_pred = z_ctx + 0.05 * torch.randn(1, 4, size, size, generator=g)
    lo = (size - obj) // 2
    z_pred[..., lo : lo + obj, lo : lo + obj] += 1.5
    lo_m = (size - mask) // 2
    m = _square_mask(size, lo_m, lo_m + mask)
    M_hat, _, _ = soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=m)
    return (0.9 * dice_loss(M_hat, m) + 0.2 * area_ratio_loss(M_hat, m)).item()


@settings(max_examples=8, deadline=None)
@given(mask=st.sampled_from([12, 14, 16, 18, 20]), seed=st.integers(0, 1000))
def test_dice_area_cost_grows_as_scale_moves_away(mask, seed):
    # Masks of 12-20 latent px on a 32 px grid; much smaller masks lose monotonicity once the object
    # spills past the margin into the background statistics (see docs/losses.md, "Small masks").
    at = _dice_area_cost(mask, mask, seed=seed)
    shrink = [_dice_area_cost(mask - d, mask, seed=seed) for d in (2, 4, 6)]
    grow = [_dice_area_cost(mask + d, mask, seed=seed) for d in (2, 4, 6) if mask + d <= 30]
    assert at < shrink[0] < shrink[1] < shrink[2]
    assert all(at < g for g in grow)
    assert all(a < b for a, b in zip(grow, grow[1:]))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lo=st.integers(1, 6),
    side=st.integers(1, 6),
    scale=st.floats(0.1, 50.0),
)
def test_background_preservation_ignores_edits_inside_mask(seed, lo, side, scale):
    g = torch.Generator().manual_seed(seed)
    z_ctx = torch.randn(2, 4, 14, 14, generator=g)
    z_pred = z_ctx + 0.1 * torch.randn(2, 4, 14, 14, generator=g)
    m = _square_mask(14, lo, lo + side, b=2)
    base = background_preservation_mse_latent(z_pred, z_ctx, m)
    edited = z_pred + scale * m * torch.randn(2, 4, 14, 14, generator=g)
    # the 1-pixel margin around the mask is also exempt
    edited_margin = z_pred + scale * (torch.nn.functional.max_pool2d(m, 3, 1, 1) - m)
    assert background_preservation_mse_latent(edited, z_ctx, m).item() == pytest.approx(base.item(), rel=1e-6)
    assert background_preservation_mse_latent(edited_margin, z_ctx, m).item() == pytest.approx(
        base.item(), rel=1e-6
    )


@settings(max_examples=25, deadline=None)
@given(lo=st.integers(4, 8), side=st.integers(3, 6), amp=st.floats(0.01, 10.0), band_r=st.integers(1, 2))
def test_band_error_costs_more_than_far_outside_error(lo, side, amp, band_r):
    size = 24
    m = _square_mask(size, lo, lo + side)
    z_tgt = torch.zeros(1, 4, size, size)
    band_px = z_tgt.clone()
    band_px[..., lo - 1, lo + side // 2] = amp  # just outside the contour: in the band
    far_px = z_tgt.clone()
    far_px[..., size - 1, 0] = amp  # a corner, far outside
    inside_px = z_tgt.clone()
    inside_px[..., lo + side // 2, lo + side // 2] = amp
    l_band = weighted_masked_mse_latent(band_px, z_tgt, m, band_r=band_r)
    l_far = weighted_masked_mse_latent(far_px, z_tgt, m, band_r=band_r)
    l_in = weighted_masked_mse_latent(inside_px, z_tgt, m, band_r=band_r)
    assert l_band.item() == pytest.approx(30 * l_far.item(), rel=1e-5)  # 6.0 / 0.2
    assert l_band > l_far
    if side > 2 * band_r:  # the centre pixel is interior, not band
        assert l_band > l_in > l_far


# ---------------------------------------------------------------- edge cases, float32 and bf16


def _edge_cases(dtype):
    size = 8
    z_ctx = _latents(2, 4, size, size, seed=3)
    changed = z_ctx + _latents(2, 4, size, size, seed=4)
    yield "empty mask", changed, z_ctx, torch.zeros(2, 1, size, size)
    yield "full mask", changed, z_ctx, torch.ones(2, 1, size, size)
    yield "identical latents", z_ctx.clone(), z_ctx, _square_mask(size, 2, 6, b=2)
    yield "zero predicted area", z_ctx.clone(), z_ctx, _square_mask(size, 1, 7, b=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_loss_is_finite_with_finite_grads_on_edge_cases(dtype):
    for name, z_pred0, z_ctx, m in _edge_cases(dtype):
        z_pred = z_pred0.to(dtype).requires_grad_(True)
        z_c = z_ctx.to(dtype)
        M_hat, stats, D = soft_change_mask_from_latents(z_pred, z_c, mask_latent=m)
        phi = signed_distance_map_from_mask(m > 0.5, normalize=True)
        parts = {
            "mse": weighted_masked_mse_latent(z_pred, z_c, m),
            "bg": background_preservation_mse_latent(z_pred, z_c, m),
            "dice": dice_loss(M_hat, m),
            "area": area_ratio_loss(M_hat, m),
            "boundary": boundary_loss(M_hat, phi),
        }
        for k, v in parts.items():
            assert v.dtype == torch.float32, (name, k)
            assert torch.isfinite(v), (name, k, v)
        assert torch.isfinite(stats.tau).all() and (stats.s > 0).all(), name
        total = sum(parts.values())
        total.backward()
        assert z_pred.grad is not None and z_pred.grad.dtype == dtype
        assert torch.isfinite(z_pred.grad.float()).all(), name


def test_documented_fallback_values():
    z_ctx = _latents(1, 4, 6, 6, seed=0)
    # identical latents: s floored at min_s, tau = mean + k * min_s
    M_hat, stats, D = soft_change_mask_from_latents(z_ctx.clone(), z_ctx, mask_latent=_square_mask(6, 2, 4))
    assert stats.s.item() == pytest.approx(1e-3)
    torch.testing.assert_close(M_hat, torch.full_like(M_hat, torch.sigmoid(torch.tensor(-2.0)).item()))
    # full mask: no sure background -> tau = 0, s = min_s
    _, stats_full, _ = soft_change_mask_from_latents(z_ctx + 1, z_ctx, mask_latent=torch.ones(1, 1, 6, 6))
    assert stats_full.tau.item() == 0.0 and stats_full.s.item() == pytest.approx(1e-3)
    # zero predicted area: eps of one pixel
    t = _square_mask(6, 0, 3)  # 9 px
    assert area_ratio_loss(torch.zeros_like(t), t).item() == pytest.approx(math.log(1 / 10) ** 2, rel=1e-6)


def test_mask_shape_errors_name_the_argument():
    z = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="mask_latent must be shaped"):
        weighted_masked_mse_latent(z, z, torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="z_tgt"):
        weighted_masked_mse_latent(z, torch.zeros(2, 4, 4, 4), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="smooth"):
        dice_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), smooth=0)
