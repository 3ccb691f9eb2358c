"""Resolve ``model.pretrained_model_name_or_path`` / ``--model``: ``tiny``, a local diffusers folder, or a hub id."""

from __future__ import annotations

from pathlib import Path


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
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelPathError(
            f"{option} {name_or_path!r} is neither an existing folder nor a hub id (owner/name); check the path"
        )
    return name_or_path
