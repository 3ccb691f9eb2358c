"""Per-sample mask targets, computed once per sample and cached (never once per step).

``compute_mask_targets`` turns a pixel mask into everything the geometry losses need at latent
resolution; ``MaskTargets`` batches, moves and (de)serialises them (e.g. into a safetensors cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MaskTargets:
        """Copy onto ``device`` (and optionally cast to ``dtype``); returns a new ``MaskTargets``."""
        return MaskTargets(**{n: getattr(self, n).to(device=device, dtype=dtype) for n in _FIELDS})

    def to_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """``{prefix + "mask": ..., prefix + "band": ..., ...}`` with contiguous tensors (safetensors-ready)."""
        return {prefix + n: getattr(self, n).contiguous() for n in _FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor], prefix: str = "") -> MaskTargets:
        """Inverse of :meth:`to_dict`; raises ``KeyError`` naming the missing key."""
        missing = [prefix + n for n in _FIELDS if prefix + n not in d]
        if missing:
            raise KeyError(
                f"mask-target dict lacks {missing}; it must hold {[prefix + n for n in _FIELDS]} as written by "
                "MaskTargets.to_dict() (rebuild the cache if it predates this format)"
            )
        return cls(**{n: d[prefix + n].float() for n in _FIELDS})

    @classmethod
    def stack(cls, items: Sequence[MaskTargets]) -> MaskTargets:
        """Concatenate targets (each with ``B >= 1``) along the batch dimension."""
        items = list(items)
        if not items:
            raise ValueError("MaskTargets.stack needs at least one MaskTargets")
        sizes = {t.latent_size for t in items}
        if len(sizes) > 1:
            raise ValueError(
                f"MaskTargets.stack got different latent sizes {sorted(sizes)}; batch samples of one "
                "resolution bucket together"
            )
        return cls(**{n: torch.cat([getattr(t, n) for t in items], dim=0) for n in _FIELDS})

    def __getitem__(self, index: int | slice | Tensor) -> MaskTargets:
        """Select samples (keeps the batch dimension for integer indices)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return MaskTargets(**{n: getattr(self, n)[index] for n in _FIELDS})


@torch.no_grad()
def compute_mask_targets(
    mask_px: Tensor,
    latent_size: tuple[int, int],
    band_r: int = 1,
    sdm_normalize: bool = True,
    sdm_backend: Backend = "auto",
) -> MaskTargets:
    """Compute the latent mask, boundary band, sure background and SDM of pixel masks.

    The results equal what the seed API computes inside its losses for ``M_lat =
    downsample_mask_area(mask_px, latent_size)`` and ``phi = signed_distance_map_from_mask(M_lat > 0.5,
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
