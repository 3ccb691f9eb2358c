"""Drawing the insertion mask into the context image, so the model can see where and how big.

FLUX.1 Kontext has no mask input. With ``data.mask_hint`` the context shows the region to fill:

- ``none``: the context is used as it is (it already shows a placeholder);
- ``fill``: the region (mask >= 0.5) is painted flat neutral grey;
- ``outline``: a band of ``outline_width`` pixels just inside the region's boundary is painted
  neutral grey (the image border does not count as a boundary).

Pixels outside the mask are never changed, so the region where the hinted context and the target
differ is exactly the insertion mask. Training, validation, inference and evaluation all call
these functions, so the hint is drawn the same way everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MASK_HINT_MODES = ("none", "fill", "outline")

# 0 in [-1, 1] is mid grey (127.5 in 8 bits): no hue, and equally far from black and white.
NEUTRAL_VALUE = 0.0


def default_outline_width(height: int, width: int) -> int:
    """Outline width in pixels when none is given: at least one 8-pixel latent cell, ~1.5% of the short side."""
    return max(8, min(height, width) // 64)


def _check_mode(mode: str) -> None:
    if mode not in MASK_HINT_MODES:
        raise ValueError(f"data.mask_hint must be one of {MASK_HINT_MODES}, got {mode!r}")


def _box_any(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Count of nonzero entries of 0/1 ``x`` within +-r along ``dim`` (zero padding), via a prefix sum: O(1) per pixel."""
    n = x.shape[dim]
    pad = [0, 0] * (x.dim() - (dim % x.dim()) - 1) + [r + 1, r]
    c = F.pad(x, pad).cumsum(dim)
    return c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)


def hint_region(mask: torch.Tensor, mode: str, outline_width: int | None = None) -> torch.Tensor:
    """Where the hint paints: bool tensor shaped like ``mask`` ([B,1,H,W] or [1,H,W]), always inside mask >= 0.5."""
    _check_mode(mode)
    inside = mask >= 0.5
    if mode == "none":
        return torch.zeros_like(inside)
    if mode == "fill":
        return inside
    h, w = mask.shape[-2:]
    r = default_outline_width(h, w) if outline_width is None else int(outline_width)
    if r < 1:
        raise ValueError(f"data.outline_width must be >= 1 pixel, got {r}")
    batched = inside.dim() == 4
    x = inside if batched else inside.unsqueeze(0)
    outside = (~x).float()
    # Zero padding: pixels beyond the image edge never count as "outside", so a region touching
    # the border gets no band along the border. Square window = chessboard distance <= r.
    near_outside = _box_any(_box_any(outside, r, dim=-1), r, dim=-2) > 0
    band = x & near_outside
    return band if batched else band.squeeze(0)


def apply_mask_hint(
    image: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    outline_width: int | None = None,
    value: float = NEUTRAL_VALUE,
) -> torch.Tensor:
    """Return ``image`` with the mask hint drawn in (a new tensor; the input is not modified).

    image: [B,3,H,W] or [3,H,W] in [-1,1]; mask: [B,1,H,W] or [1,H,W] in [0,1], same H,W.
    mode: one of :data:`MASK_HINT_MODES`; outline_width: band width in pixels for ``outline``
    (default :func:`default_outline_width`); value: the colour painted, in [-1,1].
    Only pixels with mask >= 0.5 can change.
    """
    if image.dim() != mask.dim() or image.shape[-2:] != mask.shape[-2:] or mask.shape[-3] != 1:
        raise ValueError(
            f"apply_mask_hint: image {tuple(image.shape)} and mask {tuple(mask.shape)} must be [B,3,H,W] and "
            "[B,1,H,W] (or [3,H,W] and [1,H,W]) with the same H and W"
        )
    region = hint_region(mask, mode, outline_width)
    if mode == "none":
        return image.clone()
    return torch.where(region.expand_as(image), torch.as_tensor(value, dtype=image.dtype, device=image.device), image)


def apply_mask_hint_pil(
    image: Image.Image,
    mask: Image.Image,
    mode: str,
    outline_width: int | None = None,
    value: float = NEUTRAL_VALUE,
) -> Image.Image:
    """PIL version of :func:`apply_mask_hint` (same code underneath): RGB image and ``L`` mask of equal size -> RGB."""
    if image.size != mask.size:
        raise ValueError(f"apply_mask_hint_pil: image {image.size} and mask {mask.size} must have the same size")
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None]
    region = hint_region(m, mode, outline_width)[0].numpy()
    out = rgb.copy()
    out[region] = int(round((value + 1.0) * 127.5))
    return Image.fromarray(out, mode="RGB")
