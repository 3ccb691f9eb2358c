"""Precomputed mask targets and the combined geometry loss: the ``seed`` formulation against the specification's
functions composed as in its usage example, and properties both formulations share."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from losses import (
    GeometryLoss,
    GeometryLossWeights,
    MaskTargets,
    area_ratio_loss,
    background_preservation_mse_latent,
    boundary_band,
    boundary_loss,
    compute_mask_targets,
    dice_loss,
    dilate,
    downsample_mask_area,
    geometry_loss,
    noise_level_weight,
    signed_distance_map_from_mask,
    soft_change_mask_from_latents,
    weighted_masked_mse_latent,
)


def _batch(b: int = 3, c: int = 4, h: int = 12, w: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m_px = torch.zeros(b, 1, 8 * h, 8 * w)
    for i in range(b):
        y, x = 8 * (1 + i), 8 * (2 + i)
        m_px[i, 0, y : y + 40 + 4 * i, x : x + 30] = 1.0
    z_ctx = torch.randn(b, c, h, w, generator=g)
    z_tgt = z_ctx + downsample_mask_area(m_px, (h, w)) * torch.randn(b, c, h, w, generator=g)
    z_pred = z_tgt + 0.3 * torch.randn(b, c, h, w, generator=g)
    return m_px, z_pred, z_tgt, z_ctx


def _seed_composition(m_px, z_pred, z_tgt, z_ctx, band_r=1, k_sigma=2.0):
    """The seed usage example, verbatim in structure."""
    M_lat = downsample_mask_area(m_px, (z_pred.shape[-2], z_pred.shape[-1]))
    L_mse = weighted_masked_mse_latent(z_pred, z_tgt, M_lat, band_r=band_r, w_in=1.0, w_band=6.0, w_out=0.2)
    L_bg = background_preservation_mse_latent(z_pred, z_ctx, M_lat, band_r=band_r)
    M_hat, stats, D = soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=M_lat, band_r=band_r, k_sigma=k_sigma)
    L_dice = dice_loss(M_hat, M_lat)
    L_area = area_ratio_loss(M_hat, M_lat)
    phi = signed_distance_map_from_mask(M_lat > 0.5, normalize=True)
    L_bnd = boundary_loss(M_hat, phi)
    parts = {"mse": L_mse, "bg": L_bg, "dice": L_dice, "area": L_area, "boundary": L_bnd}
    total = 1.00 * L_mse + 0.60 * L_bg + 0.90 * L_dice + 0.20 * L_area + 0.40 * L_bnd
    return total, parts


def test_compute_mask_targets_matches_seed_functions():
    m_px, z_pred, *_ = _batch()
    t = compute_mask_targets(m_px, (12, 10), band_r=2)
    M_lat = downsample_mask_area(m_px, (12, 10))
    torch.testing.assert_close(t.mask, M_lat)
    torch.testing.assert_close(t.band, boundary_band(M_lat, 2))
    torch.testing.assert_close(t.outside, 1 - dilate((M_lat > 0.5).float(), 2))
    torch.testing.assert_close(t.sdm, signed_distance_map_from_mask(M_lat > 0.5, normalize=True))
    for f in (t.mask, t.band, t.outside, t.sdm):
        assert f.shape == (3, 1, 12, 10) and f.dtype == torch.float32
    single = compute_mask_targets(m_px[0, 0], (12, 10), band_r=2)
    assert single.batch_size == 1
    torch.testing.assert_close(single.sdm, t.sdm[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geometry_loss_equals_seed_composition(dtype):
    m_px, z_pred, z_tgt, z_ctx = _batch()
    zp = z_pred.to(dtype).requires_grad_(True)
    zp_ref = z_pred.to(dtype).requires_grad_(True)
    total, parts = geometry_loss(
        zp, z_tgt.to(dtype), z_ctx.to(dtype), compute_mask_targets(m_px, (12, 10)), formulation="seed"
    )
    ref_total, ref_parts = _seed_composition(m_px, zp_ref, z_tgt.to(dtype), z_ctx.to(dtype))
    assert set(parts) == {"mse", "bg", "dice", "area", "boundary"}
    for k in parts:
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    total.backward()
    ref_total.backward()
    # gradients come back in the input dtype: bf16 rounding (~0.4% relative) is the only difference
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(zp.grad.float(), zp_ref.grad.float(), **tol)


def test_custom_weights_and_options_match_seed_functions():
    m_px, z_pred, z_tgt, z_ctx = _batch(seed=1)
    t = compute_mask_targets(m_px, (12, 10), band_r=1)
    w = GeometryLossWeights(mse=2.0, bg=0.0, dice=1.5, area=0.0, boundary=0.1)
    total, parts = geometry_loss(
        z_pred, z_tgt, z_ctx, t, w, w_band=9.0, channel_reduce="sum", k_sigma=3.0, formulation="seed"
    )
    M_lat = t.mask
    mse = weighted_masked_mse_latent(z_pred, z_tgt, M_lat, w_band=9.0, channel_reduce="sum")
    bg = background_preservation_mse_latent(z_pred, z_ctx, M_lat, channel_reduce="sum")
    M_hat, _, _ = soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=M_lat, k_sigma=3.0)
    want = 2.0 * mse + 1.5 * dice_loss(M_hat, M_lat) + 0.1 * boundary_loss(M_hat, t.sdm)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["bg"], bg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("formulation", ["calibrated", "seed"])
def test_sample_weights_weight_each_sample_before_the_mean(formulation):
    m_px, z_pred, z_tgt, z_ctx = _batch()
    t = compute_mask_targets(m_px, (12, 10))
    sw = torch.tensor([1.0, 0.25, 0.0])
    total, _ = geometry_loss(z_pred, z_tgt, z_ctx, t, sample_weights=sw, formulation=formulation)
    singles = [
        geometry_loss(z_pred[i : i + 1], z_tgt[i : i + 1], z_ctx[i : i + 1], t[i], formulation=formulation)[0]
        for i in range(3)
    ]
    want = sum(sw[i] * singles[i] for i in range(3)) / 3
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sample_weights"):
        geometry_loss(z_pred, z_tgt, z_ctx, t, sample_weights=torch.ones(2))


def test_module_wrapper_and_single_target_broadcast():
    m_px, z_pred, z_tgt, z_ctx = _batch()
    t = compute_mask_targets(m_px[:1], (12, 10))
    total, parts = GeometryLoss()(z_pred, z_tgt, z_ctx, t)
    t3 = MaskTargets.stack([t, t, t])
    total3, _ = geometry_loss(z_pred, z_tgt, z_ctx, t3)
    torch.testing.assert_close(total, total3)


@pytest.mark.parametrize("formulation", ["calibrated", "seed"])
def test_geometry_loss_gradcheck_float64(formulation):
    m_px, z_pred, z_tgt, z_ctx = _batch(b=2, c=2, h=5, w=5)
    t = compute_mask_targets(m_px, (5, 5))
    zp = z_pred.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: geometry_loss(
            z, z_tgt.double(), z_ctx.double(), t, detach_stats=False, formulation=formulation
        )[0],
        (zp,),
    )


@pytest.mark.parametrize("formulation", ["calibrated", "seed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geometry_loss_edge_cases_finite(dtype, formulation):
    _, z_pred, z_tgt, z_ctx = _batch(b=4)
    m_px = torch.zeros(4, 96, 80)
    m_px[1] = 1.0  # full mask
    m_px[2:, 20:60, 20:60] = 1.0
    t = compute_mask_targets(m_px, (12, 10))
    zp = z_pred.clone()
    zp[2] = z_ctx[2]  # identical latents -> also zero predicted area
    zp = zp.to(dtype).requires_grad_(True)
    total, parts = geometry_loss(zp, z_tgt.to(dtype), z_ctx.to(dtype), t, formulation=formulation)
    assert all(torch.isfinite(v) for v in parts.values()) and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(zp.grad.float()).all()


def test_mask_targets_roundtrip_stack_and_errors(tmp_path):
    m_px, *_ = _batch()
    t = compute_mask_targets(m_px, (12, 10))
    path = tmp_path / "targets.safetensors"
    save_file(t.to_dict(prefix="tgt."), str(path))
    back = MaskTargets.from_dict(load_file(str(path)), prefix="tgt.")
    for name in ("mask", "band", "outside", "sdm"):
        assert torch.equal(getattr(back, name), getattr(t, name))
    stacked = MaskTargets.stack([t[0], t[1], t[2]])
    assert torch.equal(stacked.sdm, t.sdm)
    assert MaskTargets.cat([t, t]).batch_size == 6
    assert t.to("cpu").mask.device.type == "cpu"
    with pytest.raises(KeyError, match="sdm"):
        MaskTargets.from_dict({"mask": t.mask, "band": t.band, "outside": t.outside})
    with pytest.raises(ValueError, match="MaskTargets.band"):
        MaskTargets(mask=t.mask, band=t.band[:, :, :5], outside=t.outside, sdm=t.sdm)
    with pytest.raises(ValueError, match="latent sizes"):
        MaskTargets.stack([t, compute_mask_targets(m_px, (6, 5))])
    with pytest.raises(ValueError, match="formulation must be one of"):
        geometry_loss(torch.zeros(3, 4, 12, 10), torch.zeros(3, 4, 12, 10), torch.zeros(3, 4, 12, 10), t, formulation="x")
    with pytest.raises(ValueError, match=r"compute_mask_targets\(mask_px, \(6, 6\)\)"):
        geometry_loss(torch.zeros(3, 4, 6, 6), torch.zeros(3, 4, 6, 6), torch.zeros(3, 4, 6, 6), t)


def test_noise_level_weight_schemes():
    sig = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(noise_level_weight(sig, "none"), torch.ones(3))
    torch.testing.assert_close(noise_level_weight(sig, "one_minus_sigma"), torch.tensor([1.0, 0.75, 0.0]))
    torch.testing.assert_close(noise_level_weight(sig.view(3, 1, 1, 1), "one_minus_sigma_sq"), torch.tensor([1.0, 0.5625, 0.0]))
    torch.testing.assert_close(
        noise_level_weight(sig, "cosine"), torch.tensor([1.0, math.cos(math.pi / 8), math.cos(math.pi / 2)])
    )
    with pytest.raises(ValueError, match="noise weighting scheme"):
        noise_level_weight(sig, "linear")


def test_fused_channel_errors_gradcheck_all_inputs():
    from losses.combined import _ChannelErrors

    g = torch.Generator().manual_seed(4)
    args = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda a, b, c: _ChannelErrors.apply(a, b, c), args)
