"""Latent-space geometry losses: boundary-weighted MSE, background preservation, soft change mask, Dice,
log area ratio and Kervadec's boundary loss.

The formulas, names, signatures and defaults follow the geometry-loss specification; they are the
public API of ``losses``.

Every function computes in float32 (float64 inputs stay float64, for gradient checks), whatever the
input dtype, and returns finite values and gradients on empty masks, full masks, identical latents and
zero predicted area. Shapes: latents ``[B, C, H, W]``, masks ``[B, 1, H, W]`` in ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .masks import boundary_band, outside_region

__all__ = [
    "ChangeMaskStats",
    "area_ratio_loss",
    "background_preservation_mse_latent",
    "boundary_loss",
    "change_stats_from_background",
    "area_ratio_per_sample",
    "dice_loss",
    "dice_per_sample",
    "latent_weight_map",
    "soft_change_mask_from_latents",
    "weighted_masked_mse_latent",
]

ChannelReduce = Literal["mean", "sum"]

# Added under the square root of the channel norm so that its gradient is 0, not NaN, where
# z_pred == z_ctx (identical latents).
NORM_EPS = 1e-12


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 tensors (gradient checks), float32 for everything else (bf16/fp16/fp32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_latents(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    if a.ndim != 4:
        raise ValueError(f"{names[0]} must be [B, C, H, W] latents; got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same shape"
        )


def _check_mask(mask: Tensor, like: Tensor, name: str) -> None:
    expected = (like.shape[0], 1, like.shape[2], like.shape[3])
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != like.shape[-2:] or mask.shape[0] not in (
        1,
        like.shape[0],
    ):
        raise ValueError(
            f"{name} must be shaped {expected} (latent resolution); got {tuple(mask.shape)}. "
            "Convert pixel masks with downsample_mask_area(M_px, (H, W))."
        )


def _channel_reduce(sq: Tensor, how: str) -> Tensor:
    if how == "mean":
        return sq.mean(dim=1, keepdim=True)
    if how == "sum":
        return sq.sum(dim=1, keepdim=True)
    raise ValueError(f"channel_reduce must be 'mean' or 'sum'; got {how!r}")


def latent_weight_map(
    mask_latent: Tensor, band: Tensor, w_in: float = 1.0, w_band: float = 6.0, w_out: float = 0.2
) -> Tensor:
    """Per-pixel weights of :func:`weighted_masked_mse_latent`.

    ``W = w_band`` on the boundary band, else ``w_in * m + w_out * (1 - m)`` (``m`` the soft mask, so
    partly covered cells interpolate).

    Args:
        mask_latent: ``[B, 1, H, W]`` soft mask in ``[0, 1]``.
        band: ``[B, 1, H, W]`` 0/1 boundary band.

    Returns:
        ``[B, 1, H, W]`` weights.
    """
    base = w_out + (w_in - w_out) * mask_latent
    return base + band * (w_band - base)


def weighted_masked_mse_latent(
    z_pred: Tensor,
    z_tgt: Tensor,
    mask_latent: Tensor,
    band_r: int = 1,
    w_in: float = 1.0,
    w_band: float = 6.0,
    w_out: float = 0.2,
    channel_reduce: ChannelReduce = "mean",
) -> Tensor:
    """Reconstruction MSE with boundary-band emphasis.

    ``loss = mean_b mean_hw( W * reduce_c (z_pred - z_tgt)^2 )`` with ``W`` from
    :func:`latent_weight_map` and the band ``boundary_band(mask_latent, band_r)``. The mean is over all
    pixels (not normalised by ``sum W``), so ``w_*`` are absolute per-pixel costs.

    Args:
        z_pred, z_tgt: ``[B, C, H, W]`` latents (any float dtype; computed in float32).
        mask_latent: ``[B, 1, H, W]`` mask in ``[0, 1]`` at latent resolution.
        band_r: boundary band radius in latent pixels.
        w_in, w_band, w_out: weights inside, on the band, and outside.
        channel_reduce: ``"mean"`` or ``"sum"`` over channels.

    Returns:
        Scalar loss (float32).
    """
    _check_latents(z_pred, z_tgt, ("z_pred", "z_tgt"))
    _check_mask(mask_latent, z_pred, "mask_latent")
    dt = compute_dtype(z_pred)
    m = mask_latent.to(dt)
    err = _channel_reduce((z_pred.to(dt) - z_tgt.to(dt)).square(), channel_reduce)
    weights = latent_weight_map(m, boundary_band(m, band_r).to(dt), w_in, w_band, w_out)
    return (weights * err).mean()


def background_preservation_mse_latent(
    z_pred: Tensor,
    z_ctx: Tensor,
    mask_latent: Tensor,
    band_r: int = 1,
    channel_reduce: ChannelReduce = "mean",
) -> Tensor:
    """MSE between prediction and context on the sure background ``outside = 1 - dilate(mask > 0.5, band_r)``.

    Per sample: ``sum(outside * reduce_c (z_pred - z_ctx)^2) / max(sum(outside), 1)``; batch mean.
    Fallback: a full (or nearly full) mask has no outside pixel and its sample contributes 0.

    Args:
        z_pred, z_ctx: ``[B, C, H, W]`` latents.
        mask_latent: ``[B, 1, H, W]`` mask in ``[0, 1]``.
        band_r: margin (latent pixels) around the mask that is not penalised.
        channel_reduce: ``"mean"`` or ``"sum"`` over channels.

    Returns:
        Scalar loss (float32).
    """
    _check_latents(z_pred, z_ctx, ("z_pred", "z_ctx"))
    _check_mask(mask_latent, z_pred, "mask_latent")
    dt = compute_dtype(z_pred)
    outside = outside_region(mask_latent, band_r).to(dt)
    err = _channel_reduce((z_pred.to(dt) - z_ctx.to(dt)).square(), channel_reduce)
    num = (outside * err).sum(dim=(1, 2, 3))
    den = outside.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return (num / den).mean()


@dataclass
class ChangeMaskStats:
    """Per-sample temperature of the soft change mask.

    Attributes:
        tau: ``[B, 1, 1, 1]`` threshold on the latent change norm ``D``.
        s: ``[B, 1, 1, 1]`` sigmoid temperature (> 0).
    """

    tau: Tensor
    s: Tensor


def change_stats_from_background(
    D: Tensor,
    background: Tensor | None,
    k_sigma: float = 2.0,
    min_s: float = 1e-3,
    detach: bool = True,
) -> ChangeMaskStats:
    """Estimate ``tau = mean_bg + k_sigma * std_bg`` and ``s = max(std_bg, min_s)`` per sample.

    Fallbacks: ``background=None`` uses every pixel; a sample with no background pixel (full mask) gets
    ``tau = 0, s = min_s`` (any change counts as change); zero spread (identical latents) floors ``s`` at
    ``min_s``. With ``detach=True`` (default) the statistics are constants for autograd.

    Args:
        D: ``[B, 1, H, W]`` change norm.
        background: ``[B, 1, H, W]`` 0/1 sure-background map, or ``None``.

    Returns:
        :class:`ChangeMaskStats` with ``[B, 1, 1, 1]`` tensors.
    """
    if detach:
        D = D.detach()
    if background is None:
        background = torch.ones_like(D)
    n = background.sum(dim=(1, 2, 3), keepdim=True)
    n_safe = n.clamp_min(1.0)
    mean = (background * D).sum(dim=(1, 2, 3), keepdim=True) / n_safe
    var = (background * (D - mean).square()).sum(dim=(1, 2, 3), keepdim=True) / n_safe
    # clamp before sqrt keeps the gradient finite (0) when the spread vanishes
    std = var.clamp_min(min_s * min_s).sqrt()
    has_bg = n > 0
    tau = torch.where(has_bg, mean + k_sigma * std, torch.zeros_like(mean))
    s = torch.where(has_bg, std, torch.full_like(std, min_s))
    return ChangeMaskStats(tau=tau, s=s)


def soft_change_mask_from_latents(
    z_pred: Tensor,
    z_ctx: Tensor,
    tau: Tensor | float | None = None,
    s: Tensor | float | None = None,
    mask_latent: Tensor | None = None,
    band_r: int = 1,
    k_sigma: float = 2.0,
    min_s: float = 1e-3,
    detach_stats: bool = True,
) -> tuple[Tensor, ChangeMaskStats, Tensor]:
    """Differentiable "where did the prediction change the context" mask.

    ``D = ||z_pred - z_ctx||_2`` over channels (computed as ``sqrt(sum + 1e-12)`` so identical latents give
    zero, finite gradients) and ``M_hat = sigmoid((D - tau) / s)``. Missing ``tau``/``s`` are estimated
    from the sure background ``1 - dilate(mask_latent > 0.5, band_r)`` (all pixels when ``mask_latent``
    is None) as ``tau = mean + k_sigma * std``, ``s = std``; see :func:`change_stats_from_background` for
    the fallbacks (full mask: ``tau = 0, s = min_s``; ``s`` is floored at ``min_s``; statistics are
    detached unless ``detach_stats=False``).

    Args:
        z_pred, z_ctx: ``[B, C, H, W]`` latents.
        tau, s: optional fixed threshold/temperature (floats or tensors broadcastable to ``[B, 1, 1, 1]``).
        mask_latent: optional ``[B, 1, H, W]`` target mask; recommended.
        band_r: margin excluded from the background statistics.
        k_sigma: threshold in background standard deviations.
        min_s: floor of the temperature.
        detach_stats: treat estimated statistics as constants for autograd.

    Returns:
        ``(M_hat, stats, D)``: ``M_hat`` ``[B, 1, H, W]`` in ``[0, 1]``; ``stats.tau``, ``stats.s``
        ``[B, 1, 1, 1]``; ``D`` ``[B, 1, H, W]``.
    """
    _check_latents(z_pred, z_ctx, ("z_pred", "z_ctx"))
    dt = compute_dtype(z_pred)
    d = z_pred.to(dt) - z_ctx.to(dt)
    D = (d.square().sum(dim=1, keepdim=True) + NORM_EPS).sqrt()
    b = D.shape[0]
    est: ChangeMaskStats | None = None
    if tau is None or s is None:
        background = None
        if mask_latent is not None:
            _check_mask(mask_latent, z_pred, "mask_latent")
            background = outside_region(mask_latent, band_r).to(dt).expand(b, -1, -1, -1)
        est = change_stats_from_background(D, background, k_sigma, min_s, detach_stats)

    def _per_sample(v: Tensor | float) -> Tensor:
        t = torch.as_tensor(v, dtype=dt, device=D.device)
        if t.numel() == b:
            t = t.reshape(b, 1, 1, 1)
        elif t.numel() != 1:
            raise ValueError(f"tau and s must be scalars or have B={b} values; got shape {tuple(t.shape)}")
        return t.reshape(-1, 1, 1, 1).expand(b, 1, 1, 1).clone()

    tau_t = est.tau if tau is None and est is not None else _per_sample(tau)
    s_t = (est.s if s is None and est is not None else _per_sample(s)).clamp_min(min_s)
    M_hat = torch.sigmoid((D - tau_t) / s_t)
    return M_hat, ChangeMaskStats(tau=tau_t, s=s_t), D


def dice_per_sample(p: Tensor, t: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss of each sample: ``[B, 1, H, W]`` x2 -> ``[B]`` (no dtype conversion)."""
    inter = (p * t).sum(dim=(1, 2, 3))
    den = p.sum(dim=(1, 2, 3)) + t.sum(dim=(1, 2, 3))
    return 1.0 - (2.0 * inter + smooth) / (den + smooth)


