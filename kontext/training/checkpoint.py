"""Resumable checkpoints: atomic save, rotation, ``latest`` resolution and compatibility checks.

A checkpoint is a folder ``checkpoint-<step>/`` written by ``accelerator.save_state`` (optimizer, LR
scheduler, every process's RNG states) plus, through the save hook, only the LoRA
(``pytorch_lora_weights.safetensors``, itself loadable by diffusers) and ``trainer_state.json`` (step,
sampler position, LoRA shape). It is written under ``checkpoint-<step>.tmp`` and renamed when complete,
so an interrupted save never looks like a checkpoint, and ``latest`` only ever picks complete ones.

Before a resume every file is verified (:func:`verify_checkpoint`): a damaged ``latest`` is skipped for
the newest intact checkpoint with a warning, a damaged explicit checkpoint is refused naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch

from data import BucketBatchSampler, make_buckets, nearest_bucket
from data.errors import TEMP_PREFIX, is_disk_full, is_write_error, reason_of, remove_partial, write_fix
from kontext.errors import UserError
from kontext.runtime.lora_io import LORA_WEIGHTS_NAME
from kontext.training.distributed import any_process

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
# The run settings a checkpoint records, so a resume can say what it changes (see ``apply_schedule``).
SCHEDULE_KEYS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "max_steps")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


class CheckpointWriteError(OSError):
    """A checkpoint just written does not read back intact (data lost without a write error)."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir`` in the order they were written (oldest first).

    The order is the ``sequence`` each ``trainer_state.json`` records (:func:`finalize` numbers the saves of a
    folder), then the step: a run resumed from an earlier checkpoint writes a new branch, and its checkpoints are
    newer than the abandoned branch's higher steps, so ``latest`` and rotation follow the branch being trained.
    Checkpoints written before saves were numbered come first, by step; one whose state cannot be read comes last,
    so that ``latest`` tries it first and says that it is damaged.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE_NAME).is_file():
            found.append((_sequence(p), int(m.group(1)), p))
    return [p for _, _, p in sorted(found)]


def _sequence(checkpoint: Path) -> float:
    """The save number recorded in a checkpoint's state: -1 when it records none, infinity when it cannot be read."""
    try:
        seq = read_trainer_state(checkpoint).get("sequence", -1)
    except (OSError, ValueError, AttributeError):
        return math.inf
    return seq if _is_int(seq) else math.inf


def resolve_resume(
    output_dir: str | Path, resume_from: str | None, warn: Callable[[str], None] | None = None
) -> Path | None:
    """Turn ``checkpoint.resume_from`` into a verified checkpoint folder, or None for a fresh start.

    ``latest`` with no checkpoint yet is a fresh start (so a pre-emptible job can always pass it); a
    damaged newest checkpoint is skipped for the newest intact one, with a warning (``warn``, default
    this module's logger) naming the damaged one and its file; with none intact it is an error. An
    explicit path that is not a complete, intact checkpoint is an error naming what is wrong.
    """
    if not resume_from:
        return None
    warn = logger.warning if warn is None else warn
    if resume_from == "latest":
        damaged = []
        for ckpt in reversed(list_checkpoints(output_dir)):
            problem = verify_checkpoint(ckpt)
            if problem is None:
                if damaged:
                    warn(f"Damaged checkpoint skipped: {'; '.join(damaged)}. Resuming from the newest intact one, {ckpt}.")
                return ckpt
            damaged.append(f"{ckpt} ({problem})")
        if damaged:
            raise CheckpointError(
                f"`checkpoint.resume_from` = 'latest': no intact checkpoint in {output_dir}: {'; '.join(damaged)}. "
                "Restore one from a backup, or start a fresh run (checkpoint.overwrite_output_dir=true or a new output_dir)."
            )
        return None
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
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(
            f"`checkpoint.resume_from` = {resume_from!r}: checkpoint {path} is damaged: {problem}. "
            "Pass `latest` (it skips damaged checkpoints) or another checkpoint-<step> folder."
        )
    return path


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
    m = _CKPT_RE.match(folder_name.removesuffix(".tmp")) if folder_name else None
    if m and int(m.group(1)) != step:
        return f"{TRAINER_STATE_NAME} says step {step} but the folder is {folder_name}; the two must agree"
    for k, v in data.items():
        if not (_is_int(v) and (v >= 0 or k == "seed")):
            return f"{TRAINER_STATE_NAME} has data.{k} = {v!r}; it must be an integer >= 0"
    for k, (ok, what) in _STATE_FIELDS.items():
        if k in state and not ok(state[k]):
            return f"{TRAINER_STATE_NAME} has {k} = {str(state[k])[:80]!r}; it must be {what}"
    return None


