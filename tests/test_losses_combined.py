"""Precomputed mask targets and the combined geometry loss: the reference composition (``formulation="reference"``)
against its formulas written out independently in the test, and properties both formulations share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage

from losses import (
    GeometryLossWeights,
    MaskTargets,
    compute_mask_targets,
    downsample_mask_area,
    geometry_loss,
    noise_level_weight,
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


def _reference_targets(m_px: torch.Tensor, h: int, w: int, band_r: int) -> dict[str, torch.Tensor]:
    """Latent mask, band, sure background and normalised SDM, float64, computed directly with NumPy and SciPy.

    The latent mask averages each 8x8 pixel cell; the band is ``dilate(b, r) - erode(b, r)`` of ``b = mask > 0.5``
    with a (2r+1)^2 square (the image border erodes nothing); the sure background is ``1 - dilate(b, r)``;
    ``phi = d_in - 0.5`` outside and ``0.5 - d_out`` inside (exact Euclidean distances between pixel centres to
    the nearest inside / outside pixel), divided by its max ``|phi|``.
    """
    px = m_px.double().numpy()[:, 0]
    b = px.shape[0]
    mask = px.reshape(b, h, px.shape[1] // h, w, px.shape[2] // w).mean(axis=(2, 4))
    inside = mask > 0.5
    square = np.ones((2 * band_r + 1, 2 * band_r + 1), dtype=bool)
    dil = np.stack([ndimage.binary_dilation(m, square) for m in inside])
    ero = np.stack([ndimage.binary_erosion(m, square, border_value=1) for m in inside])
    sdm = []
    for m in inside:
        phi = np.where(m, 0.5 - ndimage.distance_transform_edt(m), ndimage.distance_transform_edt(~m) - 0.5)
        sdm.append(phi / np.abs(phi).max())
    as_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))[:, None]  # noqa: E731
    return {"mask": as_t(mask), "band": as_t(dil & ~ero), "outside": as_t(~dil), "sdm": as_t(np.stack(sdm))}


def _reference_terms(
    m_px, z_pred, z_tgt, z_ctx, *, band_r=1, w_band=6.0, channel_reduce="mean", k_sigma=2.0, min_s=1e-3
) -> dict[str, torch.Tensor]:
    """The five terms of the reference composition (``w_in=1, w_out=0.2``), float64 and written out:

    ``mse = mean(W * err_t)`` with ``W = w_band`` on the band else ``m + 0.2 (1 - m)``; ``bg`` the per-sample
    mean of ``err_c`` over the sure background; ``D = ||z_pred - z_ctx||`` over channels and
    ``M_hat = sigmoid((D - tau) / s)``, ``tau = mean + k std`` and ``s = std`` (population std, floored at
    ``min_s``) of ``D`` over the sure background, as constants; soft Dice and squared log area ratio with one pixel
    of smoothing, batch means; Kervadec's ``mean(M_hat * phi)``.
    """
    zp, zt, zc = z_pred.double(), z_tgt.double(), z_ctx.double()
    t = _reference_targets(m_px, zp.shape[-2], zp.shape[-1], band_r)
    m = t["mask"]
    reduce = (lambda e: e.mean(1, keepdim=True)) if channel_reduce == "mean" else (lambda e: e.sum(1, keepdim=True))
    weight = torch.where(t["band"] > 0, torch.full_like(m, w_band), m + 0.2 * (1 - m))
    mse = (weight * reduce((zp - zt) ** 2)).mean()
    out = t["outside"]
    bg = torch.stack([(o * e).sum() / o.sum() for o, e in zip(out, reduce((zp - zc) ** 2))]).mean()
    dist = ((zp - zc) ** 2).sum(1, keepdim=True).sqrt()
    tau, s = [], []
    for d, o in zip(dist.detach(), out):
        bg_values = d[o > 0]
        std = max(float(bg_values.std(unbiased=False)), min_s)
        tau.append(float(bg_values.mean()) + k_sigma * std)
        s.append(std)
    tau = torch.tensor(tau, dtype=torch.float64).view(-1, 1, 1, 1)
    m_hat = torch.sigmoid((dist - tau) / torch.tensor(s, dtype=torch.float64).view(-1, 1, 1, 1))
    dims = (1, 2, 3)
    dice = (1 - (2 * (m_hat * m).sum(dims) + 1) / (m_hat.sum(dims) + m.sum(dims) + 1)).mean()
    area = (torch.log((m_hat.sum(dims) + 1) / (m.sum(dims) + 1)) ** 2).mean()
    boundary = (m_hat * t["sdm"]).mean()
    return {"mse": mse, "bg": bg, "dice": dice, "area": area, "boundary": boundary}


DEFAULT_WEIGHTS = {"mse": 1.00, "bg": 0.60, "dice": 0.90, "area": 0.20, "boundary": 0.40}


def test_compute_mask_targets_match_the_direct_computation():
    m_px, *_ = _batch()
    t = compute_mask_targets(m_px, (12, 10), band_r=2)
    want = _reference_targets(m_px, 12, 10, band_r=2)
    for name in ("mask", "band", "outside", "sdm"):
        got = getattr(t, name)
        assert got.shape == (3, 1, 12, 10) and got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want[name], rtol=1e-6, atol=1e-6, msg=name)
    # The band and the sure background are neither empty nor everything (the comparison above is not vacuous).
    assert 0 < float(t.band.sum()) < t.band.numel() and 0 < float(t.outside.sum()) < t.outside.numel()
    single = compute_mask_targets(m_px[0, 0], (12, 10), band_r=2)
    assert single.batch_size == 1
    torch.testing.assert_close(single.sdm, t.sdm[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_formulation_equals_its_formulas_written_out(dtype):
    m_px, z_pred, z_tgt, z_ctx = _batch()
    zp = z_pred.to(dtype).requires_grad_(True)
    total, parts = geometry_loss(
        zp, z_tgt.to(dtype), z_ctx.to(dtype), compute_mask_targets(m_px, (12, 10)), formulation="reference"
    )
    # The reference sees the same (rounded) inputs, in float64.
    zp_ref = zp.detach().double().requires_grad_(True)
    want = _reference_terms(m_px, zp_ref, z_tgt.to(dtype), z_ctx.to(dtype))
    want_total = sum(DEFAULT_WEIGHTS[k] * want[k] for k in DEFAULT_WEIGHTS)
    assert set(parts) == set(DEFAULT_WEIGHTS)
    for k in parts:
        torch.testing.assert_close(parts[k].double(), want[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(total.double(), want_total.detach(), rtol=1e-5, atol=1e-6)
    total.backward()
    want_total.backward()
    # gradients come back in the input dtype: bf16 rounding (~0.4% relative) is the only difference
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(zp.grad.double(), zp_ref.grad, **tol)


def test_custom_weights_and_options_equal_the_formulas_written_out():
    m_px, z_pred, z_tgt, z_ctx = _batch(seed=1)
    t = compute_mask_targets(m_px, (12, 10), band_r=1)
    w = GeometryLossWeights(mse=2.0, bg=0.0, dice=1.5, area=0.0, boundary=0.1)
    total, parts = geometry_loss(
        z_pred, z_tgt, z_ctx, t, w, w_band=9.0, channel_reduce="sum", k_sigma=3.0, formulation="reference"
    )
    ref = _reference_terms(m_px, z_pred, z_tgt, z_ctx, w_band=9.0, channel_reduce="sum", k_sigma=3.0)
    want = 2.0 * ref["mse"] + 1.5 * ref["dice"] + 0.1 * ref["boundary"]
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-6)
    # Terms with weight 0 are still reported.
    torch.testing.assert_close(parts["bg"].double(), ref["bg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["area"].double(), ref["area"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("formulation", ["calibrated", "reference"])
def test_sample_weights_weight_each_sample_before_the_mean(formulation):
    m_px, z_pred, z_tgt, z_ctx = _batch()
    t = compute_mask_targets(m_px, (12, 10))
    sw = torch.tensor([1.0, 0.25, 0.0])
    total, _ = geometry_loss(z_pred, z_tgt, z_ctx, t, sample_weights=sw, formulation=formulation)
    singles = [
        geometry_loss(
            z_pred[i : i + 1], z_tgt[i : i + 1], z_ctx[i : i + 1], compute_mask_targets(m_px[i : i + 1], (12, 10)),
            formulation=formulation,
        )[0]
        for i in range(3)
    ]
    want = sum(sw[i] * singles[i] for i in range(3)) / 3
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sample_weights"):
        geometry_loss(z_pred, z_tgt, z_ctx, t, sample_weights=torch.ones(2))


@pytest.mark.parametrize("formulation", ["calibrated", "reference"])
def test_one_sample_targets_broadcast_over_the_batch(formulation):
    """Targets of one sample apply to every sample of the batch, as if repeated B times."""
    m_px, z_pred, z_tgt, z_ctx = _batch()
    one = m_px[:1]
    total, parts = geometry_loss(z_pred, z_tgt, z_ctx, compute_mask_targets(one, (12, 10)), formulation=formulation)
    repeated = one.expand(3, -1, -1, -1)
    total3, parts3 = geometry_loss(
        z_pred, z_tgt, z_ctx, compute_mask_targets(repeated, (12, 10)), formulation=formulation
    )
    torch.testing.assert_close(total, total3)
    if formulation == "reference":
        want = _reference_terms(repeated, z_pred, z_tgt, z_ctx)
        for k in DEFAULT_WEIGHTS:
            torch.testing.assert_close(parts[k].double(), want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("formulation", ["calibrated", "reference"])
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


@pytest.mark.parametrize("formulation", ["calibrated", "reference"])
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


def test_mask_targets_cache_roundtrip_batching_and_errors(tmp_path):
    """As the data pipeline uses them: ``to_dict`` per sample into safetensors, read back, and the samples'
    fields stacked into one batch's ``MaskTargets``."""
    m_px, *_ = _batch()
    t = compute_mask_targets(m_px, (12, 10))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"sample{i}.safetensors")
        save_file(compute_mask_targets(m_px[i : i + 1], (12, 10)).to_dict(), str(paths[i]))
    samples = [load_file(str(p)) for p in paths]
    assert set(samples[0]) == {"mask", "band", "outside", "sdm"}
    batch = MaskTargets(**{f: torch.cat([d[f] for d in samples]) for f in samples[0]})
    assert batch.batch_size == 3 and batch.latent_size == (12, 10)
    for name in ("mask", "band", "outside", "sdm"):
        assert torch.equal(getattr(batch, name), getattr(t, name)), name
    moved = t.to("cpu", dtype=torch.float64)
    assert moved.mask.device.type == "cpu" and moved.sdm.dtype == torch.float64
    with pytest.raises(ValueError, match="MaskTargets.band"):
        MaskTargets(mask=t.mask, band=t.band[:, :, :5], outside=t.outside, sdm=t.sdm)
    with pytest.raises(TypeError, match="MaskTargets.sdm"):
        MaskTargets(mask=t.mask, band=t.band, outside=t.outside, sdm=t.sdm.numpy())
    with pytest.raises(ValueError, match="formulation must be one of"):
        geometry_loss(torch.zeros(3, 4, 12, 10), torch.zeros(3, 4, 12, 10), torch.zeros(3, 4, 12, 10), t, formulation="x")
    with pytest.raises(ValueError, match="called 'reference'"):
        geometry_loss(torch.zeros(3, 4, 12, 10), torch.zeros(3, 4, 12, 10), torch.zeros(3, 4, 12, 10), t, formulation="seed")
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
