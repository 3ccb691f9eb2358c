"""Resuming a run: which checkpoint, whether it fits this run, and loading it.

The order in which the trainer calls these is the order of the checks, cheapest first and nothing written before
them (``train_kontext_lora.setup``):

1. :func:`resolve_resume` turns ``checkpoint.resume_from`` into a verified checkpoint folder (or a fresh start);
2. :func:`open_resume` reads its ``trainer_state.json`` and refuses another LoRA shape or optimiser
   (:func:`check_compatible`), before any model loads;
3. :func:`data_sampler` builds the run's one ``BucketBatchSampler`` from the sample sizes and checks the saved
   data position against it, before any model loads;
4. :func:`check_base_model` refuses a checkpoint of another base model, once the model path is resolved;
5. :func:`restore` loads the optimiser, LR scheduler and RNG states (``accelerator.load_state``) and applies this
   run's learning-rate settings (:func:`apply_schedule`); it returns the step, data position and history.

Writing, verifying and listing checkpoints is ``kontext.training.checkpoint``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import BucketBatchSampler, make_buckets, nearest_bucket
from data.errors import first_names
from kontext.training.checkpoint import (
    SCHEDULE_KEYS,
    TRAINER_STATE_NAME,
    CheckpointError,
    list_checkpoints,
    lora_shape,
    read_trainer_state,
    schedule_of,
    verify_checkpoint,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint to continue from and its ``trainer_state.json`` (checked against this run's config)."""

    checkpoint: Path
    state: dict[str, Any]


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


def open_resume(checkpoint: Path | None, cfg: Any) -> ResumePoint | None:
    """The checkpoint to resume with its trainer state (None for a fresh start), refused before any model loads
    when its LoRA shape or optimiser differ from ``cfg``'s (:func:`check_compatible`)."""
    if checkpoint is None:
        return None
    state = read_trainer_state(checkpoint)
    check_compatible(checkpoint, state, lora_shape(cfg.lora), cfg.train.optimizer)
    return ResumePoint(checkpoint, state)


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
    base are not checked.
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


def check_data_position(
    source: Any,
    cfg: Any,
    num_processes: int,
    checkpoint: Path | None = None,
    state: dict[str, Any] | None = None,
    rank: int = 0,
) -> BucketBatchSampler:
    """Before any model loads: the batches this run will draw exist, and a resumed data position fits them.
    Returns the run's ``BucketBatchSampler`` for process ``rank`` (the one training draws from).

    The sampler is built from the sample sizes alone (image headers, already read by the dataset check; the
    dataset puts each sample in the same aspect bucket), so a batch larger than the dataset (or than every aspect
    bucket) and a checkpoint saved with another batch size, seed, process count or dataset size are refused here,
    not after the model has loaded.
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
        sampler = BucketBatchSampler(
            ids, batch_size=batch_size, seed=seed, shuffle=True, drop_last=True, num_replicas=num_processes, rank=rank
        )
    except ValueError as e:
        raise CheckpointError(f"train.batch_size = {batch_size} does not fit the dataset: {e}.") from None
    # Batches hold one bucket each and incomplete ones are dropped: a bucket with fewer samples than one
    # batch across the processes is never drawn. Say so, naming the samples.
    need = batch_size * num_processes
    per_bucket = Counter(ids)
    never = [i for i, b in enumerate(ids) if per_bucket[b] < need]
    if never:
        names = [source.names[i] for i in never]
        shown = first_names(names, 10)
        logger.warning(
            "%d sample(s) are never trained on: their aspect bucket holds fewer than train.batch_size x processes "
            "= %d samples (%s). Add samples of that shape, lower train.batch_size, or turn data.aspect_buckets off.",
            len(never), need, shown,
        )
    if saved:
        try:
            sampler.load_state_dict(saved)  # refuses another dataset size (batches per epoch) or a position past it
        except ValueError as e:
            raise CheckpointError(f"Cannot resume from {checkpoint}: {e}.") from None
    return sampler


def data_sampler(
    source: Any, cfg: Any, num_processes: int, rank: int, resume: ResumePoint | None
) -> BucketBatchSampler:
    """The run's sampler for process ``rank``, with a resumed data position checked against it
    (:func:`check_data_position`)."""
    if resume is None:
        return check_data_position(source, cfg, num_processes, rank=rank)
    return check_data_position(source, cfg, num_processes, resume.checkpoint, resume.state, rank=rank)


def restore(
    accelerator: Any, lr_scheduler: Any, resume: ResumePoint, train_cfg: Any
) -> tuple[int, dict[str, int], list[dict[str, Any]]]:
    """Load a checkpoint into the prepared run: the LoRA, optimiser, LR scheduler and every process's RNG states
    (``accelerator.load_state``), then this run's learning-rate settings (:func:`apply_schedule`, a change is
    warned about on the main process). Returns ``(step, data position {"epoch", "position"}, history)``."""
    accelerator.load_state(str(resume.checkpoint))
    state = resume.state
    data_state = {"epoch": int(state["data"]["epoch"]), "position": int(state["data"]["position"])}
    apply_schedule(lr_scheduler, state, train_cfg, warn=accelerator.is_main_process)
    return int(state["step"]), data_state, list(state.get("history", []))


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
    saved.setdefault("learning_rate", sched.base_lrs[0])  # a checkpoint that records no settings
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
