"""Picture helpers for validation and evaluation reports: image grids, mask outlines, change-mask images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

OUTLINE_COLOR = (255, 32, 32)
CHANGE_COLOR = (255, 255, 255)
HEADER_HEIGHT = 18
BACKGROUND = (255, 255, 255)


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` (scalable with FreeType, the bitmap font otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def outline_width_for(size: tuple[int, int]) -> int:
    """Outline thickness in pixels for an image of (W, H): 1 px up to 256 px, then ~1/256 of the short side."""
    return max(1, min(size) // 256)


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Bool ``[H, W]`` band of ``width`` pixels just inside the contour of a bool ``[H, W]`` mask."""
    m = np.asarray(mask, dtype=bool)
    # border_value=1: the image edge is not a contour, so a mask touching it is not outlined along it
    eroded = ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), iterations=width, border_value=1)
    return m & ~eroded


def draw_mask_outline(
    image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = OUTLINE_COLOR, width: int | None = None
) -> Image.Image:
    """A copy of RGB ``image`` with the contour of bool ``[H, W]`` ``mask`` painted in ``color``."""
    rgb = np.asarray(image.convert("RGB")).copy()
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {rgb.shape[:2]} differ in size")
    rgb[mask_outline(mask, width or outline_width_for(image.size))] = color
    return Image.fromarray(rgb, mode="RGB")


def change_mask_image(changed: np.ndarray, insertion_mask: np.ndarray | None = None) -> Image.Image:
    """The change mask as a picture: white where changed, black elsewhere, the insertion mask's contour in red."""
    rgb = np.zeros((*changed.shape, 3), dtype=np.uint8)
    rgb[np.asarray(changed, dtype=bool)] = CHANGE_COLOR
    img = Image.fromarray(rgb, mode="RGB")
    return draw_mask_outline(img, insertion_mask) if insertion_mask is not None else img


def grid_cell_size(
    cell: tuple[int, int], nrows: int, ncols: int, header: int = 0, max_side: int | None = None
) -> tuple[int, int]:
    """The (W, H) of each cell of an ``nrows`` x ``ncols`` grid of ``cell``-sized images under ``max_side``.

    Without ``max_side``, or when the grid fits, the cell keeps its size. Otherwise both sides shrink by the same
    factor (floored, at least 1 px) so that neither ``ncols * W`` nor ``header + nrows * H`` exceeds ``max_side``.
    """
    cw, ch = cell
    if max_side is None or (ncols * cw <= max_side and header + nrows * ch <= max_side):
        return cw, ch
    if max_side <= header + nrows:
        raise ValueError(f"a grid of {nrows} rows does not fit in {max_side} px (header {header} px)")
    scale = min(max_side / (ncols * cw), (max_side - header) / (nrows * ch))
    return max(1, math.floor(cw * scale)), max(1, math.floor(ch * scale))


def make_grid(
    rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None = None, max_side: int | None = None
) -> Image.Image:
    """Tile images: ``rows[r][c]`` goes to row r, column c.

    Every cell is as large as the largest image (smaller ones are placed top-left on white), so a grid of
    R rows and C columns of (W, H) images is exactly ``(C * W, R * H)``, plus ``HEADER_HEIGHT`` pixels on
    top when ``labels`` (one per column) are given.

    ``max_side`` (optional) bounds the grid's longer side: when the grid would be larger, every image is
    downscaled (Lanczos, aspect kept) by one factor so that the cells (see :func:`grid_cell_size`) and the
    header fit. The header keeps its height, so labels stay readable.
    """
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one row with one image")
    ncols = len(rows[0])
    if any(len(r) != ncols for r in rows):
        raise ValueError(f"make_grid: every row must have {ncols} images; got {[len(r) for r in rows]}")
    if labels is not None and len(labels) != ncols:
        raise ValueError(f"make_grid: {len(labels)} labels for {ncols} columns")
    full_w = max(im.size[0] for r in rows for im in r)
    full_h = max(im.size[1] for r in rows for im in r)
    top = HEADER_HEIGHT if labels is not None else 0
    cw, ch = grid_cell_size((full_w, full_h), len(rows), ncols, top, max_side)
    grid = Image.new("RGB", (ncols * cw, top + len(rows) * ch), BACKGROUND)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            im = im.convert("RGB")
            if (cw, ch) != (full_w, full_h):
                w, h = im.size
                im = im.resize(
                    (max(1, round(w * cw / full_w)), max(1, round(h * ch / full_h))), Image.Resampling.LANCZOS
                )
            grid.paste(im, (c * cw, top + r * ch))
    if labels is not None:
        draw = ImageDraw.Draw(grid)
        f = font(11)
        for c, text in enumerate(labels):
            # shorten until the label fits its column
            t = text
            while t and draw.textlength(t, font=f) > cw - 4:
                t = t[:-1]
            draw.text((c * cw + 2, 3), t, fill=(0, 0, 0), font=f)
    return grid
