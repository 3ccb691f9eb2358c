"""One pass over a dataset that finds every problem before anything expensive runs.

    python -c "from data import open_source, validate_source; validate_source(open_source('folder', 'path/to/set'))"

:func:`validate_source` opens each image header first (size, pixel limit), decodes only what is
within the limit, and raises one :class:`DatasetError` listing every problem, each naming the file
and the fix.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .buckets import VAE_SCALE_FACTOR, nearest_bucket
from .errors import DatasetError, first_names
from .images import ImageProblem, decode_mask, decode_rgb, mask_coverage_problem, open_header, oriented_size
from .sources import ROLES, TripletSource
from .transforms import area_resize, crop_box

SHOWN_NAMES = 10
# Outside the mask, target and context should be the same scene (the background loss assumes it). A pixel
# "differs" when some channel differs by more than this many levels (0..255): smaller differences are codec noise.
BACKGROUND_TOLERANCE = 8
# Warn about a sample when more than this share of its outside pixels differ.
BACKGROUND_WARN_SHARE = 0.01

logger = logging.getLogger(__name__)


class DatasetWarning(UserWarning):
    """A dataset is usable, but something in it will not train as the user expects."""


@dataclass(frozen=True)
class BackgroundMismatch:
    """How much target and context disagree outside the mask, for one sample.

    ``share``: the fraction of the outside pixels (mask < 128) where some RGB channel differs by more than the
    tolerance; ``max_diff``: the largest channel difference there, in levels (0..255); ``outside``: how many
    pixels are outside the mask.
    """

    name: str
    share: float
    max_diff: int
    outside: int


def background_mismatch(
    name: str,
    context: Image.Image | np.ndarray,
    target: Image.Image | np.ndarray,
    mask: Image.Image | np.ndarray,
    tolerance: int = BACKGROUND_TOLERANCE,
) -> BackgroundMismatch:
    """Compare decoded RGB ``context`` and ``target`` outside the ``L`` ``mask`` (same sizes; PIL or uint8 arrays)."""
    outside = np.asarray(mask) < 128
    c = np.asarray(context.convert("RGB") if isinstance(context, Image.Image) else context, dtype=np.int16)
    t = np.asarray(target.convert("RGB") if isinstance(target, Image.Image) else target, dtype=np.int16)
    if c.shape != t.shape or c.shape[:2] != outside.shape:
        raise ValueError(f"sizes differ: context {c.shape[:2]}, target {t.shape[:2]}, mask {outside.shape}")
    diff = np.abs(c - t).max(axis=2)[outside]
    n = int(outside.sum())
    if n == 0:
        return BackgroundMismatch(name, 0.0, 0, 0)
    return BackgroundMismatch(name, float((diff > tolerance).mean()), int(diff.max()), n)


def _background_note(
    found: Sequence[BackgroundMismatch], n: int, tolerance: int, warn_share: float
) -> tuple[str | None, str]:
    """(the warning, or None when no sample is above ``warn_share``; the one-line summary)."""
    worst = max(found, key=lambda b: (b.share, b.max_diff))
    shares = sorted(b.share for b in found)
    median = shares[len(shares) // 2]
    what = f"background check of {len(found)} sample{'s' if len(found) != 1 else ''}: outside the mask, target and context"
    if worst.share == 0.0:
        largest = max(b.max_diff for b in found)
        summary = f"{what} agree in every sample (largest difference {largest} levels, tolerance {tolerance})"
    else:
        summary = (
            f"{what} differ by more than {tolerance} levels on {median:.2%} of the pixels (median), at most "
            f"{worst.share:.2%} ({worst.name}, up to {worst.max_diff} levels)"
        )
    bad = sorted((b for b in found if b.share > warn_share), key=lambda b: -b.share)
    if not bad:
        return None, summary
    shown = first_names([f"{b.name} ({b.share:.1%} differ, up to {b.max_diff} levels)" for b in bad], SHOWN_NAMES)
    warning = (
        f"{len(bad)} of {n} samples have a target that differs from its context outside the mask on more than "
        f"{warn_share:.0%} of the outside pixels (by more than {tolerance} levels): {shown}. The background-"
        "preservation loss assumes the two agree there, so these differences are trained as the model's error; "
        "export target and context from the same source without lossy re-encoding (PNG), or widen the masks to "
        "cover every change"
    )
    return warning, summary


def mask_vanishes(mask: Image.Image, buckets: Sequence[tuple[int, int]]) -> bool:
    """Whether ``mask`` (``L``) has no latent cell more than half white after the centre crop to its training bucket.

    Mirrors training: the sample goes to the nearest bucket, the mask is area-resized over the
    centre crop window, then area-averaged 8x8 to the latent grid, where the losses threshold it at 0.5.
    """
    bucket = buckets[nearest_bucket(*mask.size, list(buckets))]
    bw, bh = bucket
    m = np.asarray(mask, dtype=np.float64) / 255.0
    px = area_resize(m, bucket, crop_box(mask.size, bucket, "center"))
    lh, lw = bh // VAE_SCALE_FACTOR, bw // VAE_SCALE_FACTOR
    lat = px[: lh * VAE_SCALE_FACTOR, : lw * VAE_SCALE_FACTOR].reshape(lh, VAE_SCALE_FACTOR, lw, VAE_SCALE_FACTOR)
    return not bool((lat.mean(axis=(1, 3)) > 0.5).any())


def _check_sample(
    source: TripletSource,
    i: int,
    max_pixels: int,
    buckets: Sequence[tuple[int, int]] | None = None,
    vanished: list[str] | None = None,
    background: list[BackgroundMismatch] | None = None,
    tolerance: int = BACKGROUND_TOLERANCE,
) -> list[str]:
    problems: list[str] = []
    refs = source.image_refs(i)
    sizes: dict[str, tuple[int, int]] = {}
    decoded: dict[str, np.ndarray] = {}  # copies: the images are closed below
    rotated: list[str] = []  # images whose EXIF orientation swaps their stored width and height
    for role in ROLES:
        ref = refs[role]
        try:
            img = open_header(ref, max_pixels)
        except ImageProblem as err:
            problems.append(f"{ref.label}: {err}")
            continue
        try:
            sizes[role] = oriented_size(img)
            if sizes[role] != img.size:
                rotated.append(f"{ref.label} is stored {img.size[0]}x{img.size[1]}")
            if role == "mask":
                mask = decode_mask(img)
                why = mask_coverage_problem(mask)
                if why is not None:
                    problems.append(f"{ref.label}: mask {why}")
                else:
                    decoded[role] = np.array(mask)
                    if buckets and vanished is not None and mask_vanishes(mask, buckets):
                        vanished.append(ref.label)
            else:
                decoded[role] = np.array(decode_rgb(img))
        except ImageProblem as err:
            problems.append(f"{ref.label}: {err}")
        finally:
            img.close()
    if len(sizes) > 1 and len(set(sizes.values())) > 1:
        detail = ", ".join(f"{refs[r].label} is {w}x{h}" for r, (w, h) in sizes.items())
        exif = (
            f"; sizes are as displayed, after the EXIF orientation tag ({', '.join(rotated)} and turned by its tag): "
            "check that the files are rotated alike, or re-save them without the tag (e.g. exiftool -Orientation= FILE)"
            if rotated else ""
        )
        problems.append(
            f"sample '{source.names[i]}': sizes differ ({detail}){exif}; context, target and mask must have the same "
            "size, resize them to match the target"
        )
    elif background is not None and len(decoded) == len(ROLES):
        background.append(
            background_mismatch(source.names[i], decoded["context"], decoded["target"], decoded["mask"], tolerance)
        )
    return problems


def validate_source(
    source: TripletSource,
    max_pixels: int | None = None,
    progress: bool = True,
    buckets: Sequence[tuple[int, int]] | None = None,
    background: list[BackgroundMismatch] | None = None,
    background_tolerance: int = BACKGROUND_TOLERANCE,
    background_warn_share: float = BACKGROUND_WARN_SHARE,
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

    Background agreement: per sample, the share of the pixels outside the mask where target and context differ
    by more than ``background_tolerance`` levels in some channel, and the largest difference there
    (:class:`BackgroundMismatch`; appended to ``background`` when a list is given). Samples above
    ``background_warn_share`` are named in a warning (the background-preservation and change-mask losses assume
    the two agree outside the mask); a one-line summary over all samples is logged at INFO (``data.validate``).

    Returns the warnings (each also issued as a :class:`DatasetWarning`); an empty list when there are none.
    """
    limit = source.max_pixels if max_pixels is None else max_pixels
    problems = source.scan_problems()
    n = len(source)
    if n == 0 and not problems:
        problems.append("the dataset has no samples; add some (see docs/data.md)")
    vanished: list[str] = []
    found: list[BackgroundMismatch] = []
    for i in tqdm(range(n), desc="Validating dataset", unit="sample", disable=not progress or n == 0):
        problems.extend(_check_sample(source, i, limit, buckets, vanished, found, background_tolerance))
    if background is not None:
        background.extend(found)
    notes: list[str] = []
    if vanished:
        shown = first_names(vanished, SHOWN_NAMES)
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
    defaulted = list(getattr(source, "defaulted_prompts", None) or [])
    if defaulted:
        # Some samples have their own prompt and these fall back to the default: usually a prompt file that was
        # forgotten (or a config's default, such as the tiny example's soda-can prompt, meant for other data).
        default = getattr(source, "default_prompt", None)
        notes.append(
            f"{len(defaulted)} of {n} samples have no prompt of their own ({first_names(defaulted, SHOWN_NAMES)}) while "
            f"the others do, so they train with data.default_prompt {default!r}; if that is not meant, give them their "
            "own (prompts/NAME.txt, a metadata.jsonl line, or the prompt column)"
        )
    if found:
        warning, summary = _background_note(found, n, background_tolerance, background_warn_share)
        logger.info("Dataset %s: %s", source.describe(), summary)
        if warning is not None:
            notes.append(warning)
    for note in notes:
        warnings.warn(f"Dataset {source.describe()}: {note}", DatasetWarning, stacklevel=2)
    return notes
