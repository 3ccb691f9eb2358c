"""Resize, crop and flip a triplet identically, and turn it into tensors.

The crop window is computed once, in the source image's coordinates, and every image of the
triplet is resampled from exactly that window: context and target with Lanczos, the mask with
exact area averaging (each output pixel is the covered fraction of white, so the mask's area is
preserved; nearest-neighbour would not). A flip mirrors all three.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .sources import RawSample

CROP_MODES = ("center", "random")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: a pure function of (seed, epoch, index).

    Its first draw decides the flip (:func:`flip_decision`), the next ones the random crop, so
    cached and uncached runs flip the same samples.
    """
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def flip_decision(rng: np.random.Generator, flip: bool) -> bool:
    """Draw the flip coin from ``rng`` (always drawn, so later draws do not depend on ``flip``)."""
    return bool(rng.random() < 0.5) and flip


def crop_box(
    size: tuple[int, int],
    bucket: tuple[int, int],
    crop: str = "center",
    rng: np.random.Generator | None = None,
) -> tuple[int, int, int, int]:
    """The window (x0, y0, x1, y1) of the source image, in whole source pixels, that fills ``bucket`` after a resize.

    size: source (width, height); bucket: (W, H). The window spans the source's full width or
    full height and has the bucket's aspect ratio to the nearest pixel; ``center`` centres it,
    ``random`` places it uniformly over the whole-pixel offsets (needs ``rng``). Integer
    arithmetic throughout: a window computed in floats can land a rounding error outside the
    image (an offset of -1e-13), which Pillow refuses.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"data.crop must be one of {CROP_MODES}, got {crop!r}")
    w, h = (int(v) for v in size)
    bw, bh = (int(v) for v in bucket)
    if w < 1 or h < 1 or bw < 1 or bh < 1:
        raise ValueError(f"crop_box: image size {size} and bucket {bucket} must be positive")
    if w * bh >= h * bw:  # the source is at least as wide as the bucket: keep its height
        ch = h
        cw = min(w, max(1, (2 * h * bw + bh) // (2 * bh)))  # round(h * bw / bh) in integers
    else:
        cw = w
        ch = min(h, max(1, (2 * w * bh + bw) // (2 * bw)))
    if crop == "center":
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    else:
        if rng is None:
            raise ValueError("crop='random' needs an rng (see data.transforms.sample_rng)")
        ux, uy = float(rng.random()), float(rng.random())
        x0 = min(w - cw, int(ux * (w - cw + 1)))
        y0 = min(h - ch, int(uy * (h - ch + 1)))
    return (x0, y0, x0 + cw, y0 + ch)


def _area_resize_axis(x: np.ndarray, lo: float, hi: float, m: int, axis: int) -> np.ndarray:
    """Exact area average of ``x`` (piecewise constant along ``axis``) over ``m`` equal cells spanning [lo, hi]."""
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    cum = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)], axis=0)
    edges = np.clip(lo + (hi - lo) * np.arange(m + 1) / m, 0.0, n)
    i = np.minimum(np.floor(edges).astype(np.int64), n - 1)
    frac = (edges - i).reshape(-1, *([1] * (x.ndim - 1)))
    integral = cum[i] + frac * x[i]  # integral of x from 0 to each edge
    out = (integral[1:] - integral[:-1]) / ((hi - lo) / m)
    return np.moveaxis(out, 0, axis)


def area_resize(
    mask: np.ndarray, out_size: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Resample a 2-D array [H,W] to ``out_size`` (W', H') by exact area averaging over ``box`` (default: whole array).

    Returns float64 [H',W']. The mean over the box is preserved up to rounding.
    """
    h, w = mask.shape
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(w), float(h))
    out_w, out_h = out_size
    a = _area_resize_axis(mask.astype(np.float64), y0, y1, out_h, axis=0)
    return _area_resize_axis(a, x0, x1, out_w, axis=1)


def _rgb_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def prepare_sample(
    raw: RawSample,
    bucket: tuple[int, int],
    flip: bool = False,
    crop: str = "center",
    rng: np.random.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Resize (cover) and crop a triplet to ``bucket`` = (W, H), optionally mirror it, and convert to tensors.

    Returns ``context`` and ``target`` float32 [3,H,W] in [-1,1] and ``mask`` float32 [1,H,W] in
    [0,1]. The same window and flip apply to all three. No mask hint is drawn here.
    """
    if raw.context.size != raw.target.size or raw.mask.size != raw.target.size:
        raise ValueError(
            f"sample '{raw.name}': context {raw.context.size}, target {raw.target.size} and mask {raw.mask.size} "
            "must have the same size; run data.validate_source first"
        )
    bw, bh = bucket
    box = crop_box(raw.target.size, bucket, crop, rng)
    out = {
        "context": _rgb_tensor(raw.context.resize((bw, bh), Image.Resampling.LANCZOS, box=box)),
        "target": _rgb_tensor(raw.target.resize((bw, bh), Image.Resampling.LANCZOS, box=box)),
    }
    m = np.asarray(raw.mask.convert("L"), dtype=np.float64) / 255.0
    out["mask"] = torch.from_numpy(area_resize(m, (bw, bh), box)).float().clamp_(0.0, 1.0)[None]
    if flip:
        out = {k: torch.flip(v, dims=[-1]).contiguous() for k, v in out.items()}
    return out
