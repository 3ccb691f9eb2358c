"""What every source shares: the sample record, the source protocol, and loading over image references.

A source only has to say where sample ``i``'s three images are (:meth:`_SourceBase.image_refs`),
what its prompt and name are, and what it found wrong when it was opened; :class:`_SourceBase`
turns that into sizes, content fingerprints and decoded :class:`RawSample` objects, with the same
rules for every source. The path-confinement helpers are shared too: a folder source and a local
Hugging Face dataset with path columns refuse files that resolve outside their folder in the same way.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from ..errors import DatasetError
from ..images import ImageProblem, ImageRef, _is_loop, decode_mask, decode_rgb, open_header, oriented_size

ROLES = ("context", "target", "mask")


@dataclass
class RawSample:
    """One decoded triplet at its original size.

    context, target: RGB images; mask: ``L`` image, white (>= 128) where the object goes.
    All three have the same size (validation guarantees it).
    """

    name: str
    context: Image.Image
    target: Image.Image
    mask: Image.Image
    prompt: str


class TripletSource(Protocol):
    """What the rest of ``data`` needs from a source."""

    max_pixels: int

    def __len__(self) -> int: ...

    @property
    def names(self) -> list[str]:
        """Sample names, index-aligned."""

    def describe(self) -> str:
        """What the source is, for messages (folder path or dataset id and split)."""

    def scan_problems(self) -> list[str]:
        """Structural problems found when the source was opened."""

    def image_refs(self, i: int) -> dict[str, ImageRef]:
        """``{"context", "target", "mask"}`` references of sample ``i`` (nothing opened)."""

    def prompt(self, i: int) -> str:
        """The prompt of sample ``i``."""

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of sample ``i``."""

    def fingerprint(self, i: int) -> str:
        """Content hash of sample ``i``'s images."""

    def load(self, i: int) -> RawSample:
        """Decoded sample ``i``."""


def _hash_refs(refs: dict[str, ImageRef]) -> str:
    h = hashlib.sha256()
    for role in ROLES:
        data = refs[role].read_bytes()
        h.update(role.encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _inside(path: Path, root_resolved: Path) -> bool:
    try:
        path.resolve().relative_to(root_resolved)
        return True
    except (ValueError, OSError, RuntimeError):  # unresolvable paths are reported by _unresolvable first
        return False


def _unresolvable(path: Path) -> str | None:
    """Why ``path`` cannot be followed (a symlink loop, an unreadable link), or None if it can be resolved."""
    try:
        path.resolve()
        os.stat(path)  # follows the link: ELOOP / EACCES surface here
    except FileNotFoundError:
        return None  # a missing or dangling file is reported where it is opened ("does not exist")
    except (OSError, RuntimeError) as err:
        if _is_loop(err):
            return "is a symlink loop (the link points back at itself); replace it with the file or remove it"
        return f"cannot be read ({getattr(err, 'strerror', None) or err}); check that it exists and is readable"
    return None


class _SourceBase(ABC):
    """Shared loading, size and fingerprint logic over ``image_refs``.

    Subclasses record the problems they find while opening in ``self._problems`` instead of
    raising; :func:`data.validate.validate_source` reports them together with the per-image ones.
    """

    max_pixels: int

    def __init__(self) -> None:
        self._problems: list[str] = []
        self._fingerprints: dict[int, str] = {}
        self._sizes: dict[int, tuple[int, int]] = {}

    @abstractmethod
    def describe(self) -> str:
        """What the source is, for messages."""

    @abstractmethod
    def image_refs(self, i: int) -> dict[str, ImageRef]:
        """The three image references of sample ``i``."""

    @abstractmethod
    def prompt(self, i: int) -> str:
        """The prompt of sample ``i``."""

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """Sample names, index-aligned."""

    def scan_problems(self) -> list[str]:
        """Structural problems found when the source was opened (each with its fix), in the order found."""
        return list(self._problems)

    def _fail(self, label: str, problem: ImageProblem | str) -> DatasetError:
        return DatasetError(self.describe(), [f"{label}: {problem}"])

    def fingerprint(self, i: int) -> str:
        """SHA-256 over the encoded bytes of context, target and mask (prompt excluded: cached separately)."""
        if i not in self._fingerprints:
            refs = self.image_refs(i)
            try:
                self._fingerprints[i] = _hash_refs(refs)
            except ImageProblem as err:
                raise self._fail(self.names[i], err) from err
        return self._fingerprints[i]

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of sample ``i`` as displayed (EXIF orientation applied), from the target's header."""
        if i not in self._sizes:
            ref = self.image_refs(i)["target"]
            try:
                with open_header(ref, self.max_pixels) as img:
                    self._sizes[i] = oriented_size(img)
            except ImageProblem as err:
                raise self._fail(ref.label, err) from err
        return self._sizes[i]

    def load(self, i: int) -> RawSample:
        """Decode sample ``i``: context and target as RGB, the mask as ``L`` (same rules as validation)."""
        refs = self.image_refs(i)
        out: dict[str, Image.Image] = {}
        for role in ROLES:
            ref = refs[role]
            try:
                img = open_header(ref, self.max_pixels)
                out[role] = decode_mask(img) if role == "mask" else decode_rgb(img)
            except ImageProblem as err:
                raise self._fail(ref.label, err) from err
        sizes = {r: out[r].size for r in ROLES}
        if len(set(sizes.values())) != 1:
            detail = ", ".join(f"{refs[r].label} is {w}x{h}" for r, (w, h) in sizes.items())
            raise DatasetError(self.describe(), [f"sizes differ: {detail}; resize them to the same size"])
        return RawSample(self.names[i], out["context"], out["target"], out["mask"], self.prompt(i))
