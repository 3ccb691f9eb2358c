"""Resumable checkpoints: atomic save, read-back verification, rotation and listing.

A checkpoint is a folder ``checkpoint-<step>/`` written by ``accelerator.save_state`` (optimizer, LR
scheduler, every process's RNG states) plus, through the save hook, only the LoRA
(``pytorch_lora_weights.safetensors``, itself loadable by diffusers) and ``trainer_state.json`` (step,
sampler position, LoRA shape). It is written under ``checkpoint-<step>.tmp`` and renamed when complete,
so an interrupted save never looks like a checkpoint, and ``latest`` only ever picks complete ones.

Every file is verified (:func:`verify_checkpoint`) after it is written and before a resume. Choosing the
checkpoint to resume, checking that it fits the run and loading it is ``kontext.training.resume``.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch

from data.errors import TEMP_PREFIX, is_disk_full, is_write_error, reason_of, remove_partial, write_fix
from kontext.errors import UserError
from kontext.runtime.lora_io import LORA_WEIGHTS_NAME
from kontext.training.distributed import any_process

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
# The run settings a checkpoint records, so a resume can say what it changes (see ``resume.apply_schedule``).
SCHEDULE_KEYS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "max_steps")
# A checkpoint folder's name: ``checkpoint-<step>`` (group 1: the step), with ``.tmp`` while written or ``.old`` while
# replaced (group 2).
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)(\.tmp|\.old)?$")


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


class CheckpointWriteError(OSError):
    """A checkpoint just written does not read back intact (data lost without a write error).

    ``left_out``: a file is absent although no write failed (the save itself skipped it), not short or garbled.
    """

    def __init__(self, message: str, left_out: bool = False) -> None:
        super().__init__(message)
        self.left_out = left_out


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir`` in the order they were written (oldest first).

    The order is the ``sequence`` each ``trainer_state.json`` records (:func:`finalize` numbers the saves of a
    folder), then the step: a run resumed from an earlier checkpoint writes a new branch, and its checkpoints are
    newer than the abandoned branch's higher steps, so ``latest`` and rotation follow the branch being trained.
    Checkpoints that record no sequence come first, by step; one whose state cannot be read comes last,
    so that ``latest`` tries it first and says that it is damaged.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and not m.group(2) and p.is_dir() and (p / TRAINER_STATE_NAME).is_file():
            found.append((_sequence(p), int(m.group(1)), p))
    return [p for _, _, p in sorted(found)]


def _sequence(checkpoint: Path) -> float:
    """The save number recorded in a checkpoint's state: -1 when it records none, infinity when it cannot be read."""
    try:
        seq = read_trainer_state(checkpoint).get("sequence", -1)
    except (OSError, ValueError, AttributeError):
        return math.inf
    return seq if _is_int(seq) else math.inf


def verify_checkpoint(checkpoint: str | Path) -> str | None:
    """What is wrong with a checkpoint folder (naming the file), or None if it can be resumed from.

    Checks what resuming reads: ``trainer_state.json`` is JSON with the step and the data position;
    the LoRA safetensors file is complete (every tensor readable) and finite; ``optimizer.bin``,
    ``scheduler.bin`` and one ``random_states_<rank>.pkl`` per process of the saving run are present,
    non-empty and load with ``weights_only=True``. (accelerate itself silently skips RNG states it
    cannot read, which would quietly break exact resume.) Under FSDP or DeepSpeed, whose optimizer
    state is a folder of shards (``optimizer_0/``, ``pytorch_model/``), only its presence is checked.
    """
    ckpt = Path(checkpoint)
    try:
        state = read_trainer_state(ckpt)
    except OSError as e:
        return f"{TRAINER_STATE_NAME} cannot be read ({e.strerror or e})"
    except ValueError as e:
        return f"{TRAINER_STATE_NAME} is not valid JSON ({e})"
    problem = trainer_state_problem(state, ckpt.name)
    if problem:
        return problem
    problem = _verify_lora(ckpt / LORA_WEIGHTS_NAME)
    if problem:
        return problem
    if not (ckpt / "optimizer.bin").exists() and (any(ckpt.glob("optimizer_*")) or (ckpt / "pytorch_model").is_dir()):
        names = ["scheduler.bin"]  # sharded optimizer state: present; its shards are read by accelerate
    else:
        names = ["optimizer.bin", "scheduler.bin"]
    names += [f"random_states_{i}.pkl" for i in range(int(state.get("num_processes", 1) or 1))]
    for name in names:
        problem = _verify_torch_file(ckpt / name)
        if problem:
            return problem
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What a resume reads from trainer_state.json besides step and data: key -> (type check, what it must be).
_STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lora": (lambda v: isinstance(v, dict), "a mapping"),
    "schedule": (lambda v: isinstance(v, dict), "a mapping"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v), "a list of mappings"),
    "num_processes": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "sequence": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "base_model": (lambda v: isinstance(v, dict), "a mapping"),
    "optimizer": (lambda v: isinstance(v, str), "a string"),
}


