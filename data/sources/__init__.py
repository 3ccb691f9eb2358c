"""Where triplets come from: a dataset folder or a Hugging Face dataset.

Both sources answer the same questions: how many samples, their names, the image references of
sample ``i`` (for validation), its prompt, its size, a content fingerprint (for cache keys), and
``load(i)`` which decodes it into a :class:`RawSample`. Constructing a source never raises for
problems in the user's data; it records them and :func:`data.validate.validate_source` reports
them all together.

One module per source, plus what they share:

- ``base``: :class:`RawSample`, the :class:`TripletSource` protocol, ``ROLES``, and the loading,
  size and fingerprint logic every source inherits, with the path-confinement helpers;
- ``folder``: :class:`FolderSource` (``context/``, ``target/``, ``mask/``, ``prompts/``, ``metadata.jsonl``);
- ``huggingface``: :class:`HFSource` (image columns and a prompt column of a ``datasets`` dataset);
- here: :func:`open_source` and :func:`open_configured_source`, which pick one from the ``data`` config.
"""

from __future__ import annotations

import os
from typing import Any

from ..images import DEFAULT_MAX_PIXELS
from .base import ROLES, RawSample, TripletSource
from .folder import PROMPT_MODES, FolderSource
from .huggingface import HFSource

__all__ = [
    "FolderSource",
    "HFSource",
    "PROMPT_MODES",
    "ROLES",
    "RawSample",
    "TripletSource",
    "open_configured_source",
    "open_source",
]


def open_source(
    kind: str,
    root: str | os.PathLike[str],
    *,
    default_prompt: str | None = None,
    prompts: str = "auto",
    split: str = "train",
    context_column: str = "context",
    target_column: str = "target",
    mask_column: str = "mask",
    prompt_column: str | None = "prompt",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FolderSource | HFSource:
    """Build a source of the kind ``data.source`` names.

    kind: ``"folder"`` (``root`` is the dataset folder) or ``"hf"`` (``root`` is a hub id or a
    local dataset path; the column names map the dataset's columns).
    """
    if kind == "folder":
        return FolderSource(root, default_prompt=default_prompt, prompts=prompts, max_pixels=max_pixels)
    if kind == "hf":
        return HFSource(
            root,
            split=split,
            context_column=context_column,
            target_column=target_column,
            mask_column=mask_column,
            prompt_column=prompt_column,
            default_prompt=default_prompt,
            max_pixels=max_pixels,
        )
    raise ValueError(f"data.source must be 'folder' or 'hf', got {kind!r}")


def open_configured_source(data_cfg: Any, root: str | os.PathLike[str]) -> FolderSource | HFSource:
    """:func:`open_source` with the options of a ``data`` config section (``kontext.training.config.DataConfig``) at ``root``:
    the training data (``data.root``) and a held-out set (``validation.data_root``) are read the same way."""
    return open_source(
        data_cfg.source,
        root,
        split=data_cfg.split,
        default_prompt=data_cfg.default_prompt,
        context_column=data_cfg.context_column,
        target_column=data_cfg.target_column,
        mask_column=data_cfg.mask_column,
        prompt_column=data_cfg.prompt_column,
        max_pixels=data_cfg.max_pixels,
    )
