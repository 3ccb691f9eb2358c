"""The validation split: which samples a run trains on and which it validates on.

:func:`validation_split` reads the ``data`` and ``validation`` config sections (``kontext.training.config``):

- ``validation.holdout: N``: the last N samples in name order are withheld from training and validated on
  (two :class:`SubsetSource` parts of one dataset);
- ``validation.data_root``: that dataset, opened and checked in full as ``data.root`` is;
- neither: the training source alone (validation then uses the first training samples).
"""

from __future__ import annotations

import logging
from typing import Any

from .buckets import make_buckets
from .errors import DatasetError, first_names
from .sources import TripletSource, open_configured_source
from .validate import validate_source

logger = logging.getLogger(__name__)


class SubsetSource:
    """Samples ``indices`` of a source, re-indexed from 0: the training part, or the held-out part, of one dataset.

    Answers the same questions as ``data.sources.TripletSource`` (the fingerprint is the underlying sample's, so a
    latent cache built on the whole dataset stays valid); ``what`` says which part it is in messages.
    """

    def __init__(self, source: TripletSource, indices: list[int], what: str) -> None:
        if any(not 0 <= i < len(source) for i in indices):
            raise IndexError(f"indices out of range for a dataset of {len(source)} samples")
        self.source = source
        self.indices = list(indices)
        self.what = what
        self.max_pixels = source.max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def names(self) -> list[str]:
        names = self.source.names
        return [names[i] for i in self.indices]

    def describe(self) -> str:
        return f"{self.source.describe()} ({self.what})"

    def scan_problems(self) -> list[str]:
        return self.source.scan_problems()

    def image_refs(self, i: int) -> Any:
        return self.source.image_refs(self.indices[i])

    def prompt(self, i: int) -> str:
        return self.source.prompt(self.indices[i])

    def size(self, i: int) -> tuple[int, int]:
        return self.source.size(self.indices[i])

    def fingerprint(self, i: int) -> str:
        return self.source.fingerprint(self.indices[i])

    def load(self, i: int) -> Any:
        return self.source.load(self.indices[i])


def validation_split(source: Any, data_config: Any, validation_config: Any) -> tuple[Any, Any | None]:
    """Split off the validation samples: ``(training source, validation source or None)``.

    Args:
        source: the training data (``data.root``), already validated.
        data_config: the ``data`` section: how a ``validation.data_root`` dataset is opened (same ``data.source``,
            split, columns, default prompt and pixel limit) and its buckets.
        validation_config: the ``validation`` section (``holdout``, ``data_root``, ``num_samples``).

    With ``validation.data_root``, samples found in both sets (same image bytes) are named in a warning, since they
    are not held out.

    Raises:
        DatasetError: the holdout leaves nothing to train on, or the validation dataset has problems.
    """
    holdout = validation_config.holdout
    if holdout:
        n = len(source)
        if holdout >= n:
            problem = (
                f"validation.holdout is {holdout} but the dataset has {n} sample{'s' if n != 1 else ''}; "
                "hold out fewer, or give a separate held-out set as validation.data_root"
            )
            raise DatasetError(source.describe(), [problem])
        keep = n - holdout
        train = SubsetSource(source, list(range(keep)), f"training part: {keep} of {n} samples")
        held = SubsetSource(source, list(range(keep, n)), f"held-out part: the last {holdout} of {n} samples")
        logger.info("validation.holdout: %d of %d samples held out for validation (%s)", holdout, n,
                    first_names(held.names, 5))
        return train, held
    if not validation_config.data_root:
        return source, None
    held = open_configured_source(data_config, validation_config.data_root)
    buckets = make_buckets(data_config.resolution, data_config.aspect_buckets)
    validate_source(held, max_pixels=data_config.max_pixels, progress=False, buckets=buckets)
    shown = range(min(validation_config.num_samples, len(held)))
    # Same files have the same size: only training samples of a validation sample's size are hashed.
    sizes = {held.size(i) for i in shown}
    training = {source.fingerprint(i) for i in range(len(source)) if source.size(i) in sizes}
    both = [held.names[i] for i in shown if held.fingerprint(i) in training]
    if both:
        logger.warning(
            "validation.data_root: %d of the %d validation samples are also training samples (same files: %s); "
            "their metrics do not measure held-out quality", len(both), len(shown), first_names(both, 5)
        )
    return source, held

