"""Opening user images safely: header first, pixel limit, then decoding to RGB or a greyscale mask.

Every path that reads a user image (validation, loading for training, caching) goes through
:func:`open_header`, :func:`decode_rgb` and :func:`decode_mask`, so the pixel limit and the mask
rules are the same everywhere.
"""

from __future__ import annotations

import errno
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kontext.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# 8192 x 8192: above any camera a product shoot uses, below what makes a decode eat gigabytes.
DEFAULT_MAX_PIXELS = 8192 * 8192

# JPEG chroma subsampling leaves a few levels of colour in a grey mask; more than this is a colour image.
MASK_COLOUR_TOLERANCE = 16


def _is_loop(err: BaseException) -> bool:
    """Whether an error from listing/opening a path is a symlink loop (ELOOP, or pathlib's RuntimeError)."""
    return getattr(err, "errno", None) == errno.ELOOP or (isinstance(err, RuntimeError) and "loop" in str(err).lower())


class ImageProblem(UserError):
    """One problem with one image; the message says what is wrong and how to fix it, without the file name."""


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives: a file (``path``) or bytes held in a dataset row (``data``).

    ``label`` names it in messages, e.g. ``context/a.png`` or ``row 3, column 'mask'``.
    """

    label: str
    path: Path | None = None
    data: bytes | None = None
    problem: str | None = None  # known to be unusable (e.g. a path escaping the dataset folder)

    def read_bytes(self) -> bytes:
        """The encoded file content (for fingerprints)."""
        if self.problem is not None:
            raise ImageProblem(self.problem)
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ImageProblem("has neither bytes nor a path; store the image in the dataset")
        try:
            return self.path.read_bytes()
        except (OSError, RuntimeError) as err:
            if _is_loop(err):
                raise ImageProblem("is a symlink loop (the link points back at itself); replace it with the image file") from err
            raise ImageProblem(f"cannot be read ({getattr(err, 'strerror', None) or err}); check that the file exists and is readable") from err


def open_header(ref: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only) and enforce the pixel limit before anything is decoded.

    Raises :class:`ImageProblem` for unreadable files, non-images and images over ``max_pixels``
    (including Pillow's own decompression-bomb refusal).
    """
    if ref.problem is not None:
        raise ImageProblem(ref.problem)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice its limit; our own limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if ref.data is not None:
                img = Image.open(io.BytesIO(ref.data))
            elif ref.path is not None:
                img = Image.open(ref.path)
            else:
                raise ImageProblem("has neither bytes nor a path; store the image in the dataset")
    except Image.DecompressionBombError as err:
        raise ImageProblem(
            f"is over the pixel limit ({err}); downscale the image (it is almost certainly far larger than training needs)"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageProblem(
            "is not an image Pillow can read (corrupt, or not an image file); re-export it as PNG or JPEG"
        ) from err
    except FileNotFoundError as err:
        raise ImageProblem("does not exist; add the file or fix the path") from err
    except PermissionError as err:
        raise ImageProblem(f"cannot be read ({err.strerror or err}); make the file readable") from err
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop on some Python versions
        if _is_loop(err):
            raise ImageProblem("is a symlink loop (the link points back at itself); replace it with the image file") from err
        raise ImageProblem(f"cannot be opened ({err}); re-export it as PNG or JPEG") from err
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageProblem(
            f"is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; downscale it "
            f"(or raise data.max_pixels if the file is trusted)"
        )
    if w == 0 or h == 0:
        raise ImageProblem("has zero width or height; re-export the image")
    return img


_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation tag (read from the header only)."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, like image viewers do
        orientation = 1
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def _upright(img: Image.Image) -> Image.Image:
    # Phone photos store pixels sideways plus an EXIF tag; editors show (and users paint masks on) the rotated view.
    try:
        if img.getexif().get(0x0112, 1) in (1, None):
            return img  # nothing to do; exif_transpose would still copy the pixels
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, like image viewers do
        return img


def _load(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageProblem(f"is truncated or corrupt ({err}); re-export it as PNG or JPEG") from err


# 16-bit greyscale (how Pillow opens 16-bit grey PNGs); full scale is 65535.
GREY16_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _grey16_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image scaled faithfully (0..65535 -> 0..255) to 8-bit ``L``."""
    arr = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")


def decode_rgb(img: Image.Image) -> Image.Image:
    """Decode an opened image fully, apply its EXIF orientation, and convert it to RGB (alpha is dropped).

    16-bit greyscale is scaled 0..65535 -> 0..255 (not clipped), as for masks.
    """
    _load(img)
    img = _upright(img)
    if img.mode in GREY16_MODES:
        img = _grey16_to_l(img)  # Pillow's own convert clips 0..65535 at 255: a 16-bit photo would be pure white
    if img.mode in ("P", "PA") and "transparency" in img.info:
        # the same colours; straight to RGB, Pillow warns on every load that such images should go through RGBA
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_mask(img: Image.Image) -> Image.Image:
    """Decode a mask and return it as 8-bit greyscale (mode ``L``), white (>= 128) where the object goes.

    The EXIF orientation is applied, as for the images. Accepted: 1-bit, greyscale (8 or 16 bit), and palette/RGB/RGBA images whose pixels are grey
    and opaque. Colour or transparency would make "white" ambiguous, so they raise
    :class:`ImageProblem` with the fix.
    """
    _load(img)
    img = _upright(img)
    mode = img.mode
    if mode == "L":
        return img
    if mode == "1":
        return img.convert("L")
    if mode in GREY16_MODES:
        top = int(np.asarray(img).max())
        if 0 < top <= 255:
            # 8-bit values in a 16-bit file: scaled faithfully they are all black (255 of 65535 is 0.4 %)
            raise ImageProblem(
                f"is a 16-bit greyscale image whose values stop at {top} (of 65535), so read as 16-bit it is all "
                "black. Save it as an 8-bit greyscale PNG (white 255 where the object goes), or scale it to 0..65535"
            )
        return _grey16_to_l(img)
    if mode in ("LA", "PA", "P", "RGB", "RGBA"):
        if mode in ("P", "PA"):
            img = img.convert("RGBA")
            mode = "RGBA"
        arr = np.asarray(img)
        if mode in ("LA", "RGBA"):
            alpha = arr[..., -1]
            if alpha.min() < 255:
                raise ImageProblem(
                    "has transparency; save the mask as an opaque greyscale image, white where the object goes "
                    "and black elsewhere (if your mask is in the alpha channel, export that channel as the image)"
                )
        if mode == "LA":
            return Image.fromarray(np.ascontiguousarray(arr[..., 0]), mode="L")
        rgb = arr[..., :3].astype(np.int16)
        spread = int((rgb.max(axis=-1) - rgb.min(axis=-1)).max())
        if spread > MASK_COLOUR_TOLERANCE:
            raise ImageProblem(
                f"is not single-channel: its colour channels differ by up to {spread} levels; save it as a "
                "greyscale image, white where the object goes and black elsewhere"
            )
        return Image.fromarray(np.round(rgb.mean(axis=-1)).astype(np.uint8), mode="L")
    raise ImageProblem(
        f"has image mode {mode!r}, which is not a greyscale mask; save it as an 8-bit greyscale PNG, "
        "white where the object goes and black elsewhere"
    )


def mask_coverage_problem(mask: Image.Image) -> str | None:
    """Return why a decoded ``L`` mask is unusable (empty or full), or None if it is fine."""
    arr = np.asarray(mask)
    inside = arr >= 128
    n_in = int(inside.sum())
    if n_in == 0:
        hint = ""
        if int(arr.max()) == 1:
            hint = " (it holds only 0 and 1: scale it to 0 and 255)"
        return (
            f"is empty: no pixel is white (>= 128){hint}; paint the insertion region white, or remove the sample"
        )
    if n_in == inside.size:
        return "is full: every pixel is white, so nothing is kept from the context; paint the area outside the object black"
    return None
