"""Resolve ``model.pretrained_model_name_or_path`` / ``--model``: ``tiny``, a local diffusers folder, or a hub id;
and the project's cache root (``$KONTEXT_LORA_CACHE``), where the tiny model builds and latents are cached."""

from __future__ import annotations

import os
from pathlib import Path

# Overrides the cache root (default ~/.cache/kontext-lora); see :func:`cache_root`.
CACHE_ENV = "KONTEXT_LORA_CACHE"


def cache_root() -> Path:
    """The cache root: ``$KONTEXT_LORA_CACHE`` (``~`` expanded) if set and not empty, else ``~/.cache/kontext-lora``.

    Callers add their own subfolder (the trainer's latent cache uses ``cache_root() / "latents"``); nothing is
    created here.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kontext-lora"


class ModelPathError(ValueError):
    """The model reference is neither ``tiny``, a diffusers folder, nor a hub id; the message says how to fix it."""


def resolve_model_path(name_or_path: str, option: str = "model.pretrained_model_name_or_path") -> str:
    """``tiny`` -> the cached tiny model folder (built on first use); a folder -> its absolute path (it must hold
    ``model_index.json``); ``owner/name`` -> unchanged (a hub id). ``option`` names the setting in errors."""
    if name_or_path == "tiny":
        from kontext.tiny.model import tiny_model_path

        return str(tiny_model_path())
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