def _missing_or_empty(path: Path) -> str | None:
    """Why ``path`` cannot hold a checkpoint file (missing, or 0 bytes), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
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
    with another shape is refused by :func:`check_compatible`."""
    return {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "target_modules": sorted(lora_cfg.target_modules)}


def check_compatible(
    checkpoint: Path, state: dict[str, Any], lora_shape: dict[str, Any], optimizer: str | None = None
) -> None:
    """Refuse to resume a checkpoint whose LoRA rank/alpha/targets, or whose optimiser (``train.optimizer``, when
    the checkpoint records it), differ from this run's config: the saved weights and optimiser state fit only
    their own."""
    if optimizer is not None and state.get("optimizer", optimizer) != optimizer:
        raise CheckpointError(
            f"Checkpoint {checkpoint} was trained with train.optimizer = {state['optimizer']!r}, this run has "
            f"{optimizer!r}; a saved optimiser state can only be loaded by the same optimiser. Set train.optimizer "
            f"back to {state['optimizer']!r}, or start a fresh run in a new output_dir."
        )
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


def check_base_model(checkpoint: Path, state: dict[str, Any], identity: dict[str, Any], allow_other: bool) -> None:
    """Refuse to resume a checkpoint trained on another base model (``kontext.runtime.model_path.base_model_identity``).

    Two local folders are the same base when their fingerprints agree (a moved or copied folder is), a hub id when
    id and revision agree. A LoRA learned on one base is meaningless on another even when every shape fits, so a
    different base is an error unless ``checkpoint.allow_other_base`` says it is meant. Checkpoints that record no
    base (written before it was recorded) are not checked.
    """
    saved = state.get("base_model")
    if not saved or allow_other:
        return
    if saved.get("fingerprint") and identity.get("fingerprint"):
        same = saved["fingerprint"] == identity["fingerprint"]
    else:
        same = (saved.get("name_or_path"), saved.get("revision")) == (identity["name_or_path"], identity["revision"])
    if not same:
        def named(i: dict[str, Any]) -> str:
            return repr(i.get("name_or_path")) + (f" (revision {i['revision']})" if i.get("revision") else "")

        raise CheckpointError(
            f"Checkpoint {checkpoint} was trained on the base model {named(saved)}, but this run's "
            f"model.pretrained_model_name_or_path is {named(identity)}, whose weights differ. A LoRA learned on one "
            "base means nothing on another, even when the shapes fit. Set model.pretrained_model_name_or_path (and "
            "model.revision) back to the checkpoint's base; or, to continue on this base on purpose, set "
            "checkpoint.allow_other_base=true."
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
    # The save's number in this folder: write order, not the step, says which checkpoint is the newest.
    numbers = [n for n in map(_sequence, list_checkpoints(output_dir)) if n != math.inf]
    state = {**state, "sequence": int(max(numbers, default=-1)) + 1}
    (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2), encoding="utf-8")
    # Read everything back before it counts: a full disk noticed only when a file is closed, or a writer
    # that drops an error, would otherwise leave a damaged checkpoint that `latest` picks.
    problem = verify_checkpoint(tmp)
    if problem is not None:
        raise CheckpointWriteError(f"{tmp.name} does not read back intact: {problem}")
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


