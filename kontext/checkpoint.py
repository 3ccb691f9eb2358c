"""Resumable checkpoints: atomic save, rotation, ``latest`` resolution and compatibility checks.

A checkpoint is a folder ``checkpoint-<step>/`` written by ``accelerator.save_state`` (optimizer, LR
scheduler, every process's RNG states) plus, through the save hook, only the LoRA
(``pytorch_lora_weights.safetensors``, itself loadable by diffusers) and ``trainer_state.json`` (step,
sampler position, LoRA shape). It is written under ``checkpoint-<step>.tmp`` and renamed when complete,
so an interrupted save never looks like a checkpoint, and ``latest`` only ever picks complete ones.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

TRAINER_STATE_NAME = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir`` sorted by step (oldest first)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """Turn ``checkpoint.resume_from`` into a checkpoint folder, or None for a fresh start.

    ``latest`` with no checkpoint yet is a fresh start (so a pre-emptible job can always pass it);
    an explicit path that is not a complete checkpoint is an error.
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume_from)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from
    if not path.is_dir():
        raise CheckpointError(
            f"`checkpoint.resume_from` = {resume_from!r}: no such folder. Pass `latest` or an existing "
            f"checkpoint-<step> folder (complete ones in {output_dir}: "
            f"{[p.name for p in list_checkpoints(output_dir)] or 'none'})."
        )
    if not (path / TRAINER_STATE_NAME).is_file():
        raise CheckpointError(
            f"`checkpoint.resume_from` = {resume_from!r} is not a complete checkpoint (no {TRAINER_STATE_NAME}); "
            "it may be an interrupted save. Pass `latest` or another checkpoint-<step> folder."
        )
    return path


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint."""
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def check_compatible(checkpoint: Path, state: dict[str, Any], lora_shape: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint whose LoRA rank/alpha/targets differ from this run's config."""
    saved = state.get("lora", {})
    diffs = [
        f"lora.{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
        for k, v in lora_shape.items()
        if saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"Checkpoint {checkpoint} was trained with another LoRA shape ({'; '.join(diffs)}). "
            "Set the same lora.* values as the checkpoint's run, or start a fresh run in a new output_dir."
        )


def temp_path(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is complete."""
    return Path(output_dir) / f"checkpoint-{step}.tmp"


def finalize(output_dir: str | Path, step: int, state: dict[str, Any], total_limit: int | None) -> Path:
    """Main process: write ``trainer_state.json`` into the temp folder, rename it into place, rotate.

    Rotation happens only after the new checkpoint is complete and never removes the newest one.
    """
    output_dir = Path(output_dir)
    tmp = temp_path(output_dir, step)
    (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2), encoding="utf-8")
    final = output_dir / f"checkpoint-{step}"
    if final.exists():
        # Re-saving a step: move the old folder aside first, so a crash between the two renames
        # leaves it restorable (``remove_incomplete`` puts it back) instead of deleted.
        replaced = _replaced_path(output_dir, step)
        if replaced.exists():
            shutil.rmtree(replaced)
        final.rename(replaced)
        tmp.rename(final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        tmp.rename(final)
    if total_limit is not None:
        ckpts = list_checkpoints(output_dir)
        for old in ckpts[: max(0, len(ckpts) - total_limit)]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _replaced_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}.old"


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted saves (``checkpoint-*.tmp``); returns what was removed.

    A ``checkpoint-<step>.old`` (a complete checkpoint moved aside while being replaced) is put back
    when the save that replaced it never completed, and deleted otherwise. Main process only.
    """
    output_dir = Path(output_dir)
    removed = []
    if not output_dir.is_dir():
        return removed
    for p in sorted(output_dir.glob("checkpoint-*.old")):
        final = output_dir / p.name.removesuffix(".old")
        if not final.exists() and (p / TRAINER_STATE_NAME).is_file():
            p.rename(final)
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def remove_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete every ``checkpoint-*`` folder (complete or not) of ``output_dir``; returns what was removed.

    Used when a fresh run deliberately overwrites an output folder, so the old run's checkpoints can
    never be picked by ``latest`` for the new one. Main process only.
    """
    output_dir = Path(output_dir)
    removed = sorted(p for p in output_dir.glob("checkpoint-*") if p.is_dir()) if output_dir.is_dir() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
