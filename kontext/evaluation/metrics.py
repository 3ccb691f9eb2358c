"""Does the object land in the mask at the right size? Change masks and per-sample metrics.

Used by training-time validation and by the evaluation command; see ``docs/metrics.md``.

The *change mask* is where the generated result differs from the ORIGINAL (un-hinted) context: the hint
drawn into the model's input is not part of the scene, so comparing against it would count an untouched
placeholder as "unchanged". Two recipes:

* pixel space (:func:`pixel_change_mask`): pixels whose RGB Euclidean distance exceeds a threshold are
  "changed"; a 3x3 morphological opening then deletes isolated pixels (drift spikes) without moving the
  outline of the object. Generation drifts a little everywhere (VAE round trip, re-rendered textures),
  so a fixed threshold is either too low (noise counts) or too high (a subtle product is missed). The
  threshold is therefore estimated per image from the *sure background* (pixels farther than ``band_px``
  from the insertion mask), as ``mean + k_sigma * std`` of the distance there - the drift's own level -
  floored at ``min_threshold``; or by Otsu's method when no mask is available. Enclosed holes are
  filled: an inserted object is solid, and holes appear only where its colour matches the scene behind it.
* latent space (:func:`latent_change_mask`): the same recipe as the training losses'
  ``soft_change_mask_from_latents`` (channel-wise L2 distance of ``[B, 16, h, w]`` latents, threshold
  ``mean + k_sigma * std`` over the sure background) but hard-thresholded. It needs no decoder, so it
  means something on any base model, including a tiny one whose VAE reconstructs poorly.

Images are ``[H, W, 3]`` or ``[3, H, W]`` numpy arrays or torch tensors in ``[0, 1]`` (uint8 is scaled);
masks are ``[H, W]`` with the object where the value is >= 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from losses.geometry import change_stats_from_background
from losses.masks import downsample_mask_area, outside_region

# Float images may overshoot [0, 1] by this much (unclamped VAE output) and are clipped; more is an error.
RANGE_SLACK = 0.05
# Identical images have infinite PSNR; a finite cap keeps means and plots usable.
PSNR_CAP_DB = 100.0
# Boundary tolerance as a fraction of the image diagonal (the DAVIS benchmark uses 0.008).
BOUNDARY_TOL_FRACTION = 0.008
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 x 11 window, the usual Gaussian SSIM
SSIM_K1, SSIM_K2 = 0.01, 0.03
# The largest RGB Euclidean distance between two colours in [0, 1].
MAX_RGB_DISTANCE = math.sqrt(3.0)
# A change-mask threshold is bounded to this: above it the background drifted so far that "changed" no longer
# separates the object from the scene, and an unbounded threshold (up to >= sqrt(3)) reports no change at all.
MAX_THRESHOLD = 0.5 * MAX_RGB_DISTANCE
# Dilations grow by whole pixels in all 8 directions (Chebyshev distance), like the losses' max-pool dilation.
_SQUARE = np.ones((3, 3), dtype=bool)

ArrayLike = Any  # numpy array, torch tensor or PIL image


# ----------------------------------------------------------------------------------------------- inputs
def as_image(image: ArrayLike, name: str = "image") -> np.ndarray:
    """An image as float64 ``[H, W, 3]`` in ``[0, 1]``.

    Accepts ``[H, W, 3]`` / ``[3, H, W]`` (torch tensors are read channels-first when ``shape[0] == 3``,
    numpy arrays channels-last when ``shape[-1] == 3``), grey ``[H, W]``, uint8 or float, and PIL images.
    Float values up to ``RANGE_SLACK`` outside ``[0, 1]`` are clipped; larger ones raise ValueError.
    """
    is_torch = isinstance(image, torch.Tensor)
    arr = image.detach().cpu().float().numpy() if is_torch else np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [H, W, 3] or [3, H, W]; got shape {arr.shape}")
    chw, hwc = arr.shape[0] == 3, arr.shape[-1] == 3
    if chw and (is_torch or not hwc):
        arr = np.moveaxis(arr, 0, -1)
    elif not hwc:
        raise ValueError(f"{name} must have 3 colour channels first or last; got shape {arr.shape}")
    if arr.size and (arr.min() < -RANGE_SLACK or arr.max() > 1 + RANGE_SLACK):
        raise ValueError(
            f"{name} values must lie in [0, 1] (got {arr.min():.3g}..{arr.max():.3g}); "
            "divide uint8-range floats by 255 or map [-1, 1] outputs with (x + 1) / 2"
        )
    # unclamped decoder output overshoots a little; clipping keeps distances in their [0, sqrt(3)] range
    return np.clip(arr, 0.0, 1.0)


def as_mask(mask: ArrayLike, name: str = "mask") -> np.ndarray:
    """A mask as bool ``[H, W]``: True where the value is >= 0.5 (uint8: >= 128).

    Accepts ``[H, W]``, ``[1, H, W]``, ``[H, W, 1]`` and ``[H, W, 3]`` (first channel), numpy, torch or PIL.
    """
    arr = mask.detach().cpu().float().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float64)
    elif arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [H, W] (or one channel of it); got shape {arr.shape}")
    return arr >= 0.5


def _same_size(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"{names} differ in size: {a.shape[:2]} vs {b.shape[:2]}; resize them to one size first")


def default_boundary_tolerance(height: int, width: int) -> float:
    """Boundary-match tolerance in pixels: ``0.008 * diagonal``, at least 1 px."""
    return max(1.0, BOUNDARY_TOL_FRACTION * math.hypot(height, width))


# --------------------------------------------------------------------------------------- change masks
@dataclass(frozen=True)
class ChangeMask:
    """A hard change mask with the evidence it came from.

    Attributes:
        mask: bool ``[H, W]``, True where the result changed the context.
        distance: float ``[H, W]``, the per-pixel colour distance that was thresholded.
        threshold: the threshold used (same units as ``distance``), at most ``max_threshold``.
        degenerate: True when the estimated threshold had to be bounded (it exceeded ``max_threshold``): the
            background changed about as much as an object would, so this sample's change mask, and every
            region metric from it, does not measure the insertion.
    """

    mask: np.ndarray
    distance: np.ndarray
    threshold: float
    degenerate: bool = False


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape): maximises the between-class variance of a histogram."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    mu_t = mu[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    # threshold at the upper edge of the last bin of class 0
    return float(edges[int(np.argmax(between)) + 1])


def pixel_change_mask(
    result: ArrayLike,
    context: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    method: Literal["background", "otsu"] = "background",
    k_sigma: float = 3.0,
    band_px: int = 2,
    min_threshold: float = 0.05,
    max_threshold: float = MAX_THRESHOLD,
    open_px: int = 1,
    fill_holes: bool = True,
) -> ChangeMask:
    """Where ``result`` differs from the original ``context``, in pixels.

    Args:
        result, context: images (see :func:`as_image`), same size. ``context`` must be the un-hinted scene.
        mask: optional insertion mask ``[H, W]``; with ``method="background"`` the threshold statistics come
            from pixels farther than ``band_px`` from it (all pixels without a mask).
        method: ``"background"`` (``mean + k_sigma * std`` of the sure-background distance) or ``"otsu"``.
        k_sigma: threshold in background standard deviations.
        band_px: margin around the mask excluded from the statistics, so the object's
            anti-aliased edge and shadow do not inflate them.
        min_threshold: lowest threshold (RGB Euclidean distance in [0, 1] units, max sqrt(3)); keeps rounding
            noise from counting when the background is reproduced exactly (e.g. composited outputs).
        max_threshold: highest threshold (default :data:`MAX_THRESHOLD`, half of sqrt(3)); a larger estimate is
            bounded to it and the result is flagged ``degenerate``.
        open_px: radius of a morphological opening (erode then dilate with a ``(2r+1)^2`` square) of the
            thresholded map; it deletes the isolated pixels where drift crosses the threshold without moving
            the outline of anything thicker than ``2r+1`` pixels (a blur or median would shift or round the
            edges and bias the area). 0 disables it.
        fill_holes: fill enclosed holes of the changed region.

    Returns:
        :class:`ChangeMask` with ``mask`` bool ``[H, W]``, ``distance`` ``[H, W]`` and ``threshold``.
    """
    if not 0.0 <= min_threshold <= max_threshold <= MAX_RGB_DISTANCE:
        raise ValueError(
            f"change-mask thresholds must satisfy 0 <= min_threshold <= max_threshold <= sqrt(3); "
            f"got min_threshold={min_threshold}, max_threshold={max_threshold}"
        )
    res, ctx = as_image(result, "result"), as_image(context, "context")
    _same_size(res, ctx, "result and context")
    distance = np.sqrt(((res - ctx) ** 2).sum(axis=-1))
    if method == "otsu":
        threshold = otsu_threshold(distance)
    elif method == "background":
        background = np.ones(distance.shape, dtype=bool)
        if mask is not None:
            m = as_mask(mask)
            _same_size(m, distance, "mask and result")
            background = ~ndimage.binary_dilation(m, _SQUARE, iterations=band_px) if band_px > 0 else ~m
        if background.any():
            bg = distance[background]
            threshold = float(bg.mean() + k_sigma * bg.std())
        else:
            threshold = 0.0  # the mask covers everything: any difference is change
    else:
        raise ValueError(f"method must be 'background' or 'otsu'; got {method!r}")
    threshold = max(threshold, float(min_threshold))
    degenerate = threshold > max_threshold
    threshold = min(threshold, float(max_threshold))
    changed = distance > threshold
    if open_px > 0:
        changed = ndimage.binary_opening(changed, _SQUARE, iterations=int(open_px))
    if fill_holes:
        changed = ndimage.binary_fill_holes(changed)
    return ChangeMask(mask=changed, distance=distance, threshold=threshold, degenerate=bool(degenerate))


def latent_change_mask(
    result_latents: torch.Tensor,
    context_latents: torch.Tensor,
    mask_latent: torch.Tensor | None = None,
    *,
    band_r: int = 1,
    k_sigma: float = 2.0,
    min_s: float = 1e-3,
) -> torch.Tensor:
    """Hard change mask in latent space: the training losses' soft change mask, thresholded at ``tau``.

    ``D = ||z_result - z_context||_2`` over channels; ``tau = mean + k_sigma * std`` of ``D`` over the sure
    background ``1 - dilate(mask_latent > 0.5, band_r)`` (all cells without a mask; ``tau = 0`` when the mask
    covers everything); changed where ``D > tau``. The soft mask ``sigmoid((D - tau) / s)`` is 0.5 exactly
    there, so this is that mask rounded.

    Args:
        result_latents, context_latents: ``[B, C, h, w]`` (or ``[C, h, w]``) latents of result and context.
        mask_latent: optional ``[B, 1, h, w]`` / ``[h, w]`` mask at latent resolution.

    Returns:
        bool ``[B, 1, h, w]``.
    """
    z_r, z_c = result_latents, context_latents
    if z_r.ndim == 3:
        z_r, z_c = z_r.unsqueeze(0), z_c.unsqueeze(0)
    if z_r.shape != z_c.shape or z_r.ndim != 4:
        raise ValueError(
            f"result and context latents must both be [B, C, h, w]; got {tuple(z_r.shape)} and {tuple(z_c.shape)}"
        )
    d = (z_r.detach().float() - z_c.detach().float()).square().sum(dim=1, keepdim=True).sqrt()
    background = None
    if mask_latent is not None:
        m = mask_latent.detach().float()
        while m.ndim < 4:
            m = m.unsqueeze(0)
        if m.shape[-2:] != d.shape[-2:]:
            raise ValueError(f"mask_latent is {tuple(m.shape[-2:])} but the latents are {tuple(d.shape[-2:])}")
        background = outside_region(m, band_r).expand_as(d)
    stats = change_stats_from_background(d, background, k_sigma=k_sigma, min_s=min_s)
    return d > stats.tau


def mask_to_latent(mask: ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """Pixel mask -> bool ``[h, w]`` at latent resolution (area average >= 0.5, the losses' downsampling)."""
    m = torch.from_numpy(as_mask(mask).astype(np.float32))
    return (downsample_mask_area(m, size)[0, 0] >= 0.5).numpy()


# ------------------------------------------------------------------------------------ region geometry
def iou(changed: np.ndarray, mask: np.ndarray) -> float:
    """Intersection over union of two bool ``[H, W]`` masks; 1.0 when both are empty."""
    union = np.logical_or(changed, mask).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(changed, mask).sum() / union)


