"""The geometry total on precomputed mask targets, for training loops: two formulations.

``formulation="calibrated"`` (the trainer's default) is minimal, with zero gradient, at the target:
the prediction's soft change mask is compared with the *target's own* change mask, both taken
against the un-hinted scene under one per-sample temperature derived from the target, with a
squared (V-Net) Dice, the log area ratio against the target's change area, and a boundary term
``mean(|phi| (p - t)^2)`` that generalises Kervadec's loss to soft targets without rewarding
unbounded change.

``formulation="reference"`` is the reference composition: the same numbers as composing the functions of
``losses.geometry`` with the default weights (see ``docs/losses.md``); the change mask is compared with the
insertion mask.

Both take per-sample :class:`~losses.targets.MaskTargets` instead of recomputing morphology and the
SDM every step, share the ``z_pred - z_ctx`` difference between background preservation and the
change mask, and can weight each sample (e.g. by noise level) before the batch mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from .geometry import (
    NORM_EPS,
    ChangeMaskStats,
    area_ratio_per_sample,
    change_stats_from_background,
    compute_dtype,
    dice_per_sample,
    latent_weight_map,
)
from .targets import MaskTargets

__all__ = [
    "GeometryLossWeights",
    "FORMULATIONS",
    "LOSS_TERMS",
    "calibrated_change_stats",
    "geometry_loss",
    "noise_level_weight",
]

LOSS_TERMS = ("mse", "bg", "dice", "area", "boundary")
FORMULATIONS = ("calibrated", "reference")

NoiseWeightScheme = Literal["none", "one_minus_sigma", "one_minus_sigma_sq", "cosine", "inverse_sigma"]
NOISE_WEIGHTINGS = ("none", "one_minus_sigma", "one_minus_sigma_sq", "cosine", "inverse_sigma")
# inverse_sigma's floor: below it the weight stays 1 / INVERSE_SIGMA_FLOOR instead of growing without bound.
INVERSE_SIGMA_FLOOR = 0.1


@dataclass
class GeometryLossWeights:
    """Per-term weights of the total (defaults ``1.0 mse + 0.6 bg + 0.9 dice + 0.2 area + 0.4 boundary``).

    Attributes:
        mse: boundary-weighted reconstruction MSE against the target latents.
        bg: background preservation MSE against the context latents.
        dice: soft Dice between the change mask and the latent mask.
        area: squared log area ratio of change mask and latent mask.
        boundary: Kervadec boundary loss on the signed distance map.
    """

    mse: float = 1.0
    bg: float = 0.6
    dice: float = 0.9
    area: float = 0.2
    boundary: float = 0.4

    def as_dict(self) -> dict[str, float]:
        """``{"mse": ..., "bg": ..., "dice": ..., "area": ..., "boundary": ...}``."""
        return asdict(self)


def noise_level_weight(sigmas: Tensor, scheme: NoiseWeightScheme | str = "one_minus_sigma") -> Tensor:
    """Per-sample weight of the geometry terms from the noise level.

    At high ``sigma`` the predicted clean latents are a blurry average, so their geometry says little.

    Schemes: ``"none"`` -> 1; ``"one_minus_sigma"`` -> ``1 - sigma``; ``"one_minus_sigma_sq"`` ->
    ``(1 - sigma)^2``; ``"cosine"`` -> ``cos(pi/2 * sigma)``; ``"inverse_sigma"`` -> ``1 / max(sigma, 0.1)``.

    Where a scheme pushes: through ``z_pred = x_t - sigma * v_pred`` a squared term of ``z_pred`` has
    curvature ``sigma^2`` in the velocity, so its push on ``v_pred`` is ``sigma^2 * w(sigma)``:
    ``sigma^2 (1 - sigma)`` for ``one_minus_sigma`` (most at sigma 0.4-0.8, nothing at pure noise), ``sigma`` for
    ``inverse_sigma`` (growing toward pure noise, where the sampler sets the object's extent, and of the flow
    loss's order).

    Args:
        sigmas: ``[B]`` or ``[B, 1, ..., 1]`` noise levels in ``[0, 1]``.
        scheme: one of the names above.

    Returns:
        ``[B]`` float32 weights: in ``[0, 1]``, or in ``[1, 10]`` for ``inverse_sigma``.
    """
    s = sigmas.detach().float().reshape(sigmas.shape[0], -1)
    if s.shape[1] != 1:
        raise ValueError(f"sigmas must hold one value per sample ([B] or [B,1,..]); got {tuple(sigmas.shape)}")
    s = s[:, 0]
    if scheme == "none":
        return torch.ones_like(s)
    if scheme == "one_minus_sigma":
        return (1.0 - s).clamp(0.0, 1.0)
    if scheme == "one_minus_sigma_sq":
        return (1.0 - s).clamp(0.0, 1.0).square()
    if scheme == "cosine":
        return torch.cos(0.5 * math.pi * s.clamp(0.0, 1.0))
    if scheme == "inverse_sigma":
        return 1.0 / s.clamp(INVERSE_SIGMA_FLOOR, 1.0)
    raise ValueError(f"noise weighting scheme must be one of {NOISE_WEIGHTINGS}; got {scheme!r}")


class _ChannelErrors(torch.autograd.Function):
    """``(sum_c (zp - zt)^2, sum_c (zp - zc)^2)`` as ``[B, 1, H, W]`` maps, with a hand-written backward.

    The latents are the only large tensors in the loss; autograd would keep and traverse a chain of
    ``[B, C, H, W]`` intermediates per term. Here the forward makes two differences and two channel sums,
    and the backward one fused ``2 (d_t g_t + d_c g_c)`` pass, which roughly halves the work.
    """

    @staticmethod
    def forward(ctx, zp: Tensor, zt: Tensor, zc: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        d_t = zp - zt
        d_c = zp - zc
        ctx.save_for_backward(d_t, d_c)
        ctx.needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        # (d * d).sum(1) is ~6x faster on CPU than linalg.vector_norm over the channel dim
        return (d_t * d_t).sum(1, keepdim=True), (d_c * d_c).sum(1, keepdim=True)

    @staticmethod
    def backward(ctx, g_t: Tensor, g_c: Tensor):  # type: ignore[override]
        d_t, d_c = ctx.saved_tensors
        g_t2, g_c2 = 2.0 * g_t, 2.0 * g_c
        grad_zp = torch.addcmul(d_t * g_t2, d_c, g_c2)
        return (
            grad_zp,
            -(d_t * g_t2) if ctx.needs[0] else None,
            -(d_c * g_c2) if ctx.needs[1] else None,
        )


@torch.no_grad()
def calibrated_change_stats(
    D_tgt: Tensor, mask: Tensor, outside: Tensor, temperature: float = 0.25, min_s: float = 1e-3
) -> ChangeMaskStats:
    """One temperature per sample for the change masks of prediction and target, from the target alone.

    ``mu_in`` and ``mu_out`` are the target's mean change norm inside the mask (``mask >= 0.5``) and on
    the sure background; ``tau = (mu_in + mu_out) / 2`` and ``s = max(temperature * (mu_in - mu_out), min_s)``.
    A sample with no inside or no outside pixel uses the mean over all pixels for the missing side.
    The statistics are constants for autograd: they depend on the sample, not on the prediction.

    Args:
        D_tgt: ``[B, 1, H, W]`` change norm ``||z_tgt - z_ctx||`` over channels.
        mask: ``[B, 1, H, W]`` soft latent mask; outside: ``[B, 1, H, W]`` 0/1 sure background.
        temperature: sigmoid width as a fraction of the target's change contrast.

    Returns:
        :class:`~losses.geometry.ChangeMaskStats` with ``[B, 1, 1, 1]`` tensors.
    """
    dims = (1, 2, 3)
    inside = (mask >= 0.5).to(D_tgt.dtype)
    overall = D_tgt.mean(dims, keepdim=True)

    def region_mean(region: Tensor) -> Tensor:
        n = region.sum(dims, keepdim=True)
        m = (region * D_tgt).sum(dims, keepdim=True) / n.clamp_min(1.0)
        return torch.where(n > 0, m, overall)

    mu_in, mu_out = region_mean(inside), region_mean(outside.to(D_tgt.dtype))
    tau = 0.5 * (mu_in + mu_out)
    s = (temperature * (mu_in - mu_out)).clamp_min(min_s)
    return ChangeMaskStats(tau=tau, s=s)


def _check_inputs(z_pred: Tensor, z_tgt: Tensor, z_ctx: Tensor, targets: MaskTargets) -> None:
    if z_pred.ndim != 4:
        raise ValueError(f"z_pred must be [B, C, H, W] latents; got {tuple(z_pred.shape)}")
    for name, t in (("z_tgt", z_tgt), ("z_ctx", z_ctx)):
        if t.shape != z_pred.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match z_pred {tuple(z_pred.shape)}")
    b, _, h, w = z_pred.shape
    if targets.latent_size != (h, w) or targets.batch_size not in (1, b):
        raise ValueError(
            f"targets are [{targets.batch_size}, 1, {targets.latent_size[0]}, {targets.latent_size[1]}] but the "
            f"latents need [{b}, 1, {h}, {w}]; compute them with compute_mask_targets(mask_px, ({h}, {w}))"
        )


def geometry_loss(
    z_pred: Tensor,
    z_tgt: Tensor,
    z_ctx: Tensor,
    targets: MaskTargets,
    weights: GeometryLossWeights | None = None,
    *,
    w_in: float = 1.0,
    w_band: float = 6.0,
    w_out: float = 0.2,
    channel_reduce: str = "mean",
    k_sigma: float = 2.0,
    sample_weights: Tensor | None = None,
    min_s: float = 1e-3,
    detach_stats: bool = True,
    dice_smooth: float = 1.0,
    area_eps: float = 1.0,
    formulation: str = "calibrated",
    temperature: float = 0.25,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Geometry total ``1.0 mse + 0.6 bg + 0.9 dice + 0.2 area + 0.4 boundary`` on precomputed targets.

    Shared by both formulations: ``mse`` is the boundary-band weighted MSE against ``z_tgt``. The other
    terms use the change norm ``D = ||z_pred - z_ctx||`` over channels and ``p = sigmoid((D - tau) / s)``:

    - ``"calibrated"``: ``bg`` is ``(D - D_tgt)^2`` on the sure background, ``D_tgt = ||z_tgt - z_ctx||`` (the
      prediction should change the scene there as much as the target does: nearly nothing, but not less);
      ``t = sigmoid((D_tgt - tau) / s)`` is the target's own change mask,
      ``tau, s`` from :func:`calibrated_change_stats` (the target's change contrast); ``dice =
      sum (p - t)^2 / (sum p^2 + sum t^2 + smooth)``, ``area = log((sum p + eps) / (sum t + eps))^2`` with
      both sums over the mask and its band (not the sure background, whose drift is ``bg``'s business),
      ``boundary = mean(|phi| (p - t)^2)``. Every term is 0 with zero gradient at ``z_pred = z_tgt``.
    - ``"reference"`` (the reference composition): each term exactly as the function of the same name in
      :mod:`losses.geometry` (same fallbacks), ``bg`` the MSE against ``z_ctx`` on the sure background,
      ``tau, s`` from the prediction's own background, Dice and area against the insertion mask, and
      Kervadec's ``mean(p * phi)``. With ``sample_weights=None`` the total equals composing those functions
      with the same weights.

    Args:
        z_pred: ``[B, C, H, W]`` predicted clean latents (``x_t - sigma * v_pred``); any float dtype,
            computed in float32.
        z_tgt: ``[B, C, H, W]`` target latents.
        z_ctx: ``[B, C, H, W]`` latents of the *un-hinted* scene (the context without the mask hint): what
            "unchanged" means. With ``mask_hint: none`` these are the context latents.
        targets: :class:`MaskTargets` with ``B`` (or 1) samples at ``(H, W)``.
        weights: per-term weights (default :class:`GeometryLossWeights`).
        w_in, w_band, w_out: spatial weights of the ``mse`` term.
        channel_reduce: ``"mean"`` or ``"sum"`` over channels (``mse`` and ``bg``).
        k_sigma: change-mask threshold in background standard deviations.
        sample_weights: optional ``[B]`` weights (e.g. ``noise_level_weight(sigmas)``); the total is
            ``mean_b(sample_weights[b] * sum_k weight_k * term_k[b])``.
        min_s, detach_stats: change-mask temperature floor / whether its statistics are constants.
        dice_smooth, area_eps: pixel-unit smoothing of Dice and the area ratio.
        formulation: ``"calibrated"`` (default) or ``"reference"``.
        temperature: ``calibrated`` only: sigmoid width as a fraction of the target's change contrast.

    Returns:
        ``(total, parts)``: scalar total, and ``parts`` = ``{"mse", "bg", "dice", "area", "boundary"}``,
        each the plain batch mean of that term (not multiplied by term or sample weights).
    """
    _check_inputs(z_pred, z_tgt, z_ctx, targets)
    if channel_reduce not in ("mean", "sum"):
        raise ValueError(f"channel_reduce must be 'mean' or 'sum'; got {channel_reduce!r}")
    if formulation not in FORMULATIONS:
        hint = " (the reference composition is called 'reference')" if formulation == "seed" else ""
        raise ValueError(f"formulation must be one of {FORMULATIONS}; got {formulation!r}{hint}")
    weights = weights if weights is not None else GeometryLossWeights()
    dt = compute_dtype(z_pred)
    b, c = z_pred.shape[:2]
    zp = z_pred.to(dt)
    m = targets.mask.to(device=zp.device, dtype=dt)
    band = targets.band.to(device=zp.device, dtype=dt)
    outside = targets.outside.to(device=zp.device, dtype=dt)
    sdm = targets.sdm.to(device=zp.device, dtype=dt)
    if targets.batch_size != b:
        m, band, outside, sdm = (t.expand(b, -1, -1, -1) for t in (m, band, outside, sdm))
    dims = (1, 2, 3)

    # one channel reduction of z_pred - z_ctx feeds both the background MSE and the change norm
    sq_tgt, sq_ctx = _ChannelErrors.apply(zp, z_tgt.to(dt), z_ctx.to(dt))
    err_tgt = sq_tgt / c if channel_reduce == "mean" else sq_tgt
    mse = (latent_weight_map(m, band, w_in, w_band, w_out) * err_tgt).mean(dims)
    D = (sq_ctx + NORM_EPS).sqrt()
    n_out = outside.sum(dims).clamp_min(1.0)
    if formulation == "reference":
        err_ctx = sq_ctx / c if channel_reduce == "mean" else sq_ctx
        bg = (outside * err_ctx).sum(dims) / n_out
        stats = change_stats_from_background(D, outside, k_sigma, min_s, detach_stats)
        m_hat = torch.sigmoid((D - stats.tau) / stats.s.clamp_min(min_s))
        dice = dice_per_sample(m_hat, m, dice_smooth)
        area = area_ratio_per_sample(m_hat, m, area_eps)
        bnd = (m_hat * sdm).mean(dims)
    else:
        with torch.no_grad():
            D_tgt = ((z_tgt.to(dt) - z_ctx.to(dt)).square().sum(1, keepdim=True) + NORM_EPS).sqrt()
            stats = calibrated_change_stats(D_tgt, m, outside, temperature, min_s)
            t_hat = torch.sigmoid((D_tgt - stats.tau) / stats.s)
        # The object's own latents leak past the mask through the encoder's receptive field, so the target
        # itself changes the sure background a little; asking for exactly that much change (not zero) keeps
        # the term from rewarding a smaller object.
        bg_err = (D - D_tgt).square()
        bg = (outside * (bg_err / c if channel_reduce == "mean" else bg_err)).sum(dims) / n_out
        m_hat = torch.sigmoid((D - stats.tau) / stats.s)
        err = (m_hat - t_hat).square()
        dice = err.sum(dims) / (m_hat.square().sum(dims) + t_hat.square().sum(dims) + dice_smooth)
        # Area is counted where the object may be (the mask and its band): far-away background drift is
        # the bg term's business, and counted here it would let a smaller object compensate for it.
        near = 1.0 - outside
        area = area_ratio_per_sample(near * m_hat, near * t_hat, area_eps)
        bnd = (sdm.abs() * err).mean(dims)

    per_sample = {"mse": mse, "bg": bg, "dice": dice, "area": area, "boundary": bnd}
    w = weights.as_dict()
    total_per_sample = sum(w[k] * per_sample[k] for k in LOSS_TERMS)
    if sample_weights is None:
        total = total_per_sample.mean()
    else:
        sw = sample_weights.to(device=zp.device, dtype=dt).reshape(-1)
        if sw.numel() != b:
            raise ValueError(f"sample_weights must have B={b} values; got shape {tuple(sample_weights.shape)}")
        total = (sw * total_per_sample).mean()
    return total, {k: v.mean() for k, v in per_sample.items()}
