"""Per-sample mask targets, computed once per sample and cached (never once per step).

``compute_mask_targets`` turns a pixel mask into everything the geometry losses need at latent
resolution; ``MaskTargets`` holds them for a batch (built field by field from per-sample tensors), moves them
and flattens them for a safetensors cache (``to_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .distance import Backend, signed_distance_map_from_mask
from .masks import binarize, boundary_band, dilate, downsample_mask_area

__all__ = ["MaskTargets", "compute_mask_targets"]

_FIELDS = ("mask", "band", "outside", "sdm")


@dataclass
class MaskTargets:
    """Mask-derived targets of a batch, each float32 ``[B, 1, h, w]`` at latent resolution.

    Attributes:
        mask: soft latent mask in ``[0, 1]`` (area-downsampled pixel mask).
        band: 0/1 boundary band ``boundary_band(mask, band_r)``.
        outside: 0/1 sure background ``1 - dilate(mask > 0.5, band_r)``.
        sdm: signed distance map of ``mask > 0.5`` (see ``signed_distance_map_from_mask``).
    """

    mask: Tensor
    band: Tensor
    outside: Tensor
    sdm: Tensor

    def __post_init__(self) -> None:
        ref = self.mask.shape
        for name in _FIELDS:
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"MaskTargets.{name} must be a torch.Tensor; got {type(t).__name__}")
            if t.ndim != 4 or t.shape[1] != 1:
                raise ValueError(f"MaskTargets.{name} must be [B, 1, h, w]; got {tuple(t.shape)}")
            if t.shape != ref:
                raise ValueError(
                    f"MaskTargets.{name} has shape {tuple(t.shape)} but mask has {tuple(ref)}; "
                    "all four fields must come from the same compute_mask_targets call"
                )

    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return int(self.mask.shape[0])

    @property
    def latent_size(self) -> tuple[int, int]:
        """``(h, w)``."""
        return int(self.mask.shape[-2]), int(self.mask.shape[-1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MaskTargets:
        """Copy onto ``device`` (and optionally cast to ``dtype``); returns a new ``MaskTargets``."""
        return MaskTargets(**{n: getattr(self, n).to(device=device, dtype=dtype) for n in _FIELDS})

    def to_dict(self) -> dict[str, Tensor]:
        """``{"mask": ..., "band": ..., "outside": ..., "sdm": ...}`` with contiguous tensors (safetensors-ready)."""
        return {n: getattr(self, n).contiguous() for n in _FIELDS}


@torch.no_grad()
def compute_mask_targets(
    mask_px: Tensor,
    latent_size: tuple[int, int],
    band_r: int = 1,
    sdm_normalize: bool = True,
    sdm_backend: Backend = "auto",
) -> MaskTargets:
    """Compute the latent mask, boundary band, sure background and SDM of pixel masks.

    The results equal what the functions of :mod:`losses.geometry` compute inside for ``M_lat =
    downsample_mask_area(mask_px, latent_size)``, and ``phi = signed_distance_map_from_mask(M_lat > 0.5,
    normalize=sdm_normalize)``.

    Args:
        mask_px: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` pixel mask in ``[0, 1]`` (white = insert).
        latent_size: ``(h, w)`` latent height and width (pixel size / 8 for FLUX).
        band_r: band radius and background margin in latent pixels.
        sdm_normalize: scale each SDM by its max ``|phi|``.
        sdm_backend: EDT backend (``"auto"``, ``"scipy"``, ``"torch"``).

    Returns:
        :class:`MaskTargets` with float32 ``[B, 1, h, w]`` fields on ``mask_px.device``.
    """
    m = downsample_mask_area(mask_px, latent_size).float()
    b = binarize(m)
    return MaskTargets(
        mask=m,
        band=boundary_band(m, band_r),
        outside=1.0 - dilate(b, band_r),
        sdm=signed_distance_map_from_mask(b > 0.5, normalize=sdm_normalize, backend=sdm_backend),
    )