def area_ratio(changed: np.ndarray, mask: np.ndarray) -> float:
    """``|changed| / |mask|`` (NaN for an empty mask): < 1 object too small, > 1 too big."""
    m = int(mask.sum())
    return float(changed.sum() / m) if m else float("nan")


def area_log_error(changed: np.ndarray, mask: np.ndarray) -> float:
    """``|ln((|changed| + 1) / (|mask| + 1))|``: symmetric scale error, finite for empty masks (+1 px)."""
    return abs(math.log((float(changed.sum()) + 1.0) / (float(mask.sum()) + 1.0)))


def _boundary(mask: np.ndarray) -> np.ndarray:
    # The image border is not a contour: erosion treats pixels beyond it as inside.
    return mask & ~ndimage.binary_erosion(mask, structure=_SQUARE, border_value=1)


def boundary_f_score(changed: np.ndarray, mask: np.ndarray, tolerance_px: float | None = None) -> float:
    """Boundary F-score: contour pixels matched within ``tolerance_px`` (Euclidean), harmonic mean of P and R.

    Precision = share of ``changed``'s contour pixels within the tolerance of ``mask``'s contour; recall the
    other way round. 1.0 when both contours are empty, 0.0 when only one is.
    """
    if tolerance_px is None:
        tolerance_px = default_boundary_tolerance(*mask.shape)
    bc, bm = _boundary(changed), _boundary(mask)
    if not bc.any() and not bm.any():
        return 1.0
    if not bc.any() or not bm.any():
        return 0.0
    dist_to_m = ndimage.distance_transform_edt(~bm)
    dist_to_c = ndimage.distance_transform_edt(~bc)
    precision = float((dist_to_m[bc] <= tolerance_px).mean())
    recall = float((dist_to_c[bm] <= tolerance_px).mean())
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------- image fidelity
def psnr(a: ArrayLike, b: ArrayLike, region: np.ndarray | None = None) -> float:
    """``10 log10(1 / MSE)`` over ``region`` (bool ``[H, W]``, all pixels when None) and channels, in dB.

    Capped at :data:`PSNR_CAP_DB` for identical pixels; NaN for an empty region.
    """
    x, y = as_image(a, "a"), as_image(b, "b")
    _same_size(x, y, "images")
    if region is not None:
        if not region.any():
            return float("nan")
        x, y = x[region], y[region]
    mse = float(((x - y) ** 2).mean())
    if mse <= 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return 10.0 * math.log10(1.0 / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """Normalised 1-D Gaussian ``[2 * radius + 1]``."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim_map(a: ArrayLike, b: ArrayLike, sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """Per-pixel SSIM ``[H, W]`` (mean over channels) with a Gaussian window, data range 1.

    Local statistics use an 11x11 Gaussian (sigma 1.5) with mirrored borders; ``C1 = (0.01)^2``,
    ``C2 = (0.03)^2``; ``SSIM = (2 mu_x mu_y + C1)(2 cov + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))``.
    """
    x, y = as_image(a, "a"), as_image(b, "b")
    _same_size(x, y, "images")
    w = gaussian_window(sigma, radius)

    def blur(z: np.ndarray) -> np.ndarray:
        # Separable filtering; "reflect" mirrors about the edge (d c b a | a b c d).
        z = ndimage.correlate1d(z, w, axis=0, mode="reflect")
        return ndimage.correlate1d(z, w, axis=1, mode="reflect")

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=-1)


def ssim(a: ArrayLike, b: ArrayLike, region: np.ndarray | None = None) -> float:
    """Mean of :func:`ssim_map` over ``region`` (bool ``[H, W]``; all pixels when None); NaN if empty."""
    s = ssim_map(a, b)
    if region is not None:
        if not region.any():
            return float("nan")
        s = s[region]
    return float(s.mean())


# ------------------------------------------------------------------------------------ per sample
@dataclass
class SampleMetrics:
    """Metrics of one generated sample; all plain floats (NaN where undefined).

    Attributes:
        iou: IoU of the changed region with the insertion mask.
        area_ratio: changed area / mask area.
        area_log_error: ``|ln((changed + 1) / (mask + 1))|``.
        boundary_f: boundary F-score at ``boundary_tol_px``.
        psnr_outside, ssim_outside: result vs context outside the dilated mask (background preservation).
        psnr_inside: result vs target inside the mask (NaN without a target).
        changed_area, mask_area: pixel counts.
        threshold: the change-mask threshold used.
        boundary_tol_px: the boundary tolerance used.
        threshold_degenerate: 1.0 when the threshold had to be bounded (:attr:`ChangeMask.degenerate`: the
            region metrics do not measure the insertion), 0.0 otherwise, NaN for a given change mask; the mean
            over samples is the fraction of degenerate samples.
    """

    iou: float
    area_ratio: float
    area_log_error: float
    boundary_f: float
    psnr_outside: float
    ssim_outside: float
    psnr_inside: float
    changed_area: float
    mask_area: float
    threshold: float
    boundary_tol_px: float
    threshold_degenerate: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """``{field: float}``."""
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass
class LatentMetrics:
    """Region metrics on the latent grid (see :func:`latent_sample_metrics`); plain floats."""

    iou: float
    area_ratio: float
    area_log_error: float
    boundary_f: float
    changed_area: float
    mask_area: float

    def as_dict(self) -> dict[str, float]:
        """``{field: float}``."""
        return {k: float(v) for k, v in asdict(self).items()}


def region_metrics(changed: np.ndarray, mask: np.ndarray, tolerance_px: float | None = None) -> dict[str, float]:
    """IoU, area ratio, its log error and boundary F of two bool ``[H, W]`` masks."""
    return {
        "iou": iou(changed, mask),
        "area_ratio": area_ratio(changed, mask),
        "area_log_error": area_log_error(changed, mask),
        "boundary_f": boundary_f_score(changed, mask, tolerance_px),
    }


def sample_metrics(
    result: ArrayLike,
    context: ArrayLike,
    mask: ArrayLike,
    target: ArrayLike | None = None,
    *,
    changed: ArrayLike | None = None,
    outside_dilate_px: int | None = None,
    boundary_tol_px: float | None = None,
    **change_kwargs: Any,
) -> SampleMetrics:
    """All metrics of one sample.

    Args:
        result: generated image; context: the ORIGINAL (un-hinted) context; target: optional ground truth;
            all ``[H, W, 3]`` / ``[3, H, W]`` in ``[0, 1]``.
        mask: insertion mask ``[H, W]``.
        changed: a precomputed change mask ``[H, W]``; by default :func:`pixel_change_mask` with ``mask`` and
            ``change_kwargs``.
        outside_dilate_px: the mask is dilated by this many pixels before PSNR/SSIM outside it, so the object's
            soft edge and shadow do not count as background damage (default ``max(2, round(0.02 * diag))``).
        boundary_tol_px: boundary F tolerance (default :func:`default_boundary_tolerance`).

    Returns:
        :class:`SampleMetrics`.
    """
    res, ctx = as_image(result, "result"), as_image(context, "context")
    m = as_mask(mask)
    _same_size(res, ctx, "result and context")
    _same_size(m, res, "mask and result")
    threshold = degenerate = float("nan")
    if changed is None:
        cm = pixel_change_mask(res, ctx, m, **change_kwargs)
        changed_mask, threshold, degenerate = cm.mask, cm.threshold, float(cm.degenerate)
    else:
        changed_mask = as_mask(changed, "changed")
        _same_size(changed_mask, m, "changed and mask")
    h, w = m.shape
    tol = float(boundary_tol_px) if boundary_tol_px is not None else default_boundary_tolerance(h, w)
    dil = outside_dilate_px if outside_dilate_px is not None else max(2, round(0.02 * math.hypot(h, w)))
    outside = ~ndimage.binary_dilation(m, _SQUARE, iterations=dil) if dil > 0 else ~m
    psnr_in = float("nan")
    if target is not None:
        tgt = as_image(target, "target")
        _same_size(tgt, res, "target and result")
        psnr_in = psnr(res, tgt, m)
    geo = region_metrics(changed_mask, m, tol)
    return SampleMetrics(
        **geo,
        psnr_outside=psnr(res, ctx, outside),
        ssim_outside=ssim(res, ctx, outside),
        psnr_inside=psnr_in,
        changed_area=float(changed_mask.sum()),
        mask_area=float(m.sum()),
        threshold=threshold,
        boundary_tol_px=tol,
        threshold_degenerate=degenerate,
    )


def latent_sample_metrics(
    result_latents: torch.Tensor,
    context_latents: torch.Tensor,
    mask: ArrayLike,
    *,
    band_r: int = 1,
    k_sigma: float = 2.0,
    boundary_tol_px: float = 1.0,
) -> LatentMetrics:
    """Region metrics of one sample on the latent grid.

    Args:
        result_latents, context_latents: ``[C, h, w]`` or ``[1, C, h, w]`` latents (VAE-normalised or not, as
            long as both are the same kind).
        mask: insertion mask, at pixel ``[H, W]`` (area-downsampled) or latent ``[h, w]`` resolution.
        boundary_tol_px: tolerance in latent cells.

    Returns:
        :class:`LatentMetrics`.
    """
    z_r = result_latents if result_latents.ndim == 4 else result_latents.unsqueeze(0)
    if z_r.shape[0] != 1:
        raise ValueError(f"latent_sample_metrics takes one sample; got a batch of {z_r.shape[0]}")
    h, w = z_r.shape[-2:]
    m = mask_to_latent(mask, (h, w))
    changed = latent_change_mask(
        z_r, context_latents, torch.from_numpy(m.astype(np.float32)), band_r=band_r, k_sigma=k_sigma
    )[0, 0].numpy()
    geo = region_metrics(changed, m, boundary_tol_px)
    return LatentMetrics(**geo, changed_area=float(changed.sum()), mask_area=float(m.sum()))


def aggregate(metrics: Iterable[SampleMetrics | LatentMetrics | Mapping[str, float]]) -> dict[str, float]:
    """Mean of every field over samples, ignoring NaNs (a field NaN everywhere stays NaN); adds ``count``."""
    rows = [m.as_dict() if hasattr(m, "as_dict") else dict(m) for m in metrics]
    if not rows:
        return {"count": 0.0}
    keys = list(rows[0])
    out: dict[str, float] = {}
    for k in keys:
        vals = np.array([float(r.get(k, float("nan"))) for r in rows], dtype=np.float64)
        finite = vals[~np.isnan(vals)]
        out[k] = float(finite.mean()) if finite.size else float("nan")
    out["count"] = float(len(rows))
    return out


METRIC_FIELDS = tuple(f.name for f in fields(SampleMetrics))
