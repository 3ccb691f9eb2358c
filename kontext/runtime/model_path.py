"""Resolve ``model.pretrained_model_name_or_path`` / ``--model``: ``tiny``, a local diffusers folder, or a hub id;
the project's cache root (``$KONTEXT_LORA_CACHE``), where the tiny model builds and latents are cached; and what a
local base model's folder records about its training (the prompt length)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kontext.errors import UserError

# A base folder's record of how it was built (the tiny builder writes it) and its key for the T5 prompt length the
# transformer was trained with.
BUILD_INFO_NAME = "build_info.json"
TRAINED_TEXT_LENGTH_KEY = "max_sequence_length"

# Overrides the cache root (default ~/.cache/kontext-lora); see :func:`cache_root`.
CACHE_ENV = "KONTEXT_LORA_CACHE"


def cache_root() -> Path:
    """The cache root: ``$KONTEXT_LORA_CACHE`` (``~`` expanded) if set and not empty, else ``~/.cache/kontext-lora``.

    Callers add their own subfolder (the trainer's latent cache uses ``cache_root() / "latents"``); nothing is
    created here.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kontext-lora"


class ModelPathError(UserError, ValueError):
    """The model reference is neither ``tiny``, a diffusers folder, nor a hub id; the message says how to fix it."""


def resolve_local_or_hub(name_or_path: str, option: str = "model.pretrained_model_name_or_path") -> str:
    """A folder -> its absolute path (it must hold ``model_index.json``); ``owner/name`` -> unchanged (a hub id).

    ``option`` names the setting in errors. The embedded ``tiny`` is resolved one layer up, where the tiny model
    lives (:func:`kontext.tiny.model.resolve_model_path`).
    """
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise ModelPathError(
                f"{option} {name_or_path!r} is a folder without model_index.json; give a diffusers FLUX.1 Kontext "
                "folder, a hub id such as black-forest-labs/FLUX.1-Kontext-dev, or `tiny`"
            )
        return str(p.resolve())
    if not is_hub_id(name_or_path):
        raise ModelPathError(
            f"{option} {name_or_path!r} is neither an existing folder nor a hub id (owner/name); check the path"
        )
    return name_or_path


def is_hub_id(name: str) -> bool:
    """True if ``name`` has the shape of a hub id (``owner/name``) rather than of a local path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def trained_text_length(model_path: str) -> int | None:
    """The T5 prompt length (tokens) the base at ``model_path`` was trained with, where its folder records it
    (``build_info.json``, key ``max_sequence_length``); None for hub ids and folders without the record."""
    info = Path(model_path).expanduser() / BUILD_INFO_NAME
    try:
        value = json.loads(info.read_text()).get(TRAINED_TEXT_LENGTH_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text_length_warning(
    model_path: str, requested: int, option: str = "model.max_sequence_length", fix: str = "set {option} to {trained}"
) -> str | None:
    """A warning when ``requested`` prompt tokens exceed what the base at ``model_path`` was trained with, else None.

    The extra positions are padding tokens the base never saw in training; on the tiny base 512 of them let the
    result drift outside the mask (PSNR outside 17.8 dB against 21.7 dB at 32 on held-out synthetic samples), up to a
    LoRA trained so repainting the whole image. ``option`` names where the length came from and
    ``fix`` (formatted with ``option`` and ``trained``) says what to change.
    """
    trained = trained_text_length(model_path)
    if trained is None or requested <= trained:
        return None
    return (
        f"{option} is {requested}, but the base model {model_path} was trained with {trained}-token prompts "
        f"({BUILD_INFO_NAME}: {TRAINED_TEXT_LENGTH_KEY}). The extra padding tokens are unlike anything it saw: the "
        f"result drifts outside the mask, up to repainting the whole image; {fix.format(option=option, trained=trained)} "
        "for this base."
    )


# Bytes read from the middle of each transformer weight file for the base model's fingerprint.
FINGERPRINT_SAMPLE = 1 << 16


def base_model_identity(model_path: str, revision: str | None = None) -> dict[str, Any]:
    """What a checkpoint records of the base model it was trained on: ``name_or_path`` (a hub id or an absolute
    folder), ``revision`` and, for a local folder, ``fingerprint``: a SHA-256 over the transformer's config and,
    for each of its weight files, the size and 64 KiB from the middle (in the tensor data, so two bases of the same
    shapes differ, and a moved or copied folder keeps it). Reads well under a megabyte, even for FLUX.1's 12B."""
    identity: dict[str, Any] = {"name_or_path": str(model_path), "revision": revision, "fingerprint": None}
    folder = Path(model_path).expanduser() / "transformer"
    if not folder.is_dir():
        return identity
    h = hashlib.sha256()
    try:
        h.update((folder / "config.json").read_bytes())
        for f in sorted(folder.glob("*.safetensors")):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                fh.seek(max(0, size // 2 - FINGERPRINT_SAMPLE // 2))
                h.update(fh.read(FINGERPRINT_SAMPLE))
    except OSError:
        return identity
    identity["fingerprint"] = h.hexdigest()
    return identity
