"""Synthetic insertion triplets: one fixed product painted into procedurally drawn scenes.

Each sample is a (context, target, mask, prompt) quadruple in the project's folder format:

* ``context/NAME.png`` - a procedural scene (gradient, texture, clutter shapes), RGB;
* ``target/NAME.png``  - the same scene with the product composited so that it fills the insertion region;
* ``mask/NAME.png``    - ``L`` mode, 255 exactly where the product's silhouette is, 0 elsewhere;
* ``prompts/NAME.txt`` - the instruction.

The target equals the context bit for bit wherever the mask is 0, so the region where the two images
differ is exactly the mask - the property the change-mask losses assume. Mask areas span
``area_range`` (2% to 50% of the image by default), with many aspect ratios and positions, so scale
errors are visible. Contexts are the raw scenes; the trainer draws its mask hint into them itself.

Generate a set (a second run with the same arguments is a no-op)::

    python -m data.synthetic --root data/synthetic_product --num-samples 64 --size 128
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm
from .errors import WriteError, file_in_the_way, writing
from .locking import atomic_folder, exclusive_lock

# Bump when drawing changes, so manifests written by an older generator are regenerated.
GENERATOR_VERSION = 1

PRODUCT_NAME = "Kolo orange soda can"
PRODUCT_PROMPT = (
    "Insert the Kolo orange soda can (orange body, white label band, blue star logo) into the marked region"
)

# Product palette (RGB). Distinct from anything the scene generator draws with high probability:
# the scene palette is sampled, the product is fixed.
_BODY = (242, 107, 29)
_BODY_SHADE = (196, 74, 12)
_LID = (70, 74, 84)
_LID_HIGHLIGHT = (170, 176, 186)
_BAND = (250, 250, 245)
_LOGO_DISC = (24, 56, 160)
_LOGO_STAR = (255, 214, 0)
_STRIPE = (24, 56, 160)

# Products are rendered at this multiple of the output size and box-filtered down, so the colours of
# edge pixels are anti-aliased; the silhouette is then thresholded at half coverage (see render_product).
_SUPERSAMPLE = 4

# Width/height ratios of the insertion box (log-uniform in this range, clipped to what fits).
ASPECT_RANGE = (0.35, 2.8)


# --------------------------------------------------------------------------------------------- scene


def _random_colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Linear gradient between two random colours at a random angle, float ``[H, W, 3]`` in 0..255."""
    c0 = np.array(_random_colour(rng, 20, 236), dtype=np.float32)
    c1 = np.array(_random_colour(rng, 20, 236), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = (xx / max(width - 1, 1) - 0.5) * math.cos(angle) + (yy / max(height - 1, 1) - 0.5) * math.sin(angle)
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A low-amplitude texture (stripes, checks, blobs or grain), float ``[H, W, 1]`` centred on 0."""
    kind = int(rng.integers(0, 4))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    amp = rng.uniform(6, 22)
    if kind == 0:  # stripes
        period = rng.uniform(6, 24)
        angle = rng.uniform(0, math.pi)
        tex = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    elif kind == 1:  # checks
        cell = int(rng.integers(6, 20))
        tex = (((xx // cell) + (yy // cell)) % 2) * 2.0 - 1.0
    elif kind == 2:  # smooth blobs: upsampled coarse noise
        coarse = rng.standard_normal((max(height // 16, 2), max(width // 16, 2))).astype(np.float32)
        img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        tex = np.asarray(img, dtype=np.float32)
        tex = tex / max(float(np.abs(tex).max()), 1e-6)
    else:  # fine grain
        tex = rng.standard_normal((height, width)).astype(np.float32) * 0.5
    return (amp * tex)[..., None]


def _draw_clutter(rng: np.random.Generator, image: Image.Image) -> None:
    """Draw random rectangles, ellipses, polygons and lines onto ``image`` in place."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    scale = min(width, height)
    for _ in range(int(rng.integers(3, 10))):
        kind = int(rng.integers(0, 4))
        colour = _random_colour(rng)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.03, 0.25) * scale, rng.uniform(0.03, 0.25) * scale
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        elif kind == 2:
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
            radii = rng.uniform(0.4, 1.0, size=n)
            pts = [(cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)) for a, r in zip(angles, radii)]
            draw.polygon(pts, fill=colour)
        else:
            x1, y1 = rng.uniform(0, width), rng.uniform(0, height)
            draw.line([(cx, cy), (x1, y1)], fill=colour, width=int(rng.integers(1, max(2, scale // 24))))


def draw_scene(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Draw one procedural scene: gradient background, texture, clutter shapes, a light blur.

    Args:
        rng: the random generator; the scene is a deterministic function of its state.
        width, height: image size in pixels.

    Returns:
        An RGB ``PIL.Image`` of size ``(width, height)``.
    """
    base = _gradient(rng, width, height) + _texture(rng, width, height)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    _draw_clutter(rng, image)
    if rng.uniform() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    return image


# ------------------------------------------------------------------------------------------- product


def _star(cx: float, cy: float, r_out: float, r_in: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _silhouette_corner_radius(width: float, height: float) -> float:
    return 0.14 * min(width, height)


def render_product(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Render the product so that it fills a ``width x height`` box.

    The product is a soda can: orange rounded body with a darker side shade, grey lid and rim, a white
    label band with a blue disc and yellow star logo, and a blue stripe under the band. The design is
    stretched to the box, so any aspect ratio keeps the same identity.

    Args:
        width, height: box size in pixels (>= 1 each).

    Returns:
        ``(rgb, mask)``: ``rgb`` uint8 ``[height, width, 3]`` (colours inside the silhouette, anti-aliased
        at its edge) and ``mask`` bool ``[height, width]``, True where at least half of the pixel is covered
        by the product's silhouette.
    """
    if width < 1 or height < 1:
        raise ValueError(f"product box must be at least 1x1 pixel; got {width}x{height}")
    s = _SUPERSAMPLE
    W, H = width * s, height * s
    rgb = Image.new("RGB", (W, H), (0, 0, 0))
    alpha = Image.new("L", (W, H), 0)
    radius = _silhouette_corner_radius(W, H)
    ImageDraw.Draw(alpha).rounded_rectangle([0, 0, W - 1, H - 1], radius=radius, fill=255)

    d = ImageDraw.Draw(rgb)
    d.rectangle([0, 0, W, H], fill=_BODY)
    d.rectangle([int(W * 0.78), 0, W, H], fill=_BODY_SHADE)  # side shade reads as a cylinder
    lid_h = max(1, int(H * 0.09))
    d.rectangle([0, 0, W, lid_h], fill=_LID)
    d.rectangle([int(W * 0.15), int(lid_h * 0.3), int(W * 0.55), int(lid_h * 0.7)], fill=_LID_HIGHLIGHT)
    d.rectangle([0, H - max(1, int(H * 0.06)), W, H], fill=_LID)
    band_top, band_bot = int(H * 0.34), int(H * 0.70)
    d.rectangle([0, band_top, W, band_bot], fill=_BAND)
    stripe_h = max(1, int(H * 0.05))
    d.rectangle([0, band_bot + stripe_h, W, band_bot + 2 * stripe_h], fill=_STRIPE)
    # Logo: a disc with a star, centred in the band, kept round regardless of the box's aspect.
    r = 0.42 * min(band_bot - band_top, W)
    cx, cy = W * 0.45, (band_top + band_bot) / 2
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_LOGO_DISC)
    d.polygon(_star(cx, cy, 0.8 * r, 0.35 * r), fill=_LOGO_STAR)

    return _downsample_supersampled(rgb, alpha, width, height)


def _downsample_supersampled(
    rgb: Image.Image, alpha: Image.Image, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter a drawing made at ``_SUPERSAMPLE`` x the size down to ``width x height``.

    With premultiplied alpha, so edge colours are not darkened by the black outside the silhouette.
    Returns uint8 ``[height, width, 3]`` colours and the bool silhouette (pixels at least half covered).
    """
    s = _SUPERSAMPLE
    a = np.asarray(alpha, dtype=np.float32) / 255.0
    premul = np.asarray(rgb, dtype=np.float32) * a[..., None]
    premul = premul.reshape(height, s, width, s, 3).mean(axis=(1, 3))
    cover = a.reshape(height, s, width, s).mean(axis=(1, 3))
    colour = premul / np.maximum(cover, 1e-6)[..., None]
    return np.clip(np.round(colour), 0, 255).astype(np.uint8), cover >= 0.5


# Share of the product's box height that its orange body spans (below the lid, above the bottom rim).
_BODY_TOP, _BODY_BOTTOM = 0.09, 0.94


def product_box(
    image: np.ndarray, scene: np.ndarray, near: tuple[int, int, int, int] | None = None,
    colour_tol: float = 70.0, change_tol: float = 20.0, trim: float = 0.02,
) -> tuple[float, float, float, float] | None:
    """The product's box ``(x0, y0, x1, y1)`` in ``image``, estimated from its orange body; None if none is seen.

    Robust to blur, where the label, logo and lid lose their colours: the body's orange survives. Pixels that
    differ from the scene by more than ``change_tol`` and lie within ``colour_tol`` of the body or its shade
    are collected (only inside ``near``, a search box, when given), their coordinates trimmed at the
    ``trim`` / ``1 - trim`` quantiles against stray pixels, and the vertical extent widened by the lid and rim
    the body does not cover. On the synthetic targets the box matches the mask's box (see
    ``benchmarks/scale_fidelity.py``, which reports it as the oracle).

    Args:
        image, scene: ``[H, W, 3]`` in 0..255. near: ``(x0, y0, x1, y1)`` pixel search box, or None.

    Returns:
        The box in pixels (``x1``, ``y1`` exclusive), or None when fewer than 4 body pixels are found.
    """
    img = np.asarray(image, dtype=np.float32)
    ref = np.asarray(scene, dtype=np.float32)
    if img.shape != ref.shape or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"product_box: image {img.shape} and scene {ref.shape} must both be [H, W, 3]")
    body = np.asarray((_BODY, _BODY_SHADE), dtype=np.float32)
    hit = (np.linalg.norm(img[:, :, None, :] - body[None, None], axis=-1) < colour_tol).any(-1)
    hit &= np.linalg.norm(img - ref, axis=-1) > change_tol
    if near is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in near)
        region = np.zeros_like(hit)
        region[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
        hit &= region
    ys, xs = np.nonzero(hit)
    if len(xs) < 4:
        return None
    bx0, bx1 = np.quantile(xs, [trim, 1 - trim])
    by0, by1 = np.quantile(ys, [trim, 1 - trim])
    bx1, by1 = bx1 + 1.0, by1 + 1.0
    h = (by1 - by0) / (_BODY_BOTTOM - _BODY_TOP)
    return float(bx0), float(by0 - _BODY_TOP * h), float(bx1), float(by0 - _BODY_TOP * h + h)


def _fill_fraction(width: float, height: float) -> float:
    """Silhouette area / box area of the rounded rectangle (used to hit a requested mask area)."""
    r = _silhouette_corner_radius(width, height)
    return 1.0 - (4.0 - math.pi) * r * r / (width * height)


# ----------------------------------------------------------------------------- general objects (pretraining)

# Named colours of the general insertion task; every name is a word of the tiny tokenizers' corpus.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (40, 80, 210),
    "yellow": (240, 210, 40),
    "white": (240, 240, 236),
    "black": (28, 28, 32),
    "brown": (130, 82, 45),
    "purple": (128, 60, 170),
    "pink": (236, 120, 170),
    "orange": (245, 130, 30),
    "silver": (176, 180, 188),
}
OBJECT_SHAPES = ("box", "disc", "can", "bag", "jar")


def _object_silhouette(shape: str, W: int, H: int) -> Image.Image:
    """``L`` image of the shape's silhouette filling a ``W x H`` box (255 inside)."""
    alpha = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(alpha)
    if shape == "box":
        d.rounded_rectangle([0, 0, W - 1, H - 1], radius=0.04 * min(W, H), fill=255)
    elif shape == "disc":
        d.ellipse([0, 0, W - 1, H - 1], fill=255)
    elif shape == "can":
        d.rounded_rectangle([0, 0, W - 1, H - 1], radius=_silhouette_corner_radius(W, H), fill=255)
    elif shape == "bag":  # wider at the bottom
        d.polygon([(0.18 * W, 0), (0.82 * W, 0), (W - 1, H - 1), (0, H - 1)], fill=255)
    elif shape == "jar":  # a neck on a rounded body
        d.rectangle([0.28 * W, 0, 0.72 * W, 0.25 * H], fill=255)
        d.rounded_rectangle([0, 0.18 * H, W - 1, H - 1], radius=0.2 * min(W, H), fill=255)
    else:
        raise ValueError(f"unknown object shape {shape!r}; expected one of {OBJECT_SHAPES}")
    return alpha


def render_object(
    rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Render a random object of the general insertion task filling a ``width x height`` box.

    A shape from :data:`OBJECT_SHAPES` in a colour from :data:`OBJECT_COLOURS`, with a shaded side and, at
    random, a band, stripes or a disc in a second colour: a family the product belongs to, without being
    the product. Edges are anti-aliased and the silhouette thresholded at half coverage, as
    :func:`render_product`.

    Returns:
        ``(rgb, mask, description)``: uint8 ``[height, width, 3]``, bool ``[height, width]``, and a phrase
        such as ``"red can"`` for the prompt.
    """
    if width < 1 or height < 1:
        raise ValueError(f"object box must be at least 1x1 pixel; got {width}x{height}")
    names = list(OBJECT_COLOURS)
    shape = OBJECT_SHAPES[int(rng.integers(len(OBJECT_SHAPES)))]
    colour = names[int(rng.integers(len(names)))]
    second = names[int(rng.integers(len(names)))]
    base = np.array(OBJECT_COLOURS[colour], dtype=np.float32)
    accent = tuple(int(v) for v in OBJECT_COLOURS[second])
    s = _SUPERSAMPLE
    W, H = width * s, height * s
    rgb = Image.new("RGB", (W, H), tuple(int(v) for v in base))
    d = ImageDraw.Draw(rgb)
    shade = tuple(int(v) for v in base * 0.72)
    d.rectangle([int(W * rng.uniform(0.7, 0.85)), 0, W, H], fill=shade)
    decoration = int(rng.integers(4))
    if decoration == 1:  # a band across
        top = rng.uniform(0.25, 0.55)
        d.rectangle([0, int(H * top), W, int(H * (top + rng.uniform(0.15, 0.35)))], fill=accent)
    elif decoration == 2:  # vertical stripes
        n = int(rng.integers(2, 5))
        for k in range(n):
            x0 = W * (k + 0.3) / n
            d.rectangle([int(x0), 0, int(x0 + 0.35 * W / n), H], fill=accent)
    elif decoration == 3:  # a disc logo
        r = 0.3 * min(W, H)
        cx, cy = W * rng.uniform(0.35, 0.6), H * rng.uniform(0.35, 0.65)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=accent)
    obj, silhouette = _downsample_supersampled(rgb, _object_silhouette(shape, W, H), width, height)
    return obj, silhouette, f"{colour} {shape}"


def make_insertion_sample(
    rng: np.random.Generator,
    width: int,
    height: int,
    area_range: tuple[float, float] = (0.01, 0.5),
) -> tuple[Triplet, str]:
    """One sample of the general insertion task the tiny base model is pretrained on.

    A procedural scene and a random object (:func:`render_object`) in a random box whose area is
    log-uniform in ``area_range`` (aspect ratio as :func:`sample_box`). Returns the :class:`Triplet`
    (``target`` equals ``context`` wherever ``mask`` is 0) and its prompt, e.g.
    ``"Insert the red can into the marked region"``.
    """
    area = math.exp(rng.uniform(math.log(area_range[0]), math.log(area_range[1])))
    context = draw_scene(rng, width, height)
    x, y, bw, bh = sample_box(rng, width, height, area)
    obj, silhouette, description = render_object(rng, bw, bh)
    return _composite(context, obj, silhouette, (x, y, bw, bh)), f"Insert the {description} into the marked region"


def _composite(context: Image.Image, obj: np.ndarray, silhouette: np.ndarray, box: tuple[int, int, int, int]) -> Triplet:
    """Paste ``obj`` where ``silhouette`` is True into ``context`` at ``box``; the mask is the silhouette."""
    x, y, bw, bh = box
    ctx = np.asarray(context)
    tgt = ctx.copy()
    mask = np.zeros(ctx.shape[:2], dtype=bool)
    mask[y : y + bh, x : x + bw] = silhouette
    region = tgt[y : y + bh, x : x + bw]
    region[silhouette] = obj[silhouette]
    return Triplet(
        context=context,
        target=Image.fromarray(tgt, "RGB"),
        mask=Image.fromarray(mask.astype(np.uint8) * 255, "L"),
        box=box,
    )


# ------------------------------------------------------------------------------------------- triplet


@dataclass(frozen=True)
class Triplet:
    """One synthetic sample: ``context``/``target`` RGB images, ``mask`` ``L`` image (0 or 255), box ``(x, y, w, h)``."""

    context: Image.Image
    target: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int]

    @property
    def mask_area(self) -> float:
        """Fraction of the image covered by the mask."""
        return float((np.asarray(self.mask) >= 128).mean())


def sample_box(
    rng: np.random.Generator, width: int, height: int, area: float, aspect_range: tuple[float, float] = ASPECT_RANGE
) -> tuple[int, int, int, int]:
    """Choose an insertion box ``(x, y, w, h)`` whose product silhouette covers about ``area`` of the image.

    The aspect ratio (box width / height) is log-uniform in ``aspect_range``, clipped to what fits in the
    image at this area; the position is uniform over the places where the box fits entirely.
    """
    if not 0 < area < 1:
        raise ValueError(f"area must be a fraction of the image in (0, 1); got {area}")
    box_area = area * width * height / 0.96  # first guess of the fill fraction, refined below
    lo = max(aspect_range[0], box_area / (height * height))
    hi = min(aspect_range[1], (width * width) / box_area)
    if lo > hi:
        raise ValueError(f"a box of area {area:.3f} does not fit a {width}x{height} image")
    aspect = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    for _ in range(3):
        bw, bh = math.sqrt(box_area * aspect), math.sqrt(box_area / aspect)
        box_area = area * width * height / _fill_fraction(bw, bh)
    bw = int(min(width, max(2, round(math.sqrt(box_area * aspect)))))
    bh = int(min(height, max(2, round(math.sqrt(box_area / aspect)))))
    x = int(rng.integers(0, width - bw + 1))
    y = int(rng.integers(0, height - bh + 1))
    return x, y, bw, bh


def make_triplet(
    rng: np.random.Generator,
    width: int,
    height: int,
    area: float | None = None,
    area_range: tuple[float, float] = (0.02, 0.5),
    aspect_range: tuple[float, float] = ASPECT_RANGE,
) -> Triplet:
    """Draw a scene and composite the product into a random insertion box.

    Args:
        rng: random generator; the triplet is a deterministic function of its state.
        width, height: image size in pixels.
        area: target mask area as a fraction of the image; log-uniform in ``area_range`` when None.
        area_range: range used when ``area`` is None.
        aspect_range: range of the insertion box's width / height (log-uniform).

    Returns:
        A :class:`Triplet`; ``target`` equals ``context`` exactly wherever ``mask`` is 0.
    """
    if area is None:
        area = math.exp(rng.uniform(math.log(area_range[0]), math.log(area_range[1])))
    context = draw_scene(rng, width, height)
    x, y, bw, bh = sample_box(rng, width, height, area, aspect_range)
    product, silhouette = render_product(bw, bh)
    return _composite(context, product, silhouette, (x, y, bw, bh))


def scaled_insertions(
    rng: np.random.Generator,
    width: int,
    height: int,
    area: float,
    scales: Sequence[float],
    drift: float = 0.0,
) -> tuple[Triplet, dict[float, Image.Image]]:
    """A triplet and the same scene with the product painted at other sizes: the predictions a scale loss must rank.

    For each scale ``s`` the product is drawn in the box scaled by ``s`` about the mask box's centre (clipped to
    the image) over the *scene*, so where a shrunk product leaves part of the mask uncovered, the scene's
    own plausible background shows. ``drift`` (in 8-bit levels) adds the same smooth perturbation to every
    variant outside the insertion mask, as a model's slight background drift would; ``s = 1`` with
    ``drift = 0`` is exactly the target.

    Returns:
        ``(triplet, {s: RGB image})``.
    """
    t = make_triplet(rng, width, height, area=area)
    x, y, bw, bh = t.box
    cx, cy = x + bw / 2, y + bh / 2
    mask = np.asarray(t.mask) >= 128
    offset = np.zeros((height, width, 3), dtype=np.float32)
    if drift > 0:
        coarse = rng.standard_normal((max(height // 16, 2), max(width // 16, 2), 3)).astype(np.float32)
        smooth = np.stack(
            [np.asarray(Image.fromarray(coarse[..., c]).resize((width, height), Image.BICUBIC)) for c in range(3)], -1
        )
        offset = drift * smooth / max(float(np.abs(smooth).max()), 1e-6)
        offset[mask] = 0.0
    out: dict[float, Image.Image] = {}
    for s in scales:
        sw, sh = max(2, round(bw * s)), max(2, round(bh * s))
        x0, y0 = round(cx - sw / 2), round(cy - sh / 2)
        product, silhouette = render_product(sw, sh)
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        full = np.zeros((height, width), dtype=bool)
        # Clip the scaled box to the image.
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + sw, width), min(y0 + sh, height)
        canvas[iy0:iy1, ix0:ix1] = product[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        full[iy0:iy1, ix0:ix1] = silhouette[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        img = np.asarray(t.context, dtype=np.float32) + offset
        img[full] = canvas[full]
        out[float(s)] = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    return t, out


# ------------------------------------------------------------------------------------------- dataset

MANIFEST_NAME = "synthetic_manifest.json"
_SUBDIRS = ("context", "target", "mask", "prompts")


def _normalise_sizes(size: tuple[int, int] | Sequence[tuple[int, int]] | int) -> list[tuple[int, int]]:
    if isinstance(size, int):
        return [(size, size)]
    if len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        sizes = [(int(size[0]), int(size[1]))]
    else:
        sizes = [(int(w), int(h)) for w, h in size]  # type: ignore[misc]
    for w, h in sizes:
        if w < 16 or h < 16:
            raise ValueError(f"synthetic image size must be at least 16x16 pixels; got {w}x{h}")
    return sizes


def _stratified_areas(rng: np.random.Generator, n: int, area_range: tuple[float, float]) -> np.ndarray:
    """Log-stratified areas in random order: every decade of ``area_range`` is covered even for small ``n``."""
    lo, hi = math.log(area_range[0]), math.log(area_range[1])
    u = (np.arange(n) + rng.uniform(size=n)) / n
    return np.exp(lo + (hi - lo) * u)[rng.permutation(n)]


def _manifest_ok(root: Path, manifest: dict) -> bool:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if stored.get("arguments") != manifest["arguments"]:
        return False
    return all((root / rel).is_file() for rel in stored.get("files", []))


def generate_dataset(
    root: str | Path,
    num_samples: int = 64,
    size: tuple[int, int] | Sequence[tuple[int, int]] | int = (128, 128),
    seed: int = 0,
    area_range: tuple[float, float] = (0.02, 0.5),
    prompt: str = PRODUCT_PROMPT,
    progress: bool = True,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
) -> Path:
    """Write a synthetic triplet set in the folder format, or reuse an identical existing one.

    Args:
        root: dataset folder. It must be empty, absent, or a set this function wrote earlier.
        num_samples: number of samples.
        size: ``(width, height)``, a list of them (sample ``i`` uses ``size[i % len(size)]``), or an int.
        seed: random seed; the files are a deterministic function of all arguments.
        area_range: ``(min, max)`` mask area as a fraction of the image; areas are log-stratified over it.
        prompt: instruction written to every ``prompts/NAME.txt``.
        progress: show a progress bar.
        aspect_range: range of the insertion boxes' width / height.

    Returns:
        ``root`` as an absolute ``Path``. A second call with the same arguments does nothing; different
        arguments regenerate the set (replacing it atomically).
    """
    root = Path(root).expanduser().resolve()
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    if where := file_in_the_way(root):
        raise FileExistsError(f"{root} {where}, not a folder; name a new or empty folder for the synthetic set")
    lo, hi = float(area_range[0]), float(area_range[1])
    if not 0 < lo <= hi < 1:
        raise ValueError(f"area_range must satisfy 0 < min <= max < 1; got {area_range}")
    sizes = _normalise_sizes(size)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "arguments": {
            "num_samples": int(num_samples),
            "sizes": [list(s) for s in sizes],
            "seed": int(seed),
            "area_range": [lo, hi],
            "prompt": prompt,
            "generator_version": GENERATOR_VERSION,
            **({} if tuple(aspect_range) == ASPECT_RANGE else {"aspect_range": [float(a) for a in aspect_range]}),
        },
    }

    with exclusive_lock(root.parent / f".{root.name}.lock"):
        if _manifest_ok(root, manifest):
            return root
        if root.exists() and any(root.iterdir()) and not (root / MANIFEST_NAME).is_file():
            raise FileExistsError(
                f"{root} holds files not written by the synthetic data generator (no {MANIFEST_NAME}), probably real "
                "data; it was left untouched. To train on it, set data.synthetic.enabled=false; to generate a "
                "synthetic set, set data.root to a new or empty folder"
            )
        with writing(root, "the synthetic dataset"), atomic_folder(root) as tmp:
            for sub in _SUBDIRS:
                (tmp / sub).mkdir()
            rng = np.random.default_rng(seed)
            areas = _stratified_areas(rng, num_samples, (lo, hi))
            # One child generator per sample: sample i does not depend on how many samples precede it.
            children = rng.spawn(num_samples)
            files = []
            digits = max(5, len(str(num_samples - 1)))
            for i in tqdm(range(num_samples), desc="synthetic triplets", disable=not progress or num_samples < 32):
                w, h = sizes[i % len(sizes)]
                t = make_triplet(children[i], w, h, area=float(areas[i]), aspect_range=tuple(aspect_range))
                name = f"{i:0{digits}d}"
                t.context.save(tmp / "context" / f"{name}.png")
                t.target.save(tmp / "target" / f"{name}.png")
                t.mask.save(tmp / "mask" / f"{name}.png")
                (tmp / "prompts" / f"{name}.txt").write_text(prompt + "\n")
                files += [f"context/{name}.png", f"target/{name}.png", f"mask/{name}.png", f"prompts/{name}.txt"]
            manifest["files"] = files
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m data.synthetic --root DIR --num-samples N [--size 128 | --size 128x96 ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="output dataset folder")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument(
        "--size", action="append", default=None, help="WIDTHxHEIGHT or N (square); repeat for several sizes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-area", type=float, default=0.02)
    parser.add_argument("--max-area", type=float, default=0.5)
    parser.add_argument("--prompt", default=PRODUCT_PROMPT)
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1; got {args.num_samples}")
    sizes: list[tuple[int, int]] = []
    for text in args.size or ["128"]:
        try:
            w, _, h = text.lower().partition("x")
            sizes.append((int(w), int(h or w)))
        except ValueError:
            parser.error(f"--size {text!r}: expected WIDTHxHEIGHT or a single number, e.g. 128x96 or 128")
        if min(sizes[-1]) < 16:
            parser.error(f"--size {text!r}: images must be at least 16x16 pixels")
    try:
        out = generate_dataset(
            args.root, args.num_samples, sizes, args.seed, (args.min_area, args.max_area), args.prompt
        )
    except FileExistsError as e:  # real data or a file at --root: nothing was written
        parser.exit(2, f"error: --root {e}.\n")
    except (ValueError, WriteError) as e:
        parser.exit(2, f"error: {e}\n")
    print(out)


if __name__ == "__main__":
    main()
