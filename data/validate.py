"""One pass over a dataset that finds every problem before anything expensive runs.

    python -c "from data import open_source, validate_source; validate_source(open_source('folder', 'path/to/set'))"

:func:`validate_source` opens each image header first (size, pixel limit), decodes only what is
within the limit, and raises one :class:`DatasetError` listing every problem, each naming the file
and the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .buckets import nearest_bucket
from .errors import DatasetError
from .images import ImageProblem, decode_mask, decode_rgb, mask_coverage_problem, open_header, oriented_size
from .sources import ROLES, TripletSource
from .transforms import area_resize, crop_box

LATENT_DOWNSAMPLE = 8  # as data.dataset: the geometry terms see the mask at 1/8 of the bucket
SHOWN_NAMES = 10


class DatasetWarning(UserWarning):
    """A dataset is usable, but something in it will not train as the user expects."""


def mask_vanishes(mask: Image.Image, buckets: Sequence[tuple[int, int]]) -> bool:
    """Whether ``mask`` (``L``) has no latent cell more than half white after the centre crop to its training bucket.

    Mirrors training: the sample goes to the nearest bucket, the mask is area-resized over the
    centre crop window, then area-averaged 8x8 to the latent grid, where the losses threshold it at 0.5.
    """
    bucket = buckets[nearest_bucket(*mask.size, list(buckets))]
    bw, bh = bucket
    m = np.asarray(mask, dtype=np.float64) / 255.0
    px = area_resize(m, bucket, crop_box(mask.size, bucket, "center"))
    lh, lw = bh // LATENT_DOWNSAMPLE, bw // LATENT_DOWNSAMPLE
    lat = px[: lh * LATENT_DOWNSAMPLE, : lw * LATENT_DOWNSAMPLE].reshape(lh, LATENT_DOWNSAMPLE, lw, LATENT_DOWNSAMPLE)
    return not bool((lat.mean(axis=(1, 3)) > 0.5).any())


def _check_sample(
    source: TripletSource, i: int, max_pixels: int, buckets: Sequence[tuple[int, int]] | None = None, vanished: list[str] | None = None
) -> list[str]:
    problems: list[str] = []
    refs = source.image_refs(i)
    sizes: dict[str, tuple[int, int]] = {}
    for role in ROLES:
        ref = refs[role]
        try:
            img = open_header(ref, max_pixels)
        except ImageProblem as err:
            problems.append(f"{ref.label}: {err}")
            continue
        try:
            sizes[role] = oriented_size(img)
            if role == "mask":
                mask = decode_mask(img)
                why = mask_coverage_problem(mask)
                if why is not None:
                    problems.append(f"{ref.label}: mask {why}")
                elif buckets and vanished is not None and mask_vanishes(mask, buckets):
                    vanished.append(ref.label)
            else:
                decode_rgb(img)
        except ImageProblem as err:
            problems.append(f"{ref.label}: {err}")
        finally:
            img.close()
    if len(sizes) > 1 and len(set(sizes.values())) > 1:
        detail = ", ".join(f"{refs[r].label} is {w}x{h}" for r, (w, h) in sizes.items())
        problems.append(
            f"sample '{source.names[i]}': sizes differ ({detail}); context, target and mask must have the same "
            "size, resize them to match the target"
        )
    return problems


def validate_source(
    source: TripletSource,
    max_pixels: int | None = None,
    progress: bool = True,
    buckets: Sequence[tuple[int, int]] | None = None,
) -> list[str]:
    """Check every sample of ``source`` and raise :class:`DatasetError` listing all problems at once.

    Checks: the folder/columns exist and the dataset is not empty, every sample has context, target
    and mask and a prompt, every image opens and decodes, is within ``max_pixels`` (checked from the
    header before decoding; default ``source.max_pixels``), the three sizes agree, and the mask is
    greyscale, neither empty nor full.

    ``buckets`` (optional, the training sizes from :func:`data.buckets.make_buckets`): also check that
    every mask survives the resize and centre crop to its bucket, i.e. keeps at least one latent cell
    more than half white (a 4x4 mask in a 1024 px image, or one outside the centre crop of a very
    wide image, would train as an empty mask, leaving the geometry terms nothing to work with). Some
    masks vanishing is a warning naming them; all of them vanishing is an error. (A random crop can
    move the window; the check uses the centre crop.)

    Returns the warnings (each also issued as a :class:`DatasetWarning`); an empty list when there are none.
    """
    limit = source.max_pixels if max_pixels is None else max_pixels
    problems = source.scan_problems()
    n = len(source)
    if n == 0 and not problems:
        problems.append("the dataset has no samples; add some (see docs/data.md)")
    vanished: list[str] = []
    for i in tqdm(range(n), desc="Validating dataset", unit="sample", disable=not progress or n == 0):
        problems.extend(_check_sample(source, i, limit, buckets, vanished))
    notes: list[str] = []
    if vanished:
        shown = ", ".join(vanished[:SHOWN_NAMES]) + (f" and {len(vanished) - SHOWN_NAMES} more" if len(vanished) > SHOWN_NAMES else "")
        what = (
            f"vanish{'es' if len(vanished) == 1 else ''} at the training resolution ({shown}): after resizing and centre "
            "cropping to the training bucket no latent cell (8x8 pixels) is more than half white, so the sample trains "
            "with an empty mask and the geometry terms get nothing; paint larger masks, crop the images around the "
            "object, or remove these samples"
        )
        if len(vanished) == n:
            problems.append(f"every mask ({n} of {n}) {what}")
        else:
            notes.append(f"{len(vanished)} of {n} masks {what}")
    if problems:
        raise DatasetError(source.describe(), problems)
    for note in notes:
        warnings.warn(f"Dataset {source.describe()}: {note}", DatasetWarning, stacklevel=2)
    return notes