def area_ratio_per_sample(p: Tensor, t: Tensor, eps: float = 1.0) -> Tensor:
    """Squared log area ratio of each sample: ``[B, 1, H, W]`` x2 -> ``[B]`` (no dtype conversion)."""
    a_pred = p.sum(dim=(1, 2, 3)) + eps
    a_tgt = t.sum(dim=(1, 2, 3)) + eps
    return torch.log(a_pred / a_tgt).square()


def dice_loss(pred_mask: Tensor, target_mask: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth)`` per sample, batch mean.

    ``smooth`` is measured in pixels (default one pixel): both masks empty gives exactly 0, and the
    gradient stays bounded near empty masks.

    Args:
        pred_mask: ``[B, 1, H, W]`` soft mask in ``[0, 1]``.
        target_mask: ``[B, 1, H, W]`` mask in ``[0, 1]``.
        smooth: additive smoothing in pixel units (> 0).

    Returns:
        Scalar loss in ``[0, 1)`` (float32).
    """
    if smooth <= 0:
        raise ValueError(f"dice_loss smooth must be > 0 (pixels); got {smooth}")
    dt = compute_dtype(pred_mask)
    return dice_per_sample(pred_mask.to(dt), target_mask.to(dt), smooth).mean()


def area_ratio_loss(pred_mask: Tensor, target_mask: Tensor, eps: float = 1.0) -> Tensor:
    """Log area-ratio loss ``(log((A_pred + eps) / (A_tgt + eps)))^2`` per sample, batch mean.

    ``A = sum`` over pixels; ``eps`` is in pixels (default one pixel), so a zero predicted area gives a
    large but finite loss and gradient, and two empty masks give 0.

    Args:
        pred_mask: ``[B, 1, H, W]`` soft mask.
        target_mask: ``[B, 1, H, W]`` mask.
        eps: area offset in pixels (> 0).

    Returns:
        Scalar loss (float32).
    """
    if eps <= 0:
        raise ValueError(f"area_ratio_loss eps must be > 0 (pixels); got {eps}")
    dt = compute_dtype(pred_mask)
    return area_ratio_per_sample(pred_mask.to(dt), target_mask.to(dt), eps).mean()


def boundary_loss(pred_soft_mask: Tensor, signed_distance_map: Tensor) -> Tensor:
    """Kervadec boundary loss ``mean(p * phi)`` (over batch and pixels).

    Negative near the optimum (``p = 1`` exactly where ``phi < 0``); combine with region losses.

    Args:
        pred_soft_mask: ``[B, 1, H, W]`` soft mask ``p``.
        signed_distance_map: ``[B, 1, H, W]`` SDM ``phi`` of the ground-truth mask.

    Returns:
        Scalar loss (float32).
    """
    if pred_soft_mask.shape[-2:] != signed_distance_map.shape[-2:]:
        raise ValueError(
            f"pred_soft_mask {tuple(pred_soft_mask.shape)} and signed_distance_map "
            f"{tuple(signed_distance_map.shape)} must share the spatial size"
        )
    dt = compute_dtype(pred_soft_mask)
    return (pred_soft_mask.to(dt) * signed_distance_map.to(dt)).mean()

