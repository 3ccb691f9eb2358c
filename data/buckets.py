"""Training resolutions: one fixed square, or aspect-ratio buckets seeded from FLUX.1 Kontext's own.

The aspect buckets are FLUX.1 Kontext's preferred resolutions (about 1024x1024 pixels of area,
aspect ratios from 3:7 to 7:3), scaled by ``resolution / 1024`` and rounded to multiples of 16 (8x VAE
downsampling times 2x2 latent packing). Each sample goes to the bucket nearest its aspect ratio.
"""

from __future__ import annotations

import math

# FLUX's VAE downsamples 8x (the one definition of the factor); the transformer packs 2x2 latent patches into
# one token, so training sizes are multiples of 16.
VAE_SCALE_FACTOR = 8
BUCKET_MULTIPLE = 2 * VAE_SCALE_FACTOR
KONTEXT_BASE_RESOLUTION = 1024


def kontext_preferred_resolutions() -> list[tuple[int, int]]:
    """FLUX.1 Kontext's preferred (width, height) pairs, as diffusers defines them."""
    # Imported here: the pipeline module pulls in transformers, seconds that fixed-size runs need not pay.
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    return [(int(w), int(h)) for w, h in PREFERRED_KONTEXT_RESOLUTIONS]


def _round16(x: float) -> int:
    return max(BUCKET_MULTIPLE, int(round(x / BUCKET_MULTIPLE)) * BUCKET_MULTIPLE)


def make_buckets(resolution: int, aspect_buckets: bool) -> list[tuple[int, int]]:
    """The list of (width, height) training sizes, each divisible by 16, sorted by aspect ratio.

    resolution: side of the square bucket (must be a multiple of 16); with ``aspect_buckets`` every
    Kontext resolution is scaled by ``resolution / 1024`` (so each has about ``resolution**2`` pixels).
    """
    if resolution < BUCKET_MULTIPLE or resolution % BUCKET_MULTIPLE != 0:
        raise ValueError(
            f"data.resolution must be a positive multiple of {BUCKET_MULTIPLE} (VAE 8x times 2x2 packing), got {resolution}"
        )
    if not aspect_buckets:
        return [(resolution, resolution)]
    # One common factor (the list is centred on 1024x1024), so resolution=1024 gives Kontext's list exactly.
    s = resolution / KONTEXT_BASE_RESOLUTION
    out = {(_round16(w * s), _round16(h * s)) for w, h in kontext_preferred_resolutions()}
    return sorted(out, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio, so 2:1 and 1:2 are equally far) to width/height."""
    if not buckets:
        raise ValueError("nearest_bucket: the bucket list is empty")
    a = math.log(width / height)
    return min(range(len(buckets)), key=lambda k: (abs(math.log(buckets[k][0] / buckets[k][1]) - a), k))