def check_data_position(
    source: Any, cfg: Any, num_processes: int, checkpoint: Path | None = None, state: dict[str, Any] | None = None
) -> None:
    """Before any model loads: the batches this run will draw exist, and a resumed data position fits them.

    Builds the run's ``BucketBatchSampler`` from the sample sizes alone (image headers, already read by
    the dataset check), so a batch larger than the dataset (or than every aspect bucket) and a checkpoint
    saved with another batch size, seed, process count or dataset size are refused here, not after the
    model has loaded.
    """
    batch_size, seed = cfg.train.batch_size, cfg.train.seed
    buckets = make_buckets(cfg.data.resolution, cfg.data.aspect_buckets)
    ids = [nearest_bucket(*source.size(i), buckets) for i in range(len(source))]
    saved = (state or {}).get("data", {})
    for key, mine, name in (
        ("batch_size", batch_size, "train.batch_size"),
        ("seed", seed, "train.seed"),
        ("num_replicas", num_processes, "the number of processes"),
    ):
        if key in saved and int(saved[key]) != mine:
            raise CheckpointError(
                f"Cannot resume from {checkpoint}: it was trained with {name} = {saved[key]}, this run has {mine}. "
                f"The saved data position counts batches of that run; set {name} back to {saved[key]}, or start "
                "a new run in another output_dir."
            )
    try:
        sampler = BucketBatchSampler(ids, batch_size=batch_size, seed=seed, num_replicas=num_processes, rank=0)
    except ValueError as e:
        raise CheckpointError(f"train.batch_size = {batch_size} does not fit the dataset: {e}.") from None
    # Batches hold one bucket each and incomplete ones are dropped: a bucket with fewer samples than one
    # batch across the processes is never drawn. Say so, naming the samples.
    need = batch_size * num_processes
    per_bucket = Counter(ids)
    never = [i for i, b in enumerate(ids) if per_bucket[b] < need]
    if never:
        names = [source.names[i] for i in never]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        logger.warning(
            "%d sample(s) are never trained on: their aspect bucket holds fewer than train.batch_size x processes "
            "= %d samples (%s). Add samples of that shape, lower train.batch_size, or turn data.aspect_buckets off.",
            len(never), need, shown,
        )
    if saved:
        try:
            sampler.load_state_dict(saved)
        except ValueError as e:
            raise CheckpointError(f"Cannot resume from {checkpoint}: {e}.") from None


def schedule_of(train_cfg: Any) -> dict[str, Any]:
    """The settings of ``train_cfg`` that shape the learning rate (recorded in every checkpoint)."""
    return {k: getattr(train_cfg, k) for k in SCHEDULE_KEYS}


def apply_schedule(lr_scheduler: Any, state: dict[str, Any], train_cfg: Any, warn: bool = True) -> str | None:
    """After ``accelerator.load_state``: make the resumed run use this run's learning-rate settings.

    accelerate restores the checkpoint's base learning rate (the scheduler's ``base_lrs``) but builds the
    schedule's shape from this run's config (diffusers' lambdas are closures, saved as None), so a
    changed ``train.learning_rate`` would be silently ignored while a changed ``lr_scheduler`` silently
    applied. Here both apply: the base rate is set to ``train.learning_rate`` and the current rate is
    recomputed at the resumed step. Returns (and with ``warn`` logs) a warning naming each change, or
    None when nothing changed; ``config.yaml`` records the new values, used from the resumed step on.
    """
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the torch scheduler
    if not hasattr(sched, "base_lrs"):
        return None
    saved = dict(state.get("schedule") or {})
    saved.setdefault("learning_rate", sched.base_lrs[0])  # checkpoints written before settings were recorded
    old_lr = [g["lr"] for g in sched.optimizer.param_groups]
    new = schedule_of(train_cfg)
    sched.base_lrs = [float(train_cfg.learning_rate)] * len(sched.base_lrs)
    for g in sched.optimizer.param_groups:
        g["initial_lr"] = float(train_cfg.learning_rate)
    if hasattr(sched, "lr_lambdas"):
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for g, lr in zip(sched.optimizer.param_groups, lrs):
            g["lr"] = lr
        sched._last_lr = lrs
    changed = [
        f"train.{k}: {saved[k]!r} -> {new[k]!r}"
        for k in SCHEDULE_KEYS
        if k in saved and k != "max_steps" and not _same(saved[k], new[k])
    ]
    now_lr = [g["lr"] for g in sched.optimizer.param_groups]
    if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) for a, b in zip(old_lr, now_lr)):
        if "max_steps" in saved and saved["max_steps"] != new["max_steps"]:
            changed.append(f"train.max_steps: {saved['max_steps']!r} -> {new['max_steps']!r}")
        changed.append(f"learning rate at step {sched.last_epoch}: {old_lr[0]:.6g} -> {now_lr[0]:.6g}")
    if not changed:
        return None
    message = (
        f"Resuming with changed learning-rate settings ({'; '.join(changed)}). The new values apply from "
        "this step on; config.yaml records them."
    )
    if warn:
        logger.warning(message)
    return message


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    return a == b


def save_failure_message(exc: BaseException, output_dir: str | Path, partial: Iterable[Path], what: str) -> str | None:
    """The one message for a save that a write error (``data.errors.is_write_error``: a full disk, a read-only or
    vanished folder) or a lost write broke, or None for any other error.

    Removes the ``partial`` files/folders (they would look like results) and names the newest intact
    checkpoint to resume from.
    """
    if is_disk_full(exc):
        head, fix = f"no space left on device while writing {what} in {output_dir}", "Free some space and"
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