def trainer_state_problem(state: Any, folder_name: str | None = None) -> str | None:
    """What is wrong with a ``trainer_state.json`` (a wrong type, a step that is negative or disagrees with the
    checkpoint's folder name), or None. Every field a resume reads is checked here, so a hand-edited or damaged
    file is refused naming the field instead of failing half-way through a resume."""
    if not isinstance(state, dict):
        return f"{TRAINER_STATE_NAME} does not hold a mapping"
    data = state.get("data")
    if "step" not in state or not isinstance(data, dict) or not all(k in data for k in ("epoch", "position")):
        return f"{TRAINER_STATE_NAME} lacks the step or the data position (step, data.epoch, data.position)"
    step = state["step"]
    if not _is_int(step) or step < 0:
        return f"{TRAINER_STATE_NAME} has step {step!r}; a step is an integer >= 0"
    m = CHECKPOINT_RE.match(folder_name) if folder_name else None
    if m and int(m.group(1)) != step:
        return f"{TRAINER_STATE_NAME} says step {step} but the folder is {folder_name}; the two must agree"
    for k, v in data.items():
        if not (_is_int(v) and (v >= 0 or k == "seed")):
            return f"{TRAINER_STATE_NAME} has data.{k} = {v!r}; it must be an integer >= 0"
    for k, (ok, what) in _STATE_FIELDS.items():
        if k in state and not ok(state[k]):
            return f"{TRAINER_STATE_NAME} has {k} = {str(state[k])[:80]!r}; it must be {what}"
    return None


_MISSING = " is missing"  # how verify_checkpoint names an absent file


def _missing_or_empty(path: Path) -> str | None:
    """Why ``path`` cannot hold a checkpoint file (missing, or 0 bytes), or None."""
    if not path.is_file():
        return f"{path.name}{_MISSING}"
    if path.stat().st_size == 0:
        return f"{path.name} is empty (0 bytes)"
    return None


def _verify_lora(path: Path) -> str | None:
    from safetensors import safe_open

    problem = _missing_or_empty(path)
    if problem:
        return problem
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = [f.get_tensor(k) for k in f.keys()]
    except Exception as e:  # safetensors raises its own error type for a truncated or garbled file
        return f"{path.name} is truncated or not a safetensors file ({str(e).splitlines()[0][:200]})"
    if not tensors:
        return f"{path.name} holds no tensors"
    if not weights_finite(tensors):
        return f"{path.name} holds NaN/inf weights"
    return None


def _verify_torch_file(path: Path) -> str | None:
    from accelerate.utils import load as accelerate_load  # torch.load with accelerate's allow-list (numpy RNG state)

    problem = _missing_or_empty(path)
    if problem:
        return problem
    try:
        obj = accelerate_load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip archive raises RuntimeError, OSError or UnpicklingError
        return f"{path.name} is truncated or unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if not isinstance(obj, dict) or not obj:
        return f"{path.name} does not hold a state dict"
    return None


