"""Mask utilities at latent resolution: area downsampling and pooling morphology.

All functions take and return masks shaped ``[B, 1, h, w]`` with values in ``[0, 1]``.
``downsample_mask_area`` also accepts ``[H, W]`` and ``[B, H, W]`` pixel masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "as_mask_batch",
    "binarize",
    "boundary_band",
    "dilate",
    "downsample_mask_area",
    "erode",
    "outside_region",
]


def as_mask_batch(mask: Tensor, name: str = "mask") -> Tensor:
    """Return ``mask`` viewed as ``[B, 1, H, W]``.

    Args:
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` (any dtype; bool is kept).
        name: argument name used in the error message.

    Raises:
        ValueError: for any other shape, naming ``name``.
    """
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask[:, None]
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask
    raise ValueError(
        f"{name} must be shaped [H, W], [B, H, W] or [B, 1, H, W]; got {tuple(mask.shape)}. "
        "Pass a single-channel mask (e.g. mask[:, :1] or image.mean(1, keepdim=True))."
    )


def binarize(mask: Tensor) -> Tensor:
    """Float 0/1 mask of ``mask > 0.5`` (bool masks: ``mask`` itself), same shape, float32."""
    if mask.dtype == torch.bool:
        return mask.float()
    return (mask > 0.5).float()


def downsample_mask_area(M_px: Tensor, size: tuple[int, int]) -> Tensor:
    """Area-preserving resize of a pixel mask to latent resolution.

    Uses ``F.interpolate(mode="area")`` (average pooling when shrinking), so a latent cell holds the
    fraction of its pixels covered by the mask and the mask's total area is preserved.

    Args:
        M_px: pixel mask ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` in ``[0, 1]`` (bool allowed).
        size: ``(h, w)`` target (latent) size.

    Returns:
        ``[B, 1, h, w]`` float32 mask in ``[0, 1]`` (``B = 1`` for a ``[H, W]`` input).
    """
    m = as_mask_batch(M_px, "M_px")
    m = m.float() if m.dtype != torch.float64 else m
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be two positive ints (latent height, width); got {size!r}")
    if tuple(m.shape[-2:]) == (h, w):
        return m.clone()
    return F.interpolate(m, size=(h, w), mode="area")


def dilate(mask: Tensor, r: int = 1) -> Tensor:
    """Morphological dilation with a ``(2r+1) x (2r+1)`` square (max pooling, stride 1).

    Pixels beyond the image border never count as mask, so dilation does not grow from the edge.

    Args:
        mask: ``[B, 1, H, W]`` float mask (binary or soft; soft values dilate as a max filter).
        r: radius in pixels; ``r = 0`` returns the mask unchanged.

    Returns:
        ``[B, 1, H, W]`` tensor of ``mask``'s dtype.
    """
    if r < 0:
        raise ValueError(f"dilation radius r must be >= 0; got {r}")
    if r == 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * r + 1, stride=1, padding=r)


def erode(mask: Tensor, r: int = 1) -> Tensor:
    """Morphological erosion with a ``(2r+1) x (2r+1)`` square: ``1 - dilate(1 - mask, r)``.

    The image border is not a contour: a mask touching the edge is not eroded from the edge
    (a full mask stays full), because pixels beyond the border are ignored by the pooling.

    Args:
        mask: ``[B, 1, H, W]`` float mask in ``[0, 1]``.
        r: radius in pixels; ``r = 0`` returns the mask unchanged.

    Returns:
        ``[B, 1, H, W]`` tensor of ``mask``'s dtype.
    """
    if r < 0:
        raise ValueError(f"erosion radius r must be >= 0; got {r}")
    if r == 0:
        return mask
    return 1.0 - dilate(1.0 - mask, r)


def boundary_band(mask_latent: Tensor, r: int = 1) -> Tensor:
    """Band of width ``~2r`` around the mask contour: ``dilate(b, r) - erode(b, r)``, ``b = mask > 0.5``.

    Args:
        mask_latent: ``[B, 1, h, w]`` mask in ``[0, 1]`` (soft masks are thresholded at 0.5; bool allowed).
        r: band radius in latent pixels.

    Returns:
        ``[B, 1, h, w]`` float32 0/1 band (empty for an empty or a full mask).
    """
    b = binarize(mask_latent)
    return dilate(b, r) - erode(b, r)


def outside_region(mask_latent: Tensor, r: int = 1) -> Tensor:
    """Sure-background region ``1 - dilate(mask > 0.5, r)``.

    Args:
        mask_latent: ``[B, 1, h, w]`` mask in ``[0, 1]`` (bool allowed).
        r: safety margin (latent pixels) kept away from the mask.

    Returns:
        ``[B, 1, h, w]`` float32 0/1 map, 1 where a pixel is farther than ``r`` (Chebyshev) from the mask.
    """
    return 1.0 - dilate(binarize(mask_latent), r)