def newest_intact(output_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``output_dir`` that :func:`verify_checkpoint` passes, or None."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        if verify_checkpoint(ckpt) is None:
            return ckpt
    return None


def weights_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if every tensor is finite: one norm over all of them (fused where torch can), one host sync.

    A NaN or inf anywhere makes the total norm NaN or inf. Works on DTensor shards (FSDP2) too.
    """
    ts = [t.detach() for t in tensors]
    if not ts:
        return True
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: foreach kernels
    if get_total_norm is not None:
        total = get_total_norm(ts)
    else:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in ts]))
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return bool(torch.isfinite(total))


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint."""
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def lora_shape(lora_cfg: Any) -> dict[str, Any]:
    """What a checkpoint records of the LoRA (``lora.rank``, ``lora.alpha``, ``lora.target_modules``): a resume
    with another shape is refused by ``kontext.training.resume.check_compatible``."""
    return {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "target_modules": sorted(lora_cfg.target_modules)}


def temp_path(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is complete."""
    return Path(output_dir) / f"checkpoint-{step}.tmp"


def finalize(output_dir: str | Path, step: int, state: dict[str, Any], total_limit: int | None) -> Path:
    """Main process: write ``trainer_state.json`` into the temp folder, rename it into place, rotate.

    Rotation happens only after the new checkpoint is complete and never removes the newest one.
    """
    output_dir = Path(output_dir)
    tmp = temp_path(output_dir, step)
    # The save's number in this folder: write order, not the step, says which checkpoint is the newest.
    numbers = [n for n in map(_sequence, list_checkpoints(output_dir)) if n != math.inf]
    state = {**state, "sequence": int(max(numbers, default=-1)) + 1}
    (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2), encoding="utf-8")
    # Read everything back before it counts: a full disk noticed only when a file is closed, or a writer
    # that drops an error, would otherwise leave a damaged checkpoint that `latest` picks.
    problem = verify_checkpoint(tmp)
    if problem is not None:
        raise CheckpointWriteError(
            f"{tmp.name} does not read back intact: {problem}", left_out=problem.endswith(_MISSING)
        )
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
    """Delete leftovers of interrupted saves (``checkpoint-*.tmp``, and the ``.tmp*`` files of file writes that were
    killed); returns what was removed.

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
    for p in output_dir.glob(f"{TEMP_PREFIX}*"):  # a file write that was killed (safetensors' .tmpXXXXXX, ours)
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def remove_previous_run(output_dir: str | Path) -> list[Path]:
    """Delete what an earlier run left in ``output_dir``: every ``checkpoint-*`` folder (complete or not), its
    exported LoRA and ComfyUI file, model card, history and validation grids; returns what was removed.

    Used when a fresh run deliberately overwrites an output folder, once its setup has succeeded: the old run's
    checkpoints can never be picked by ``latest`` for the new one, and a new run stopped early never sits beside the
    old run's finished LoRA (the folder would look finished). Tracker logs (``logs/``) are kept: each run's are
    files of their own. Main process only.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    names = (LORA_WEIGHTS_NAME, "lora_comfyui.safetensors", "README.md", "training_history.json", "validation")
    removed = sorted(p for p in output_dir.glob("checkpoint-*") if p.is_dir())
    removed += [output_dir / n for n in names if (output_dir / n).exists()]
    remove_partial(removed)
    return removed


def schedule_of(train_cfg: Any) -> dict[str, Any]:
    """The settings of ``train_cfg`` that shape the learning rate (recorded in every checkpoint)."""
    return {k: getattr(train_cfg, k) for k in SCHEDULE_KEYS}


def save_failure_message(exc: BaseException, output_dir: str | Path, partial: Iterable[Path], what: str) -> str | None:
    """The one message for a save that a write error (``data.errors.is_write_error``: a full disk, a read-only or
    vanished folder) or a lost write broke, or None for any other error.

    Removes the ``partial`` files/folders (they would look like results) and names the newest intact
    checkpoint to resume from.
    """
    if is_disk_full(exc):
        head, fix = f"no space left on device while writing {what} in {output_dir}", "Free some space and"
    elif isinstance(exc, CheckpointWriteError) and exc.left_out:
        # No write failed and no file is short: the save itself left a file out (a launcher setting or engine
        # whose model the checkpoint hooks did not recognise), not the disk.
        head = (f"{what} in {output_dir} was not written intact ({exc}); no write failed, so the save left the file "
                "out: this is a fault of the trainer with this launch setup, not of the disk")
        fix = "Please report it with the accelerate launch command and config you used. To go on, launch without the " \
              "setting that differs from a plain `accelerate launch` (for example --dynamo_backend) and"
    elif isinstance(exc, CheckpointWriteError):
        head, fix = f"{what} in {output_dir} was not written intact ({exc}); is the disk full?", "Free some space and"
    elif is_write_error(exc):
        head, fix = f"could not write {what} in {output_dir} ({reason_of(exc)})", write_fix(exc).rstrip(".") + "; then"
    else:
        return None
    remove_partial(partial)
    intact = newest_intact(output_dir)
    if intact is None:
        return f"{head}. The partial files were removed; there is no intact checkpoint yet. {fix} start again."
    return (
        f"{head}. The partial files were removed; the newest intact checkpoint is {intact}. {fix} "
        f"resume: accelerate launch train_kontext_lora.py --config {Path(output_dir) / 'config.yaml'} "
        "checkpoint.resume_from=latest"
    )


def raise_save_failure(exc: BaseException, output_dir: str | Path, partial: Iterable[Path], what: str) -> NoReturn:
    """Raise the user-facing error for a failed save (:func:`save_failure_message`), or ``exc`` itself when it is
    not a full disk or a lost write."""
    message = save_failure_message(exc, output_dir, partial, what)
    if message is None:
        raise exc
    raise UserError(message) from None


def try_write(write: Callable[[], Any]) -> Exception | None:
    """Run ``write``; the write error it raised (``data.errors.is_write_error``: ``OSError``, safetensors'
    ``SafetensorError``, torch's writer's ``RuntimeError``), or None. Any other error propagates."""
    try:
        write()
    except Exception as e:
        if not is_write_error(e):
            raise
        return e
    return None


def stop_if_any_failed(acc: Any, failure: Exception | None, output_dir: Path, partial: Path, what: str) -> None:
    """Raise on every rank if a checkpoint write failed on any (one all-reduce); the ``partial`` folder is removed.

    Every rank calls this whatever happened locally, so a write that fails on one rank (a full disk is often one
    node's) stops every rank together and none is left waiting at a barrier.
    """
    if not any_process(acc, failure is not None):
        return
    if failure is None:  # this rank's part was fine; another's was not
        failure = CheckpointWriteError("another process could not write its part")
    raise_save_failure(failure, output_dir, [partial], what)
